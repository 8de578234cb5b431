"""A loss that turns NaN stops training at that step, fails the MLflow run and keeps the good checkpoint."""
import mlflow
import pytest
import torch

from lab import build
from lab.checkpoints import load_checkpoint
from lab.tracking import mlflow_key


@pytest.mark.slow
def test_nan_loss_stops_at_its_step(tiny_experiment, tmp_path, monkeypatch, capsys):
    real_loss, calls = build.training_loss, {"n": 0}

    def poisoned(*args, **kwargs):
        calls["n"] += 1
        per_sample, t = real_loss(*args, **kwargs)
        return (per_sample * float("nan") if calls["n"] == 10 else per_sample), t
    monkeypatch.setattr(build, "training_loss", poisoned)
    from run_experiment import main
    assert main([str(tiny_experiment), "--set", "train.checkpoint_every=1"]) == 1  # base.yaml saves every 5
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "tiny.yaml: loss became nan at step 10" in errors[0]
    run = mlflow.search_runs(experiment_names=["tiny"], output_format="list")[0]
    assert run.info.status == "FAILED" and run.data.tags["failed_step"] == "10"
    # 7 steps an epoch: the checkpoint of epoch 1 (step 7) is kept, nothing after it was written
    assert load_checkpoint(tmp_path / "runs" / "tiny" / "latest.pt")["step"] == 7
    history = mlflow.MlflowClient().get_metric_history(run.info.run_id, mlflow_key("loss"))
    assert max(m.step for m in history) < 10 and all(torch.isfinite(torch.tensor(m.value)) for m in history)
