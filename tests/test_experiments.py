"""Every experiment YAML trains a step and samples; a tiny end-to-end run leaves a full MLflow record."""
from pathlib import Path

import mlflow
import pytest
import torch
from mlflow.tracking import MlflowClient

from lab.config import load_config
from lab.model_zoo import build_model
from lab.schedules import make_noise_scheduler, sample
from lab.trainer import diffusion_loss

from tests.conftest import EXPERIMENTS, TINY  # noqa: F401 (TINY: shared with other test files)
CONFIGS = sorted(p for p in EXPERIMENTS.rglob("*.yaml") if "sweeps" not in p.parts)


@pytest.mark.slow
@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(EXPERIMENTS)))
def test_every_config_trains_a_step_and_samples(path):
    """The real architecture of each file, shrunk the lightning-hydra way: 32x32, 10 timesteps, batch 2."""
    config = load_config(path, ["data.image_size=32", "diffusion.num_train_timesteps=10"])
    torch.manual_seed(0)
    model = build_model(config.model.unet, config.model.conditioning, image_size=32, **config.model.overrides)
    scheduler = make_noise_scheduler(config.diffusion.beta_schedule, 10, config.diffusion.prediction_type)
    labels = torch.zeros(2, 24)
    labels[0, [1, 9]] = labels[1, 20] = 1
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    before = [p.detach().clone() for p in model.parameters()]
    loss, t = diffusion_loss(model, scheduler, torch.rand(2, 3, 32, 32) * 2 - 1, labels,
                             torch.Generator().manual_seed(0), max(config.model.cfg_dropout, 0.5))
    loss.mean().backward()
    optimizer.step()
    assert torch.isfinite(loss).all() and t.shape == (2,)
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    images = sample(model, labels, train_scheduler=scheduler, sampler=config.eval.sampler, steps=2,
                    guidance_scale=config.eval.guidance_scale, generator=torch.Generator().manual_seed(0), image_size=32)
    assert images.shape == (2, 3, 32, 32) and torch.isfinite(images).all() and images.abs().max() <= 1


@pytest.mark.slow
def test_tiny_run_end_to_end_in_mlflow(tiny_experiment, tmp_path, capsys):
    from run_experiment import main
    assert main([str(tiny_experiment)]) == 0
    printed = capsys.readouterr().out
    client = MlflowClient()
    runs = mlflow.search_runs(experiment_names=["tiny"], output_format="list")
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED" and run.info.run_id in printed
    params, tags, metrics = run.data.params, run.data.tags, run.data.metrics
    assert params["model.unet"] == "tiny" and params["train.lr"] == "0.001" and params["eval.guidance_scale"] == "2.0"
    assert tags["ablation"] == "base" and tags["seed"] == "0" and tags["config_file"].endswith("tiny.yaml")
    # MLflow's standard metadata: the UI's "Created by" and "Source", the commit and whether the tree was dirty
    assert tags["mlflow.user"] and tags["mlflow.source.type"] == "LOCAL" and tags["mlflow.source.name"]
    assert len(tags["mlflow.source.git.commit"]) == 40 and tags["git_dirty"] in ("true", "false")
    experiment = client.get_experiment(run.info.experiment_id)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"  # opens as model training
    steps_per_epoch = 60 // 8
    loss = client.get_metric_history(run.info.run_id, "loss")
    assert [m.step for m in loss] == list(range(2, 3 * steps_per_epoch + 1, 2)) + [3 * steps_per_epoch] * (3 * steps_per_epoch % 2)
    val = client.get_metric_history(run.info.run_id, "val_accuracy")
    assert [m.step for m in val] == [2 * steps_per_epoch, 3 * steps_per_epoch]
    assert all(0 <= m.value <= 1 for m in val)
    for key in ("loss_q1", "loss_q4", "lr", "images_per_s", "val_fd", "val_kid", "test_accuracy", "new_test_accuracy",
                "test_accuracy_std", "best_val_accuracy", "val_accuracy_std", "val_wrong_colour", "val_wrong_shape",
                "val_both_wrong", "heldout_test_accuracy"):  # the held-out pairs: scored by default on synthetic roots
        assert key in metrics, key
    artifacts = {a.path for folder in ("", "images", "checkpoints")
                 for a in client.list_artifacts(run.info.run_id, folder or None)}
    assert {"config.yaml", "checkpoints/best.pt"} <= artifacts
    # images logged with a key and a step (MLflow's images/<key>+step+<step>+...): the UI's step slider
    images = {(Path(a).name.split("+")[0], int(Path(a).name.split("+")[2])) for a in artifacts
              if a.startswith("images/") and a.endswith(".png")}
    assert images == {("val_samples", 14), ("val_samples", 21), ("denoising_strip", 14), ("denoising_strip", 21),
                      ("test_samples", 21), ("new_test_samples", 21), ("heldout_test_samples", 21)}
    assert Path("runs/tiny/best.pt").is_file() and Path("runs/tiny/latest.pt").is_file()
    # running the same command again does not train again
    assert main([str(tiny_experiment)]) == 0
    assert "holds a finished run" in capsys.readouterr().out
    assert len(mlflow.search_runs(experiment_names=["tiny"], output_format="list")) == 1


def test_a_time_budget_stops_then_validates_and_scores(tiny_experiment, capsys):
    """train.max_minutes (the CPU quickstart's budget) ends the run early, like a last step: the
    validation, the best checkpoint and the test scores still happen."""
    from run_experiment import main
    assert main([str(tiny_experiment), "--set", "train.max_minutes=0.0001"]) == 0
    assert "1 steps; best_val_accuracy" in capsys.readouterr().out
    run = mlflow.search_runs(experiment_names=["tiny"], output_format="list")[0]
    assert run.info.status == "FINISHED"
    assert [m.step for m in MlflowClient().get_metric_history(run.info.run_id, "val_accuracy")] == [1]
    assert {"test_accuracy", "new_test_accuracy", "best_val_accuracy"} <= set(run.data.metrics)
