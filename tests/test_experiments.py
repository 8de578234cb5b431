"""Every experiment YAML runs through the real command line for two steps, shrunk, into a temporary MLflow
store; a tiny end-to-end run leaves a full MLflow record."""
import json
from pathlib import Path

import mlflow
import pytest
import torch
from mlflow.tracking import MlflowClient

from lab.checkpoints import load_checkpoint
from lab.config import flatten, load_config, read_yaml
from lab.tracking import metric_name, mlflow_key
from run_experiment import changes_nothing, main

EXPERIMENTS = Path(__file__).parent.parent / "experiments"
CONFIGS = sorted(EXPERIMENTS.rglob("*.yaml"))  # base, quickstart, every ablation, every sweep
# Shrunk the lightning-hydra way, by overrides: the tiny UNet at 32x32, two steps, one sampling seed, one test
# split, validation on new_test.json (32 label sets, half of val.json). A sweep searches some of these keys itself
# (sweep.space): those stay as the sweep draws them.
SHRINK = {"data.image_size": 32, "model.unet": "tiny", "train.batch_size": 4, "train.max_steps": 2,
          "train.log_every": 1, "eval.steps": 2, "eval.val_seeds": 1, "eval.final_seeds": 1,
          "eval.split": "new_test.json",
          "eval.test_splits": "[test.json]", "eval.heldout_split": "null", "diffusion.num_train_timesteps": 10}
SWEEP_SHRINK = {**SHRINK, "diffusion.num_train_timesteps": 100}  # eval.steps may be searched up to 100


@pytest.fixture
def shrunk(tiny_root, random_evaluator, tmp_path, monkeypatch):
    """--set overrides onto the tiny root, a random evaluator and a temporary MLflow store and run folder."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING", "false")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"

    def overrides(values, searched=()):
        values = {**values, "data.root": tiny_root, "eval.evaluator": random_evaluator, "tracking_uri": uri,
                  "output_dir": tmp_path / "runs"}
        return [f"{key}={value}" for key, value in values.items() if key not in searched]
    return overrides, MlflowClient(uri)


@pytest.mark.slow
@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(EXPERIMENTS)))
def test_every_experiment_file_runs_from_the_command_line(path, shrunk):
    overrides, client = shrunk
    shrink = SWEEP_SHRINK if "sweeps" in path.parts else SHRINK
    own = read_yaml(path)
    steps, base = own.get("eval", {}).get("steps"), own.get("base")
    if steps and base and "sweeps" not in path.parts and changes_nothing(*(
            load_config(p, [f"{k}={v}" for k, v in shrink.items()]) for p in (path, path.parent / base))):
        # shrunk to 2 sampling steps, a step-count ablation (DDIM-100 on base.yaml's DDIM-50) is its base
        shrink = {**{k: v for k, v in shrink.items() if k != "eval.steps"}, "diffusion.num_train_timesteps": steps}
    args = [arg for assignment in overrides(shrink) for arg in ("--set", assignment)]
    if "sweeps" not in path.parts:
        assert main([str(path), *args, "--device", "cpu"]) == 0
        config = load_config(path, args[1::2])
        runs = client.search_runs([client.get_experiment_by_name(config.experiment).experiment_id])
        assert len(runs) == 1 and runs[0].info.status == "FINISHED"
        # the run describes exactly the file's config, shrunk
        assert runs[0].data.params == {k: str(v) for k, v in flatten(config).items()}
        assert runs[0].data.tags["ablation"] == config.ablation and runs[0].data.tags["config_file"] == str(path)
        metrics = {metric_name(key) for key in runs[0].data.metrics}
        assert {"loss", "val_accuracy", "train_minutes", "best_val_accuracy", "test_accuracy"} <= metrics
        return
    from lab.sweeps.schema import load_sweep
    searched = set(load_sweep(path).spec.space)
    args = [arg for assignment in overrides(SWEEP_SHRINK, searched) for arg in ("--set", assignment)]
    assert main([str(path), *args, "--n-trials", "1", "--storage", "optuna.log", "--device", "cpu"]) == 0
    sweep = load_sweep(path, args[1::2])
    runs = client.search_runs([client.get_experiment_by_name(sweep.config.experiment).experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(runs) == 2 and len(parents) == 1 and parents[0].info.status == "FINISHED"
    trial, = [r for r in runs if r is not parents[0]]
    assert trial.data.tags["mlflow.parentRunId"] == parents[0].info.run_id and trial.info.status == "FINISHED"
    assert trial.data.tags["optuna_state"] == "COMPLETE" and "best_val_accuracy" in trial.data.metrics
    assert json.loads(trial.data.tags["optuna_params"]).keys() == searched


def test_the_transformer_backbone_trains_samples_and_scores(shrunk):
    """backbone_dit.yaml as the suite runs it, on a 2-block transformer (the shrunk configs use the tiny UNet)."""
    overrides, client = shrunk
    shrink = {**SHRINK, "model.unet": "dit", "model.width": 0.5, "model.overrides": "{num_layers: 2}"}
    args = [arg for assignment in overrides(shrink) for arg in ("--set", assignment)]
    assert main([str(EXPERIMENTS / "ablations" / "backbone_dit.yaml"), *args, "--device", "cpu"]) == 0
    run, = client.search_runs([client.get_experiment_by_name("iclevr-ablations").experiment_id])
    assert run.info.status == "FINISHED" and run.data.params["model.unet"] == "dit"
    assert {"val_accuracy", "best_val_accuracy", "test_accuracy"} <= {metric_name(k) for k in run.data.metrics}


def test_the_ema_length_is_chosen_after_training_on_validation(shrunk):
    """ema_chosen_after_training.yaml: the candidate EMAs train beside the main one (and resume with it), each is
    validated at the end, and best.pt is whichever scored highest on validation, checkpoints and candidates
    together, recording the candidate's length when one won."""
    overrides, client = shrunk
    args = [arg for assignment in overrides({**SHRINK, "train.max_steps": 4, "train.ema.decay": 0.9})
            for arg in ("--set", assignment)]
    assert main([str(EXPERIMENTS / "ablations" / "ema_chosen_after_training.yaml"), *args, "--device", "cpu"]) == 0
    run, = client.search_runs([client.get_experiment_by_name("iclevr-ablations").experiment_id])
    candidates = {length: run.data.metrics[f"ema_x{length}_val_accuracy"] for length in ("0.25", "0.5", "2", "4")}
    curve = [m.value for m in client.get_metric_history(run.info.run_id, mlflow_key("val_accuracy"))]
    folder = Path(run.data.tags["best_checkpoint"]).parent
    best = load_checkpoint(folder / "best.pt")
    assert best["val_metrics"]["val_accuracy"] == max(curve + list(candidates.values()))
    won = max(candidates.values()) > max(curve)
    assert ("ema_length" in best) == won == ("ema_length_chosen" in run.data.tags)
    latest = load_checkpoint(folder / "latest.pt")
    assert sorted(latest["candidate_emas"]) == ["0.25", "0.5", "2.0", "4.0"]
    assert latest["candidate_emas"]["0.5"]["decay"] == pytest.approx(1 - 0.1 / 0.5)
    # each length warms up over a ramp of its own, so the four are four different averages after 4 steps
    firsts = [latest["candidate_emas"][length]["shadow_params"][0] for length in ("0.25", "0.5", "2.0", "4.0")]
    assert all(not torch.equal(a, b) for i, a in enumerate(firsts) for b in firsts[i + 1:])


def test_every_seed_keeps_the_callers_tags(monkeypatch):
    """--seeds trains one run per seed; each carries the group tag and every tag its caller passed."""
    import run_experiment
    from lab import build, trainer
    seen = []
    monkeypatch.setattr(build, "prepare", lambda config, config_path, device=None, fresh=False: config)
    monkeypatch.setattr(trainer, "train", lambda config, **options: seen.append((config.run_name, options["extra_tags"])))
    run_experiment.run(load_config(EXPERIMENTS / "base.yaml"), "base.yaml", seeds=[0, 1, 2], extra_tags={"sweep": "x"})
    assert seen == [(f"base-seed{k}", {"group": "base", "sweep": "x"}) for k in range(3)]


@pytest.mark.slow
def test_tiny_run_end_to_end_in_mlflow(tiny_experiment, tmp_path, capsys):
    assert main([str(tiny_experiment)]) == 0
    printed = capsys.readouterr().out
    client = MlflowClient()
    runs = mlflow.search_runs(experiment_names=["tiny"], output_format="list")
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED" and run.info.run_id in printed
    params, tags = run.data.params, run.data.tags
    # the run page charts the curves in sections of their own, the one-number results after them
    assert {"training/loss", "validation/val_accuracy", "best_val_accuracy", "test_accuracy"} <= set(run.data.metrics)
    metrics = {metric_name(key): value for key, value in run.data.metrics.items()}
    assert params["model.unet"] == "tiny" and params["train.lr"] == "0.001" and params["eval.guidance_scale"] == "2.0"
    assert tags["ablation"] == "base" and tags["seed"] == "0" and tags["config_file"].endswith("tiny.yaml")
    # MLflow's standard metadata: the UI's "Created by" and "Source", the commit and whether the tree was dirty
    assert tags["mlflow.user"] and tags["mlflow.source.type"] == "LOCAL" and tags["mlflow.source.name"]
    assert len(tags["mlflow.source.git.commit"]) == 40 and tags["git_dirty"] in ("true", "false")
    experiment = client.get_experiment(run.info.experiment_id)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"  # opens as model training
    # the runs table's saved view, which the printed URL names: headline columns that the run has, best first
    view = json.loads(experiment.tags["mlflow.sharedViewState.headline"])
    assert f"#/experiments/{run.info.experiment_id}/runs?workflowType=machine_learning&viewStateShareKey=headline" in printed
    shown = [metric_name(column.split("`")[1]) for column in view["selectedColumns"] if column.startswith("metrics.")]
    assert shown[:3] == ["best_val_accuracy", "best_val_exact_accuracy", "test_accuracy"]
    assert set(shown) - {"best_val_exact_accuracy", "test_exact_accuracy", "new_test_exact_accuracy"} <= set(metrics)
    assert view["orderByKey"] == "metrics.`best_val_accuracy`" and view["orderByAsc"] is False
    # the run page's description: the headline figures, validation then each test split
    note = tags["mlflow.note.content"]
    assert "| validation (chose best.pt) |" in note and f"{metrics['test_accuracy']:.3f} ±" in note
    steps_per_epoch = 60 // 8
    loss = client.get_metric_history(run.info.run_id, mlflow_key("loss"))
    assert [m.step for m in loss] == list(range(2, 3 * steps_per_epoch + 1, 2)) + [3 * steps_per_epoch] * (3 * steps_per_epoch % 2)
    val = client.get_metric_history(run.info.run_id, mlflow_key("val_accuracy"))
    assert [m.step for m in val] == [2 * steps_per_epoch, 3 * steps_per_epoch]
    assert all(0 <= m.value <= 1 for m in val)
    # the binding errors beside best_val_accuracy are those of the validation that chose best.pt
    chosen = max(val, key=lambda m: (m.value, -m.step)).step
    for kind in ("wrong_colour", "wrong_shape", "both_wrong"):
        history = {m.step: m.value for m in client.get_metric_history(run.info.run_id, mlflow_key(f"val_{kind}"))}
        assert metrics[f"best_val_{kind}"] == pytest.approx(history[chosen])
    for key in ("loss_q1", "loss_q4", "lr", "images_per_s", "val_fd", "val_kid", "test_accuracy", "new_test_accuracy",
                "test_accuracy_std", "best_val_accuracy", "val_accuracy_std", "val_wrong_colour", "val_wrong_shape",
                "val_both_wrong", "heldout_test_accuracy"):  # the held-out pairs: scored by default on synthetic roots
        assert key in metrics, key
    artifacts = {a.path for folder in ("", "images", "checkpoints")
                 for a in client.list_artifacts(run.info.run_id, folder or None)}
    assert {"config.yaml", "checkpoints/best.pt"} <= artifacts
    # images logged with a key and a step (MLflow's images/<key>+step+<step>+...): the UI's step slider, which
    # opens at step 0: the untrained model's grid there, the final grids there alone (shown at once)
    images = {(Path(a).name.split("+")[0], int(Path(a).name.split("+")[2])) for a in artifacts
              if a.startswith("images/") and a.endswith(".png")}
    assert images == {("val_samples", 0), ("val_samples", 14), ("val_samples", 21), ("denoising_strip", 0),
                      ("denoising_strip", 14), ("denoising_strip", 21), ("test_samples", 0), ("new_test_samples", 0),
                      ("heldout_test_samples", 0)}
    # the saved view's chart cards: those grids first, captioned by the run's name, not by its params
    cards = {card["imageKeys"][0]: card for card in view["compareRunCharts"] if card["type"] == "IMAGE"}
    assert {key for key, _ in images} == set(cards)
    assert all(card["step"] == 0 and not card["showRunParams"] for card in cards.values())
    assert [section["name"] for section in view["compareRunSections"]][:3] == ["samples", "training", "validation"]
    assert Path("runs/tiny/best.pt").is_file() and Path("runs/tiny/latest.pt").is_file()
    # running the same command again does not train again
    assert main([str(tiny_experiment)]) == 0
    assert "holds a finished run" in capsys.readouterr().out
    assert len(mlflow.search_runs(experiment_names=["tiny"], output_format="list")) == 1


def test_a_time_budget_stops_then_validates_and_scores(tiny_experiment, capsys):
    """train.max_minutes (the CPU quickstart's budget) ends the run early, like a last step: the
    validation, the best checkpoint and the test scores still happen."""
    assert main([str(tiny_experiment), "--set", "train.max_minutes=0.0001"]) == 0
    assert "1 steps; best_val_accuracy" in capsys.readouterr().out
    run = mlflow.search_runs(experiment_names=["tiny"], output_format="list")[0]
    assert run.info.status == "FINISHED"
    assert [m.step for m in MlflowClient().get_metric_history(run.info.run_id, mlflow_key("val_accuracy"))] == [1]
    assert {"test_accuracy", "new_test_accuracy", "best_val_accuracy"} <= set(run.data.metrics)


def test_a_budget_spent_by_a_validation_ends_the_run_there(tiny_experiment, monkeypatch, capsys):
    """When an epoch's validation uses up the time budget, the run ends at that step: it does not train
    one step more only to validate again (the demo did, at steps 3,372 and 3,373)."""
    import time

    from lab import trainer
    validation = trainer.validate_and_keep_best

    def slow_validation(*args, **kwargs):
        time.sleep(7)  # more than the whole 6-second budget
        return validation(*args, **kwargs)
    monkeypatch.setattr(trainer, "validate_and_keep_best", slow_validation)
    assert main([str(tiny_experiment), "--set", "train.max_minutes=0.1", "--set", "eval.every_epochs=1"]) == 0
    run = mlflow.search_runs(experiment_names=["tiny"], output_format="list")[0]
    val = [m.step for m in MlflowClient().get_metric_history(run.info.run_id, mlflow_key("val_accuracy"))]
    assert len(val) == 1 and f"{val[0]} steps; best_val_accuracy" in capsys.readouterr().out


def test_a_validation_the_final_one_would_repeat_is_left_out(tiny_experiment, capsys):
    """An epoch's validation when the run ends within half a validation interval is left to the final one,
    which comes a few steps later (the demo validated at steps 3,372 and 3,448, 15 s of its budget)."""
    assert main([str(tiny_experiment), "--set", "train.max_steps=15", "--set", "eval.every_epochs=1"]) == 0
    assert "step 14: no validation, the final one follows" in capsys.readouterr().out
    run = mlflow.search_runs(experiment_names=["tiny"], output_format="list")[0]
    assert [m.step for m in MlflowClient().get_metric_history(run.info.run_id, mlflow_key("val_accuracy"))] == [7, 15]


def test_under_a_budget_the_final_validation_is_judged_at_the_last_epochs_pace(tiny_experiment, monkeypatch):
    """A first epoch that holds a GPU's compilation (here 7 steps of 30 s on the run's clock, then 1 s a step,
    against a 4-minute budget) no longer makes every later validation look within half an interval of the
    final one: on the H100 base.yaml left out its only one, 500 steps before the end."""
    from types import SimpleNamespace

    from lab import schedules, trainer
    now = [0.0]
    monkeypatch.setattr(schedules, "time", SimpleNamespace(perf_counter=lambda: now[0]))  # the run's clock only
    one_step = trainer.TrainStep.__call__

    def timed_step(self, i, step):
        now[0] += 30.0 if step <= 7 else 1.0
        return one_step(self, i, step)
    monkeypatch.setattr(trainer.TrainStep, "__call__", timed_step)
    assert main([str(tiny_experiment), "--set", "train.epochs=100", "--set", "train.max_minutes=4",
                 "--set", "eval.every_epochs=1"]) == 0
    run = mlflow.search_runs(experiment_names=["tiny"], output_format="list")[0]
    # 7 (210 s spent, 30 left) and 35 (238 s) are left to the final one at 37, when the budget is spent
    assert [m.step for m in MlflowClient().get_metric_history(run.info.run_id, mlflow_key("val_accuracy"))] == [14, 21, 28, 37]


@pytest.fixture
def evaluator_to_train(tiny_root, monkeypatch):
    """No evaluator cached for the tiny root: a small recipe of our own, its path and the threads before."""
    import torch

    from lab import evaluator_training
    from lab.evaluator_cache import default_evaluator_path
    if torch.get_num_threads() < 2:
        pytest.skip("the evaluator trains beside the generator only with 2 threads or more")
    monkeypatch.setitem(evaluator_training.RECIPE, "phases", [[32, 160, 1e-3]])
    monkeypatch.setitem(evaluator_training.RECIPE, "batch_size", 8)
    monkeypatch.setitem(evaluator_training.RECIPE, "extra_scenes", 0)
    path = default_evaluator_path(tiny_root)
    path.unlink(missing_ok=True)
    return path, torch.get_num_threads()


def test_an_evaluator_still_to_train_trains_beside_the_generator(tiny_experiment, evaluator_to_train, capfd):
    """Where the evaluator is still to be trained (a first run on a new machine), the generator starts at
    once on half of the threads while the evaluator trains in a child process on the other half: an
    epoch's validation before it is ready is kept and scored, at its own step, once it is; the last one waits
    for it, and the run gets all its threads back."""
    import torch
    path, threads = evaluator_to_train
    assert main([str(tiny_experiment), "--set", "eval.evaluator=null", "--set", "eval.every_epochs=1"]) == 0
    printed = capfd.readouterr().out  # the child's output too
    assert torch.get_num_threads() == threads
    assert f"on {threads - threads // 2} thread" in printed and "beside the generator's training" in printed
    assert json.loads(path.with_suffix(".json").read_text())["threads"] == threads - threads // 2
    run = mlflow.search_runs(experiment_names=["tiny"], output_format="list")[0]
    assert run.info.status == "FINISHED" and "test_accuracy" in run.data.metrics
    assert run.data.tags["machine"].endswith(f", {threads} torch threads")  # as it ended, not as it started
    val = [m.step for m in MlflowClient().get_metric_history(run.info.run_id, mlflow_key("val_accuracy"))]
    steps_per_epoch = 60 // 8
    assert sorted(val) == [steps_per_epoch, 2 * steps_per_epoch, 3 * steps_per_epoch]  # every epoch's validation
    minutes = [m.step for m in MlflowClient().get_metric_history(run.info.run_id, mlflow_key("train_minutes"))]
    assert sorted(minutes) == sorted(val)
    [evaluator_run] = mlflow.search_runs(experiment_names=["evaluator"], output_format="list")
    assert evaluator_run.info.status == "FINISHED"


def test_an_evaluator_in_training_is_shared_by_the_runs_of_one_process(tiny_root, evaluator_to_train, tmp_workdir):
    """A sweep's trials run in one process: when a trial fails while the evaluator trains beside it, the next
    trial waits for that same child instead of training a second evaluator; once written, it is the cache."""
    from lab.eval import Evaluator
    from lab.evaluator_cache import EvaluatorInTraining, ensure_evaluator
    path, threads = evaluator_to_train
    first = ensure_evaluator(tiny_root, beside=True)
    assert isinstance(first, EvaluatorInTraining) and ensure_evaluator(tiny_root, beside=True) is first
    assert isinstance(first.wait(), Evaluator) and path.is_file()
    assert isinstance(ensure_evaluator(tiny_root, beside=True), Evaluator)


def test_an_evaluator_that_fails_beside_the_generator_fails_the_run_in_one_line(tiny_experiment, evaluator_to_train,
                                                                                 tiny_root, monkeypatch, capfd):
    import torch

    from lab import evaluator_training
    from lab.evaluator_cache import default_evaluator_path
    _, threads = evaluator_to_train
    monkeypatch.setitem(evaluator_training.RECIPE, "batch_size", 0)  # the child's training raises
    path = default_evaluator_path(tiny_root)
    assert main([str(tiny_experiment), "--set", "eval.evaluator=null"]) == 1
    assert torch.get_num_threads() == threads and not path.exists()
    error = capfd.readouterr().err
    assert "ZeroDivisionError" in error  # the child's traceback
    assert error.strip().splitlines()[-1] == (
        f"error: {path}: the evaluator's training failed (exit code 1; its error is printed above)")
    [run] = mlflow.search_runs(experiment_names=["tiny"], output_format="list")
    assert run.info.status == "FAILED"


def test_auto_precision_is_bf16_where_the_device_computes_it_natively(monkeypatch):
    """mixed_precision auto: bf16 autocast on GPUs and on CPUs with native bf16 (AVX-512 BF16 or AMX), float32
    on CPUs that would emulate it; `no` and `bf16` are obeyed everywhere."""
    import torch

    from lab import build
    config = load_config(EXPERIMENTS / "quickstart.yaml")
    cpu = torch.device("cpu")
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    assert config.train.mixed_precision == "auto" and not build.uses_bf16(config, cpu)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True)
    assert build.uses_bf16(config, cpu)
    assert not build.uses_bf16(load_config(EXPERIMENTS / "quickstart.yaml", ["train.mixed_precision=no"]), cpu)
    assert build.uses_bf16(config, torch.device("cuda"))


def test_a_time_budget_anneals_the_learning_rate_to_zero_and_survives_a_resume(monkeypatch):
    """Under train.max_minutes the cosine follows the share of the budget spent (or of the steps, whichever is
    further), so a slow machine still ends at a learning rate of zero; a resumed run continues its budget."""
    import math

    import torch

    from lab import build, schedules
    now = [100.0]
    monkeypatch.setattr(schedules.time, "perf_counter", lambda: now[0])
    config = load_config(EXPERIMENTS / "quickstart.yaml", ["train.warmup_steps=0", "train.lr_schedule=cosine"])
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    clock = schedules.Clock(total_steps=1000, budget_minutes=1)
    schedule = build.make_lr_schedule(config, optimizer, clock)
    clock.start()
    lrs = []
    for step, seconds in ((1, 15), (2, 30), (3, 60)):
        now[0] = 100 + seconds
        optimizer.step()
        clock.tick(step)
        schedule.step()
        lrs.append(optimizer.param_groups[0]["lr"])
    assert lrs == pytest.approx([0.5 * (1 + math.cos(math.pi / 4)), 0.5, 0.0], abs=1e-9)
    assert clock.out_of_time
    resumed = schedules.Clock(total_steps=1000, budget_minutes=1)
    resumed.start(step=2, spent_s=30.0)  # what latest.pt held
    now[0] += 15
    resumed.tick(3)
    assert resumed.fraction == pytest.approx(0.75) and not resumed.out_of_time
    by_steps = schedules.Clock(total_steps=10)  # no budget: the share of the steps
    by_steps.tick(5)
    assert by_steps.fraction == 0.5 and not by_steps.out_of_time


def test_a_sampling_only_change_reuses_the_trained_run(tiny_experiment, capsys):
    """A config that trains exactly what a finished run trained (here: another guidance scale and sampler
    steps) samples that run's best.pt with its own sampler, as a run of its own tagged trained_by; a training
    change, or --fresh, trains."""
    assert main([str(tiny_experiment)]) == 0
    resample = [str(tiny_experiment), "--set", "run_name=tiny-cfg4", "--set", "eval.guidance_scale=4",
                "--set", "eval.steps=3"]
    assert main(resample) == 0
    assert "sampling its" in capsys.readouterr().out
    runs = {r.info.run_name: r for r in mlflow.search_runs(experiment_names=["tiny"], output_format="list")}
    trained, reused = runs["tiny"], runs["tiny-cfg4"]
    assert reused.data.tags["trained_by"] == trained.info.run_id and reused.info.status == "FINISHED"
    assert reused.data.tags["training_key"] == trained.data.tags["training_key"]
    assert reused.data.params["eval.guidance_scale"] == "4.0"
    assert mlflow_key("loss") not in reused.data.metrics  # nothing trained
    assert {"best_val_accuracy", mlflow_key("val_accuracy"), "test_accuracy",
            "heldout_test_accuracy"} <= set(reused.data.metrics)
    best_step = load_checkpoint(tiny_experiment.parent / "runs/tiny/best.pt")["step"]  # the weights it sampled
    assert [m.step for m in MlflowClient().get_metric_history(reused.info.run_id, mlflow_key("val_accuracy"))] == [best_step]
    assert main(resample) == 0  # a rerun: finished, nothing to do
    assert "holds a finished run" in capsys.readouterr().out
    assert main([str(tiny_experiment), "--set", "run_name=tiny-lr", "--set", "train.lr=2e-3"]) == 0
    assert main([str(tiny_experiment), "--set", "run_name=tiny-fresh", "--set", "eval.steps=3", "--fresh"]) == 0
    runs = {r.info.run_name: r for r in mlflow.search_runs(experiment_names=["tiny"], output_format="list")}
    assert "trained_by" not in runs["tiny-lr"].data.tags and mlflow_key("loss") in runs["tiny-lr"].data.metrics
    assert "trained_by" not in runs["tiny-fresh"].data.tags and mlflow_key("loss") in runs["tiny-fresh"].data.metrics


def test_a_resumed_train_step_keeps_its_emas_beside_the_model(tiny_experiment):
    """latest.pt loads on the CPU (map_location), so a resumed run's EMA weights must follow the model to its
    device: on a GPU the first EMA step after a resume met CPU tensors. Here a CPU checkpoint is loaded into a
    step that trains on the meta device (no GPU in CI), and every EMA must end there."""
    import torch

    from lab import build, trainer
    setup = build.prepare(load_config(tiny_experiment, ["train.ema.candidates=[2]"]), tiny_experiment, "cpu")
    step = trainer.TrainStep(setup)
    state = step.state_dict()
    step.device = torch.device("meta")
    step.load_state_dict(state)
    for ema in (step.opt.ema, *step.opt.candidate_emas.values()):
        assert {p.device.type for p in ema.shadow_params} == {"meta"}
