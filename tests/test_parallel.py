"""Data parallel: the same config under torchrun with 2 CPU processes (gloo); only the main one logs."""
import os
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest

from lab.checkpoints import load_checkpoint

ROOT = Path(__file__).parent.parent


@pytest.mark.slow
def test_two_processes_train_one_run(tiny_experiment, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MLFLOW_TRACKING_URI": "sqlite:///mlflow.db", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(ROOT / "run_experiment.py"), str(tiny_experiment), "--device", "cpu"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert done.stdout.count("MLflow run ") == 1  # one summary: only the main process reports
    runs = mlflow.search_runs(experiment_names=["tiny"], output_format="list")
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    # 60 images, 8 per process and step, 2 processes: 3 steps an epoch, 3 epochs
    assert load_checkpoint(tmp_path / "runs" / "tiny" / "latest.pt")["step"] == 9
    assert runs[0].data.metrics["test_accuracy"] >= 0


def test_gradient_accumulation_all_reduces_once_per_optimizer_step(tiny_experiment, tmp_path):
    """Under DDP every micro-batch but the last runs in no_sync(): each gradient bucket is all-reduced once."""
    import torch
    import torch.distributed as dist

    from lab import build
    from lab.config import load_config
    from lab.trainer import TrainStep
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        setup = build.prepare(load_config(tiny_experiment, ["train.grad_accum=3"]), tiny_experiment, "cpu")
        train_step = TrainStep(setup)
        reduced = []

        def count(state, bucket):  # a comm hook in place of the all-reduce
            reduced.append(bucket.index())
            done = torch.futures.Future()
            done.set_result(bucket.buffer())
            return done
        train_step.opt.wrapped.register_comm_hook(None, count)
        train_step.start_epoch(0)
        train_step(0, 1)
        assert reduced and sorted(reduced) == sorted(set(reduced))  # without no_sync(): each bucket 3 times
    finally:
        dist.destroy_process_group()
