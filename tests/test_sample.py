"""Drawing from a checkpoint (`python -m lab.sample`), the pipeline others load, and a real folder made ready
(`python -m lab.data prepare`): every mode on a tiny trained checkpoint, the accuracy of the PNGs as written,
the save/load round trip, and each bad input in one line with nothing written."""
import json
import shutil
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
import torchvision
from mlflow.tracking import MlflowClient
from PIL import Image
from torch import nn

from lab.eval import build_count_head, build_resnet, course_accuracy, save_evaluator

SHARED = Path(__file__).resolve().parent.parent.parent / "shared" / "iclevr"


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_root):
    """A tiny run trained once for the module: its folder, best.pt, MLflow run id, store and strict evaluator."""
    from run_experiment import main
    from tests.conftest import EXPERIMENTS, TINY
    folder = tmp_path_factory.mktemp("trained")
    torch.manual_seed(0)
    save_evaluator(build_resnet(), folder / "strict.pth", build_count_head())
    config = folder / "tiny.yaml"
    config.write_text(TINY.format(base=EXPERIMENTS / "base.yaml", root=tiny_root, evaluator=folder / "strict.pth"))
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(folder)
        patch.setenv("MLFLOW_TRACKING_URI", uri)
        assert main([str(config), "--set", "train.epochs=2", "--set", "eval.final_seeds=1"]) == 0
        run_id = mlflow.search_runs(experiment_names=["tiny"], output_format="list")[0].info.run_id
    return {"folder": folder, "best": folder / "runs" / "tiny" / "best.pt", "run_id": run_id, "uri": uri,
            "root": tiny_root, "evaluator": folder / "strict.pth"}


def sample(*args):
    from lab.sample import main
    return main([str(a) for a in args])


def course_eval(evaluator_path, pngs, labels):
    """The course's evaluation_model, as its evaluator.py builds it, on PNGs read as its users read them."""
    model = torchvision.models.resnet18(weights=None)
    model.fc = nn.Sequential(nn.Linear(512, 24), nn.Sigmoid())
    model.load_state_dict(torch.load(evaluator_path)["model"])
    model.eval()
    to_tensor = torchvision.transforms.Compose([torchvision.transforms.ToTensor(),
                                                torchvision.transforms.Normalize((0.5,) * 3, (0.5,) * 3)])
    images = torch.stack([to_tensor(Image.open(p).convert("RGB")) for p in pngs])
    with torch.no_grad():
        return course_accuracy(model(images), labels)


def test_label_files_and_a_prompt(trained, tmp_path, capsys):
    out = tmp_path / "out"
    test_json = trained["root"] / "test.json"
    assert sample(trained["best"], "--labels", test_json, "--prompt", "red sphere, cyan cylinder, cyan cube",
                  "--n", 4, "--seeds", 2, "--out", out) == 0
    printed = capsys.readouterr().out
    summary = json.loads((out / "summary.json").read_text())
    [figures] = summary["files"]
    assert set(figures["per_seed"]) == {"0", "1"} and summary["settings"]["strict_judge"]
    sets = json.loads(test_json.read_text())
    names = json.loads((trained["root"] / "objects.json").read_text())
    labels = torch.zeros(len(sets), 24)
    for row, labelled in enumerate(sets):
        labels[row, [names[n] for n in labelled]] = 1
    for seed in (0, 1):
        pngs = sorted((out / "test" / f"seed{seed}").glob("*.png"))
        assert len(pngs) == len(sets) and Image.open(pngs[0]).size == (64, 64)
        # the printed figure is the course's evaluator on the PNGs as written, pooled over the file
        assert figures["per_seed"][str(seed)]["accuracy"] == course_eval(trained["evaluator"], pngs, labels)
        assert {"exact_accuracy", "extra_objects", "missing_objects"} <= set(figures["per_seed"][str(seed)])
        for grid in ("grid", "labelled"):
            assert (out / "test" / f"{grid}_seed{seed}.png").is_file()
    assert figures["accuracy"] == pytest.approx(np.mean([figures["per_seed"][s]["accuracy"] for s in "01"]))
    prompt = out / "prompt0"
    assert len(list((prompt / "images").glob("*.png"))) == 4
    strip = Image.open(prompt / "denoising.png")
    assert strip.width > 10 * 64 > strip.height  # one row of 10 frames, titled
    assert f"{test_json}: accuracy {figures['accuracy']:.4f}" in printed and f"written to {out}" in printed
    assert not list(tmp_path.glob(".out.partial*"))


def test_a_run_id_draws_its_best_checkpoint_and_logs_to_it(trained, tmp_path, monkeypatch, capsys):
    """A run id as the checkpoint; a bare label-file name is the run's own data root's file."""
    out = tmp_path / "out"
    monkeypatch.chdir(tmp_path)
    assert sample(f"runs:/{trained['run_id']}", "--tracking-uri", trained["uri"], "--labels",
                  "new_test.json", "--seeds", 1, "--out", out, "--log") == 0
    assert json.loads((out / "summary.json").read_text())["files"][0]["label_sets"] == \
        len(json.loads((trained["root"] / "new_test.json").read_text()))
    run = MlflowClient(trained["uri"]).get_run(trained["run_id"])
    assert "sample/new_test_accuracy" in run.data.metrics and "sample/new_test_exact_accuracy" in run.data.metrics
    logged = {a.path for a in MlflowClient(trained["uri"]).list_artifacts(trained["run_id"], "sample")}
    assert {"sample/labelled_seed0.png", "sample/summary.json"} <= logged
    assert sample(trained["run_id"], "--tracking-uri", trained["uri"], "--prompt", "red sphere", "--n", 1,
                  "--out", tmp_path / "again") == 0


def test_the_pipeline_saves_and_loads_back_bitwise(trained, tmp_path, capsys):
    from lab import load_pipeline
    pipe = load_pipeline(trained["best"])
    first = pipe(["red sphere", "cyan cube"], num_images=3, seed=5, output_type="pt")
    images = pipe("red sphere, cyan cube", num_images=3, seed=5)
    assert len(images) == 3 and images[0].size == (32, 32)
    pipe.save_pretrained(tmp_path / "pipe")
    assert {"model_index.json", "model", "scheduler", "experiment.yaml"} <= {p.name for p in (tmp_path / "pipe").iterdir()}
    again = load_pipeline(tmp_path / "pipe")
    assert torch.equal(again(["red sphere", "cyan cube"], num_images=3, seed=5, output_type="pt"), first)
    assert sample(tmp_path / "pipe", "--prompt", "red sphere", "--n", 2, "--out", tmp_path / "drawn") == 0


@pytest.mark.parametrize("case", ["unknown_prompt_label", "label_file_entry", "not_a_generator", "other_evaluator",
                                  "missing_run", "no_such_file"])
def test_bad_input_is_one_line_and_writes_nothing(case, trained, tmp_path, capsys):
    out = tmp_path / "out"
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([["red sphere"], ["red sphere", "pink cube"]]))
    save_evaluator(build_resnet(10), tmp_path / "other.pth")
    args, expected = {
        "unknown_prompt_label": ([trained["best"], "--prompt", "red sphear, cyan cube"],
                                 "labels: unknown label 'red sphear' (closest: red sphere"),
        "label_file_entry": ([trained["best"], "--labels", bad], f"{bad}: entry 1: label 'pink cube' is not in"),
        "not_a_generator": ([trained["evaluator"], "--prompt", "red sphere"], "not a generator checkpoint"),
        "other_evaluator": ([trained["best"], "--prompt", "red sphere", "--evaluator", tmp_path / "other.pth"],
                            "other.pth: weights do not fit resnet18"),
        "missing_run": (["0" * 32, "--tracking-uri", trained["uri"], "--prompt", "red sphere"], "no such MLflow run"),
        "no_such_file": ([tmp_path / "nowhere.pt", "--prompt", "red sphere"], "no such checkpoint file"),
    }[case]
    assert sample(*args, "--out", out) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and expected in err, err
    assert not out.exists() and not list(tmp_path.glob(".out.partial*"))


def test_prepare_checks_a_real_folder_and_holds_val_out_of_training(tiny_root, tmp_path, capsys):
    from lab.data.__main__ import main
    from lab.data.iclevr import load_train
    from lab.data.prepare import prepare_root
    root = tmp_path / "real"
    shutil.copytree(tiny_root, root)
    for name in ("synthetic.json", "val.json", "heldout_test.json", "heldout_pairs.json"):
        (root / name).unlink()
    assert main(["prepare", str(root)]) == 1  # 20 scenes hold too few label sets for 64
    assert "val.json needs" in capsys.readouterr().err
    report = prepare_root(root, sizes=(2, 3, 3))
    val = json.loads((root / "val.json").read_text())
    tests = {frozenset(s) for n in ("test.json", "new_test.json") for s in json.loads((root / n).read_text())}
    assert len(val) == 8 and not {frozenset(s) for s in val} & tests
    held = json.loads((root / "val_holdout.json").read_text())
    data = load_train(root, image_size=32, cache_dir=tmp_path)
    assert held["excluded_images"] and not set(held["excluded_images"]) & set(data.names)
    assert len(data.names) == 60 - len(held["excluded_images"]) and "held out of training" in report
    (root / "iclevr" / data.names[0]).write_bytes(b"not a png")
    assert main(["prepare", str(root)]) == 1
    assert f"{data.names[0]}: image failed to decode" in capsys.readouterr().err


@pytest.mark.skipif(not SHARED.is_dir(), reason="the course's label files are beside the checkout in CI")
def test_prepare_on_the_course_label_files(tmp_path):
    """The real train.json, test.json and new_test.json (with stand-in images): 64 validation sets, none a test set."""
    from lab.data.prepare import prepare_root
    root = tmp_path / "iclevr-root"
    (root / "iclevr").mkdir(parents=True)
    for name in ("objects.json", "train.json", "test.json", "new_test.json"):
        shutil.copy(SHARED / name, root / name)
    for image in json.loads((root / "train.json").read_text()):
        (root / "iclevr" / image).touch()
    report = prepare_root(root, check=lambda paths: None)  # the images' names only: decoding 18,009 is slow
    assert "18009 training images" in report and len(json.loads((root / "val.json").read_text())) == 64


def test_a_flow_matching_transformer_pipeline_saves_and_loads_back(tmp_path):
    """The pipeline keeps what sampling needs beyond the weights: the flow's scheduler, the guidance interval and
    the model's self-conditioning."""
    from lab import build, load_pipeline
    from lab.config import load_config
    from lab.pipeline import pipeline_from_model
    from tests.conftest import EXPERIMENTS
    config = load_config(EXPERIMENTS / "ablations" / "objective_flow_matching.yaml", [
        "data.image_size=32", "model.unet=dit", "model.conditioning=cross_attn", "model.patch_size=2",
        "model.overrides={num_layers: 2}", "model.self_conditioning=true", "eval.guidance_interval=[0.0, 0.5]",
        "eval.steps=3"])
    torch.manual_seed(0)
    pipe = pipeline_from_model(build.make_model(config), config)
    first = pipe(["red sphere", "cyan cube"], num_images=2, seed=1, output_type="pt")
    pipe.save_pretrained(tmp_path / "pipe")
    again = load_pipeline(tmp_path / "pipe")
    assert type(again.scheduler).__name__ == "FlowMatchEulerDiscreteScheduler"
    assert list(again.config.guidance_interval) == [0.0, 0.5] and again.model.config.self_conditioning
    assert torch.equal(again(["red sphere", "cyan cube"], num_images=2, seed=1, output_type="pt"), first)
