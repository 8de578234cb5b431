"""The strict judge: verdicts from counts, non-finite samples as misses, the count head beside the course's
checkpoint format, the scenes that teach and check it, and which judge a run gets."""
import json

import mlflow
import pytest
import torch
import torchvision
from mlflow.tracking import MlflowClient
from torch import nn

from lab.data.iclevr import load_train
from lab.data.synthetic import KINDS, LABELS, kinds_scenes, make_splits, write_kinds_root, write_root
from lab.errors import UserError
from lab.eval import (Evaluator, build_count_head, build_resnet, judge_samples, load_evaluator, over_seeds,
                      save_evaluator, scene_verdicts)
from lab.evaluator_cache import strict_judge_for
from lab.grids import VERDICT_COLOURS, labelled_grid
from lab.tracking import mlflow_key


def multi_hot(*rows):
    out = torch.zeros(len(rows), 24)
    for i, row in enumerate(rows):
        out[i, row] = 1
    return out


def test_verdicts_from_counts():
    asked = multi_hot([0], [0, 5], [0, 5], [3], [3])
    counts = torch.zeros(5, 24, dtype=torch.long)
    counts[0, 0] = 1                 # exactly the asked object
    counts[1, [0, 5]] = 1            # both, once each
    counts[1, 9] = 1                 # ... and one nobody asked for
    counts[2, 0] = 2                 # an asked object twice, the other missing
    counts[2, 5] = 0
    counts[3, 3] = 3                 # three of the one asked ("3 or more")
    counts[4, 7] = 1                 # another object instead of the asked one
    verdicts = scene_verdicts(counts, asked)
    assert verdicts["exact"].tolist() == [True, False, False, False, False]
    assert verdicts["extra"].tolist() == [False, True, True, True, True]
    assert verdicts["missing"].tolist() == [False, False, True, False, True]


class CountingJudge(Evaluator):
    """An evaluator whose answers are set by hand: what the scene-level rules are checked against."""

    def __init__(self, probs, counts):
        self.fixed_probs, self.fixed_counts, self.count_head = probs, counts, True

    def assess(self, images):
        return self.fixed_probs, torch.zeros(len(images), 512), self.fixed_counts


def test_a_non_finite_sample_is_a_miss_on_every_rule():
    labels = multi_hot([1], [2])
    counts = torch.zeros(2, 24, dtype=torch.long)
    counts[0, 1] = counts[1, 2] = 1
    judge = CountingJudge(labels * 0.9, counts)
    images = torch.zeros(2, 3, 64, 64)
    assert judge_samples(images, labels, judge, judge).metrics() == {
        "accuracy": 1.0, "exact_accuracy": 1.0, "extra_objects": 0.0, "missing_objects": 0.0}
    images[1, 0, 5, 5] = float("nan")
    judged = judge_samples(images, labels, judge, judge)
    assert judged.metrics() == {"accuracy": 0.5, "exact_accuracy": 0.5, "extra_objects": 0.0, "missing_objects": 0.5}
    assert judged.finite.tolist() == [True, False] and len(judged.features) == 1
    assert judge_samples(images, labels, judge, None).metrics() == {"accuracy": 0.5}  # no strict judge, no figure
    assert over_seeds([judged, judge_samples(torch.zeros(2, 3, 64, 64), labels, judge, judge)]) == pytest.approx({
        "accuracy": 0.75, "accuracy_std": 0.25, "exact_accuracy": 0.75, "exact_accuracy_std": 0.25,
        "extra_objects": 0.0, "extra_objects_std": 0.0, "missing_objects": 0.25, "missing_objects_std": 0.25})


def test_the_count_head_sits_beside_the_course_format(tmp_path):
    """The course's loader (resnet18, Sequential(Linear(512, 24), Sigmoid()), load_state_dict(ckpt["model"]))
    loads a strict checkpoint unchanged; ours reads the count head beside it."""
    torch.manual_seed(0)
    model, head = build_resnet(), build_count_head()
    save_evaluator(model, tmp_path / "strict.pth", head)
    course = torchvision.models.resnet18(weights=None)
    course.fc = nn.Sequential(nn.Linear(512, 24), nn.Sigmoid())
    course.load_state_dict(torch.load(tmp_path / "strict.pth")["model"])
    ours = load_evaluator(tmp_path / "strict.pth")
    assert ours.strict and not load_evaluator(_course_only(tmp_path, model)).strict
    x = torch.randn(3, 3, 64, 64)
    course.eval()
    with torch.no_grad():
        assert torch.allclose(course(x), ours.predict(x), atol=1e-6)
        layer2 = nn.Sequential(*list(model.eval().children())[:-4])(x)
        layer3 = model.layer3(layer2)
        centre_logits = head.eval()(layer2, layer3, model.layer4(layer3))
    expected = torch.sigmoid(centre_logits).sum((2, 3))
    assert torch.equal(ours.counts(x), (expected >= 0.5).long() + (expected >= 1.35).long() + (expected >= 2.5).long())
    torch.save({"model": model.state_dict(), "counts": {"mix.weight": torch.zeros(3, 3)}}, tmp_path / "bad.pth")
    with pytest.raises(UserError, match="bad.pth: weights do not fit the strict judge's count head"):
        load_evaluator(tmp_path / "bad.pth")


def _course_only(tmp_path, model):
    save_evaluator(model, tmp_path / "course.pth")
    return tmp_path / "course.pth"


def test_scenes_that_repeat_labels_teach_counting_and_leave_plain_roots_as_they_were():
    plain, _ = make_splits(1000, 200, objects=5)
    repeating, _ = make_splits(1000, 200, objects=5, repeats=0.5)
    assert all(len(set(scene)) == 5 for scene in plain)
    changed = [i for i, (a, b) in enumerate(zip(plain, repeating)) if a != b]
    assert 70 <= len(changed) <= 130 and all(len(set(repeating[i])) < 5 for i in changed)
    assert all(repeating[i] == plain[i] for i in range(200) if i not in changed)
    assert make_splits(0, 50)[0] == make_splits(0, 50, repeats=0.0)[0]  # the generator's roots never repeat


def test_a_repeating_root_counts_its_objects(tmp_path):
    root = write_root(tmp_path / "r", scenes=12, seed=3, objects=4, repeats=1.0, workers=1, progress=False)
    data = load_train(root, image_size=32, cache_dir=tmp_path)
    table = json.loads((root / "train.json").read_text())
    assert data.counts.max() >= 2 and torch.equal(data.counts.clamp(max=1).float(), data.labels)
    for name, counts in zip(data.names, data.counts):
        assert int(counts.sum()) == len(table[name])


def test_every_kind_of_held_out_scene_holds_what_it_says():
    for kind, asked, drawn in kinds_scenes(seed=7, per_kind=40):
        assert 1 <= len(asked) <= 3 and len(set(asked)) == len(asked)
        extra = sorted(set(drawn) - set(asked)) or [a for a in asked if drawn.count(a) > 1]
        missing = [a for a in asked if a not in drawn]
        if kind == "correct":
            assert drawn == asked
        elif kind == "duplicated":
            assert len(drawn) == len(asked) + 1 and not missing and len(extra) == 1 and extra[0] in asked
        elif kind == "extra":
            assert len(drawn) == len(asked) + 1 and not missing and extra[0] not in asked
        else:
            assert len(drawn) == len(asked) - 1 and len(missing) == 1
    assert {kind for kind, _, _ in kinds_scenes(seed=7, per_kind=1)} == set(KINDS)


def test_the_kinds_root_renders_one_image_per_scene(tmp_path):
    root = write_kinds_root(tmp_path / "k", per_kind=2, workers=1, progress=False)
    drawn, asked, kinds = (json.loads((root / f).read_text()) for f in ("train.json", "asked.json", "kinds.json"))
    assert list(drawn) == list(asked) == list(kinds) and len(drawn) == 2 * len(KINDS)
    assert all((root / "iclevr" / name).is_file() for name in drawn)
    assert all(label in LABELS for labels in drawn.values() for label in labels)


def test_grids_mark_each_tile_with_its_verdict():
    images = torch.zeros(4, 3, 32, 32)
    verdicts = scene_verdicts(torch.tensor([[1, 0], [1, 1], [0, 0], [0, 1]]), torch.tensor([[1., 0], [1, 0], [1, 0],
                                                                                              [1, 0]]))
    grid = labelled_grid(images, [["red cube"]] * 4, nrow=4, verdicts=verdicts)
    colours = {colour for colour, _ in VERDICT_COLOURS.values()}
    found = {pixel for _, pixel in grid.getcolors(1 << 16)} & colours
    assert found == colours  # exact, extra, missing, both: a frame of each
    plain = labelled_grid(images, [["red cube"]] * 4, nrow=4)
    assert not {pixel for _, pixel in plain.getcolors(1 << 16)} & colours


def test_which_judge_a_run_gets(tmp_path, tiny_root, capsys, monkeypatch):
    """Ours for a synthetic root; a user's own without a count head: ours where it is cached for the root, else
    no strict figure and one notice; a real-format root without repeats: none."""
    from lab import evaluator_cache, evaluator_training
    monkeypatch.setitem(evaluator_training.RECIPE, "extra_scenes", 10)
    ours = load_evaluator(_course_only(tmp_path, build_resnet()))
    assert strict_judge_for(tiny_root, ours) is ours  # ours for a synthetic root: strict when it has trained
    theirs = tmp_path / "course.pth"
    assert strict_judge_for(tiny_root, ours, theirs) is None
    assert "no strict figures" in capsys.readouterr().err
    cached = evaluator_cache.default_evaluator_path(tiny_root)
    cached.parent.mkdir(parents=True, exist_ok=True)
    save_evaluator(build_resnet(), cached, build_count_head())
    assert strict_judge_for(tiny_root, ours, theirs).strict
    real = tmp_path / "real"
    real.mkdir()
    (real / "train.json").write_text("{}")
    assert strict_judge_for(real, ours) is None
    assert "is no synthetic root" in capsys.readouterr().err


@pytest.fixture
def strict_evaluator(tmp_path):
    torch.manual_seed(0)
    save_evaluator(build_resnet(), tmp_path / "strict.pth", build_count_head())
    return tmp_path / "strict.pth"


def test_a_run_logs_both_judges_and_can_select_by_exact_scenes(tiny_experiment, strict_evaluator, capsys):
    from run_experiment import main
    assert main([str(tiny_experiment), "--set", f"eval.evaluator={strict_evaluator}",
                 "--set", "eval.select_by=val_exact_accuracy"]) == 0
    run = mlflow.search_runs(experiment_names=["tiny"], output_format="list")[0]
    for key in ("val_accuracy", "val_exact_accuracy", "val_extra_objects", "val_missing_objects"):
        assert mlflow_key(key) in run.data.metrics and mlflow_key(f"{key}_std") in run.data.metrics
    for split in ("test", "new_test", "heldout_test"):
        assert {f"{split}_accuracy", f"{split}_exact_accuracy", f"{split}_exact_accuracy_std",
                f"{split}_extra_objects", f"{split}_missing_objects"} <= set(run.data.metrics)
    history = MlflowClient().get_metric_history(run.info.run_id, mlflow_key("val_exact_accuracy"))
    best = max(history, key=lambda m: (m.value, -m.step))
    assert run.data.metrics["best_val_exact_accuracy"] == best.value
    assert run.data.metrics["nonfinite_samples"] == 0
    assert "exact scenes" in capsys.readouterr().out


def test_selecting_by_exact_scenes_needs_a_strict_judge(tiny_experiment, capsys):
    from run_experiment import main
    assert main([str(tiny_experiment), "--set", "eval.select_by=val_exact_accuracy"]) == 1
    assert "eval.select_by: val_exact_accuracy needs a strict judge" in capsys.readouterr().err
    assert mlflow.search_runs(experiment_names=["tiny"], output_format="list") == []


def test_counts_step_where_the_thresholds_say():
    """Half an object is one, a second is counted from 1.35, and anything from 2.5 is '3 or more'."""
    from lab.eval import counted
    expected = torch.tensor([0.2, 0.6, 1.3, 1.4, 2.0, 2.6, 7.0])
    logits = torch.logit(expected / 64).view(1, -1, 1, 1).expand(1, -1, 8, 8)  # spread evenly over 64 cells
    assert counted(logits).tolist() == [[0, 1, 1, 2, 2, 3, 3]]
    assert counted(logits, steps=(0.5, 1.5, 2.5)).tolist() == [[0, 1, 1, 1, 2, 3, 3]]


def test_the_threshold_scan_prints_a_row_per_step(tmp_path, capsys):
    """`python -m lab.eval thresholds` scores every kind at each 1-to-2 step; an evaluator without counts is one
    line."""
    from lab.evaluator_cli import main
    torch.manual_seed(0)
    save_evaluator(build_resnet(), tmp_path / "strict.pth", build_count_head())
    assert main(["thresholds", str(tmp_path / "strict.pth"), "--scenes", "2", "--two-at", "1.35", "1.5"]) == 0
    rows = capsys.readouterr().out.splitlines()[2:]
    assert [row.split()[0] for row in rows] == ["1.350", "1.500"]
    assert all(len(row.split()) == 9 for row in rows)  # the step, then 4 kinds at 2 resolutions
    save_evaluator(build_resnet(), tmp_path / "course.pth")
    assert main(["thresholds", str(tmp_path / "course.pth"), "--scenes", "2"]) == 1
    assert capsys.readouterr().err.strip().endswith("course.pth: has no count head (not a strict judge)")
