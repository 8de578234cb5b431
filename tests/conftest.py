import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("MLFLOW_ENABLE_ASYNC_LOGGING", "false")
EXPERIMENTS = Path(__file__).parent.parent / "experiments"
SHARED_ICLEVR = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "iclevr")


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path_factory, monkeypatch):
    """Every test gets the session's private cache folder, never the user's ~/.cache."""
    monkeypatch.setenv("DDPM_LAB_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


@pytest.fixture(scope="session")
def tiny_root(tmp_path_factory):
    """A 20-scene synthetic root (60 images), rendered once per test session."""
    from lab.data.synthetic import write_root
    return write_root(tmp_path_factory.mktemp("data") / "tiny", scenes=20, seed=1, workers=1, progress=False)


TINY = """
base: {base}
experiment: tiny
data:
  root: {root}
  image_size: 32
model:
  unet: tiny
  cfg_dropout: 0.2
diffusion:
  num_train_timesteps: 50
train:
  epochs: 3
  batch_size: 8
  lr: 1.0e-3
  warmup_steps: 2
  log_every: 2
eval:
  every_epochs: 2
  steps: 3
  guidance_scale: 2.0
  evaluator: {evaluator}
  final_seeds: 2
"""


@pytest.fixture
def tiny_experiment(tiny_root, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///mlflow.db")
    evaluator = tmp_path / "evaluator.pth"
    from lab.eval import build_resnet, save_checkpoint
    torch.manual_seed(0)
    save_checkpoint(build_resnet(), evaluator)
    path = tmp_path / "tiny.yaml"
    path.write_text(TINY.format(base=EXPERIMENTS / "base.yaml", root=tiny_root, evaluator=evaluator))
    return path
