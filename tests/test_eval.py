"""The evaluator: the course's accuracy rule, its checkpoint format, the error breakdowns."""

import pytest
import torch

from lab.eval import (binding_errors, build_resnet, course_accuracy, frechet_distance, load_evaluator,
                      per_label_report, save_checkpoint)
from lab.errors import UserError

NAMES = ["red cube", "blue cube", "red sphere", "blue sphere"]


def course_reference(out, onehot_labels):
    """The course's own compute_acc, verbatim in behaviour."""
    acc = total = 0
    for i in range(out.size(0)):
        k = int(onehot_labels[i].sum().item())
        total += k
        outv, outi = out[i].topk(k)
        lv, li = onehot_labels[i].topk(k)
        for j in outi:
            if j in li:
                acc += 1
    return acc / total


def test_accuracy_rule_hand_computed():
    labels = torch.tensor([[1., 0, 0, 0], [1, 1, 0, 0], [0, 1, 1, 1]])
    perfect = labels * 0.9 + 0.05
    assert course_accuracy(perfect, labels) == 1.0
    probs = torch.tensor([[.9, .8, .1, .1],     # k=1: top-1 {0} -> 1 hit
                          [.9, .1, .8, .1],     # k=2: top-2 {0, 2} -> 1 hit
                          [.9, .1, .8, .7]])    # k=3: top-3 {0, 2, 3} -> 2 hits
    assert course_accuracy(probs, labels) == pytest.approx(4 / 6)
    # only the ranking matters, never a threshold
    assert course_accuracy(probs * 0.01, labels) == pytest.approx(4 / 6)


def test_accuracy_matches_the_course_code_on_random_cases():
    gen = torch.Generator().manual_seed(0)
    for _ in range(20):
        labels = torch.zeros(16, 24)
        for row in labels:
            row[torch.randperm(24, generator=gen)[:int(torch.randint(1, 4, (1,), generator=gen))]] = 1
        probs = torch.rand(16, 24, generator=gen)
        assert course_accuracy(probs, labels) == pytest.approx(course_reference(probs, labels))


def test_binding_errors_and_per_label():
    labels = torch.tensor([[1., 0, 0, 0], [1, 0, 0, 0], [1, 0, 0, 0], [0, 0, 0, 1]])
    probs = torch.tensor([[.1, .9, .0, .0],     # blue cube for red cube: right shape, wrong colour
                          [.1, .0, .9, .0],     # red sphere for red cube: right colour, wrong shape
                          [.1, .0, .0, .9],     # blue sphere for red cube: both wrong
                          [.0, .0, .0, .9]])    # right
    assert binding_errors(probs, labels, NAMES) == {"wrong_colour": 1, "wrong_shape": 1, "both_wrong": 1, "misses": 3}
    table = per_label_report(probs, labels, NAMES).set_index("label")
    assert table.loc["red cube", "recall"] == 0 and table.loc["blue sphere", "precision"] == 0.5
    assert table.loc["blue sphere", "recall"] == 1 and table.loc["red cube", "support"] == 3


def test_frechet_distance():
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(2000, 8, generator=gen)
    assert frechet_distance(a, a) == pytest.approx(0, abs=1e-6)
    assert frechet_distance(a, a + 2) == pytest.approx(8 * 4, rel=1e-6)
    b = torch.randn(2000, 8, generator=gen) * 3
    assert frechet_distance(a, b) > 8 * 3


def test_checkpoint_round_trip_in_the_course_format(tmp_path):
    model = build_resnet()
    assert isinstance(model.fc[0], torch.nn.Linear) and isinstance(model.fc[1], torch.nn.Sigmoid)
    path = tmp_path / "checkpoint.pth"
    save_checkpoint(model, path)
    state = torch.load(path, weights_only=True)
    assert list(state) == ["model"] and "fc.0.weight" in state["model"] and state["model"]["fc.0.weight"].shape == (24, 512)
    # the course loads it as `resnet18.load_state_dict(torch.load(path)['model'])`
    course = build_resnet()
    course.load_state_dict(torch.load(path, weights_only=True)["model"])
    x = torch.rand(4, 3, 64, 64) * 2 - 1
    evaluator = load_evaluator(path)
    assert torch.allclose(evaluator.predict(x), course.eval()(x))
    assert evaluator.features(x).shape == (4, 512)
    assert list(tmp_path.iterdir()) == [path]  # nothing half-written left beside it


class Payload:
    pass


def test_bad_evaluator_checkpoints(tmp_path):
    with pytest.raises(UserError, match="missing.pth: evaluator checkpoint not found"):
        load_evaluator(tmp_path / "missing.pth")
    evil = tmp_path / "evil.pth"
    torch.save({"model": build_resnet().state_dict(), "extra": Payload()}, evil)
    with pytest.raises(UserError, match="evil.pth: refused: the evaluator checkpoint carries pickled objects"):
        load_evaluator(evil)
    other = tmp_path / "other.pth"
    torch.save({"model": build_resnet(10).state_dict()}, other)
    with pytest.raises(UserError, match="other.pth: weights do not fit resnet18 with a 24-label head"):
        load_evaluator(other)
    bare = tmp_path / "bare.pth"
    torch.save(build_resnet().state_dict(), bare)
    with pytest.raises(UserError, match=r"bare.pth: expected the course format"):
        load_evaluator(bare)
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="junk.pth: not a readable evaluator checkpoint"):
        load_evaluator(junk)


def test_augment_keeps_colours_and_moves_objects_by_at_most_4_pixels():
    from lab.eval import augment
    gen = torch.Generator().manual_seed(0)
    x = torch.full((8, 3, 64, 64), -0.2)
    x[:, 0, 20:30, 10:20] = 1.0  # a red square left of the centre
    out = augment(x, gen)
    assert out.shape == x.shape and out.is_contiguous(memory_format=torch.channels_last)
    assert (out[:, 1:].mean() + 0.2).abs() < 0.01  # colours untouched: only a little zero-mean noise
    for image in out:
        rows, cols = torch.nonzero(image[0] > 0.6, as_tuple=True)
        row, col = rows.float().mean(), cols.float().mean()
        assert abs(row - 24.5) <= 4 and min(abs(col - 14.5), abs(col - 48.5)) <= 4  # shifted, maybe mirrored
    assert augment(x, gen, size=48).shape == (8, 3, 48, 48)  # the early, progressively resized epochs


def test_train_evaluator_writes_the_course_format_and_learns(tiny_root, tmp_path, capsys):
    from lab.eval import main, train_evaluator
    log = []
    out = train_evaluator(tiny_root, tmp_path / "ours.pth", epochs=4, batch_size=16, lr=3e-3, log=log.append)
    assert [line.split(":")[0] for line in log] == [f"evaluator epoch {e}/4" for e in (1, 2, 3, 4)]
    losses = [float(line.split("loss ")[1].split()[0]) for line in log]
    assert losses[-1] < losses[0]  # 2 epochs at 48x48, then 2 at 64x64
    state = torch.load(out, weights_only=True)
    assert list(state) == ["model"] and state["model"]["fc.0.weight"].shape == (24, 512)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ours.pth"]
    # the check command renders fresh scenes and prints the figure a user reads
    assert main(["check", str(out), "--scenes", "4"]) == 0
    printed = capsys.readouterr().out
    assert "held-out accuracy:" in printed and "(12 freshly rendered images)" in printed
    assert "binding errors of the misses" in printed
