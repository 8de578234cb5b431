"""What MLflow users rely on, checked on a real SQLite store: standard run tags, metrics stored while the
run is still running, images with steps, the model-training experiment kind; and KID's basic behaviour."""
import math
import time
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient
from PIL import Image

from lab.config import load_config
from lab.metrics import frechet_distance, kernel_distance
from lab.tracking import Tracker, mlflow_key


@pytest.fixture
def tracker(tmp_path, monkeypatch, experiments_dir):
    monkeypatch.setenv("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING", "false")  # no background thread in a unit test
    tracker = Tracker(f"sqlite:///{tmp_path / 'mlflow.db'}")
    config = load_config(experiments_dir / "base.yaml", [f"output_dir={tmp_path}", "experiment=unit"])
    tracker.start(config, experiments_dir / "base.yaml")
    return tracker


def test_a_run_carries_mlflows_standard_tags(tracker):
    run = tracker.client.get_run(tracker.run_id)
    tags = run.data.tags
    assert tags["mlflow.user"] and tags["mlflow.source.type"] == "LOCAL"
    assert len(tags["mlflow.source.git.commit"]) == 40 and tags["git_dirty"] in ("true", "false")
    assert tags["mlflow.runName"] == run.info.run_name and "git_commit" not in tags
    experiment = tracker.client.get_experiment(run.info.experiment_id)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"


def test_metrics_are_stored_while_the_run_is_running(tracker):
    tracker.log_metrics({"loss": 0.5, "images_per_s": 100}, step=2)
    deadline = time.monotonic() + 30
    history = []
    while not history and time.monotonic() < deadline:  # MLflow's queue writes in the background, unasked
        history = tracker.client.get_metric_history(tracker.run_id, mlflow_key("loss"))
        time.sleep(0.1)
    assert [(m.step, m.value) for m in history] == [(2, 0.5)]
    tracker.log_metrics({"loss": 0.25}, step=4)
    tracker.flush()  # what checkpoints wait for: everything logged so far is stored
    assert [m.step for m in tracker.client.get_metric_history(tracker.run_id, mlflow_key("loss"))] == [2, 4]
    assert tracker.client.get_run(tracker.run_id).info.status == "RUNNING"
    tracker.end()
    assert tracker.client.get_run(tracker.run_id).info.status == "FINISHED"


def test_images_are_logged_with_a_key_and_steps(tracker):
    for step in (10, 20):
        tracker.log_image(Image.new("RGB", (64, 64), "red"), "val_samples", step)
    names = [Path(a.path).name for a in MlflowClient(tracker.uri).list_artifacts(tracker.run_id, "images")]
    assert sorted(int(n.split("+")[2]) for n in names if n.startswith("val_samples+") and n.endswith(".png")) == [10, 20]


def test_kid_is_zero_for_one_distribution_and_positive_for_two():
    generator = torch.Generator().manual_seed(0)
    a, b = torch.randn(2, 256, 64, generator=generator).relu()  # post-ReLU features, like the evaluator's
    shifted = b + 0.5
    same, different = kernel_distance(a, b), kernel_distance(a, shifted)
    assert abs(same) < 0.02 * different and different > 0
    assert abs(kernel_distance(a[:64], b)) < 0.1 * different  # unbiased at 64 samples too
    assert abs(kernel_distance(a, a)) < 0.02 * different
    assert math.isnan(kernel_distance(a[:1], b))  # a distance that cannot be computed is NaN, never an error
    broken = a.clone()
    broken[3, 5] = float("nan")
    assert math.isnan(kernel_distance(broken, b)) and math.isnan(frechet_distance(broken, b))
