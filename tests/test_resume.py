"""Resume after SIGKILL: same MLflow run, bitwise-identical weights; damaged checkpoints fall back."""
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest
import torch

from lab.checkpoints import checksum_path, load_checkpoint, previous_path, save_checkpoint
from lab.errors import UserError
from tests.test_experiments import EXPERIMENTS, TINY

ROOT = Path(__file__).parent.parent
RESUMABLE = TINY.replace("epochs: 3", "epochs: 6\n  checkpoint_every: 1").replace("every_epochs: 2", "every_epochs: 3")


def write_config(folder, tiny_root, evaluator):
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "tiny.yaml"
    path.write_text(RESUMABLE.format(base=EXPERIMENTS / "base.yaml", root=tiny_root, evaluator=evaluator))
    return path


def run(folder, config, env):
    return subprocess.Popen([sys.executable, str(ROOT / "run_experiment.py"), str(config)], cwd=folder, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.mark.slow
def test_sigkill_then_rerun_gives_bitwise_identical_weights(tiny_root, tmp_path):
    from lab.eval import build_resnet, save_evaluator
    torch.manual_seed(0)
    save_evaluator(build_resnet(), tmp_path / "evaluator.pth")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MLFLOW_TRACKING_URI": "sqlite:///mlflow.db"}
    straight = write_config(tmp_path / "straight", tiny_root, tmp_path / "evaluator.pth")
    killed = write_config(tmp_path / "killed", tiny_root, tmp_path / "evaluator.pth")
    reference = run(straight.parent, straight, env)

    victim = run(killed.parent, killed, env)
    latest = killed.parent / "runs" / "tiny" / "latest.pt"
    while not latest.exists() and victim.poll() is None:
        time.sleep(0.05)
    time.sleep(random.Random().uniform(0, 2.0))  # any moment: mid-step, mid-evaluation, mid-save
    assert victim.poll() is None, "the run finished before it could be killed"
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    resumed = run(killed.parent, killed, env)
    out, _ = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, out
    assert "resuming" in out
    assert reference.wait(timeout=300) == 0

    a = load_checkpoint(straight.parent / "runs/tiny/latest.pt")
    b = load_checkpoint(latest)
    for key in ("model", "ema"):
        assert a[key].keys() == b[key].keys()
        for name in a[key]:
            if isinstance(a[key][name], torch.Tensor):
                assert torch.equal(a[key][name], b[key][name]), f"{key}.{name} differs"
    assert a["step"] == b["step"]
    # one MLflow run, finished, with its params logged once and its loss steps continuing
    client = mlflow.MlflowClient(f"sqlite:///{killed.parent / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("tiny").experiment_id])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    steps = [m.step for m in client.get_metric_history(runs[0].info.run_id, "loss")]
    assert max(steps) == a["step"] and sorted(set(steps)) == sorted(set(range(2, a["step"] + 1, 2)) | {a["step"]})


def test_damaged_checkpoint_falls_back_to_the_previous_one(tmp_path, capsys):
    path = tmp_path / "latest.pt"
    save_checkpoint({"step": torch.tensor(1)}, path)
    save_checkpoint({"step": torch.tensor(2)}, path)
    assert previous_path(path).is_file() and checksum_path(path).is_file()
    assert load_checkpoint(path)["step"] == 2
    path.write_bytes(path.read_bytes()[:-20])  # truncated, as by a crash outside our atomic writes
    assert load_checkpoint(path)["step"] == 1
    assert f"{path}: checkpoint is corrupted or truncated (checksum mismatch); falling back" in capsys.readouterr().err
    data = bytearray(previous_path(path).read_bytes())
    data[len(data) // 2] ^= 0xFF  # a flipped bit
    previous_path(path).write_bytes(bytes(data))
    with pytest.raises(UserError, match="latest.pt.prev: checkpoint is corrupted or truncated"):
        load_checkpoint(path)


def test_pickled_objects_are_refused(tmp_path):
    path = tmp_path / "latest.pt"
    torch.save({"model": {}, "payload": Path("x")}, path)
    with pytest.raises(UserError, match="refused: the checkpoint carries pickled objects"):
        load_checkpoint(path)
