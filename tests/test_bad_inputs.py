"""The bad-input corpus (tests/bad_inputs/*.yaml): each case exits non-zero with one line naming the
file and the key or value, creates no MLflow run and writes nothing."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lab.eval import build_resnet, save_evaluator

CORPUS = Path(__file__).parent / "bad_inputs"
CASES = sorted(CORPUS.glob("*.yaml"))
DRY_RUN_CASES = [case for case in CASES if "# also refused by --dry-run" in case.read_text()]


def expected_error(path):
    first = path.read_text().splitlines()[0]
    assert first.startswith("# error: ")
    return first.removeprefix("# error: ")


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Two 43 MB evaluator checkpoints, written once and linked into each case's folder."""
    folder = tmp_path_factory.mktemp("checkpoints")
    save_evaluator(build_resnet(), folder / "evaluator.pth")
    save_evaluator(build_resnet(10), folder / "other_arch.pth")
    return folder


@pytest.fixture
def workdir(tmp_path, tiny_root, checkpoints, monkeypatch):
    """A working directory holding the data and checkpoints the cases point at."""
    shutil.copytree(tiny_root, tmp_path / "tiny")
    shutil.copytree(tiny_root, tmp_path / "bad_labels")
    table = json.loads((tmp_path / "bad_labels" / "train.json").read_text())
    table[list(table)[3]] = ["pink cube"]
    (tmp_path / "bad_labels" / "train.json").write_text(json.dumps(table))
    for name in ("evaluator.pth", "other_arch.pth"):
        (tmp_path / name).symlink_to(checkpoints / name)
    (tmp_path / "not_a_database.db").write_bytes(bytes(range(256)) * 20)
    (tmp_path / "truncated.pth").write_bytes((checkpoints / "evaluator.pth").read_bytes()[:100_000])
    (tmp_path / "runs" / "stale").mkdir(parents=True)
    torch.save({"model": {}, "config": "unet: reference\n"}, tmp_path / "runs" / "stale" / "latest.pt")
    (tmp_path / "runs" / "pickled").mkdir(parents=True)
    torch.save({"model": {}, "payload": Path("x")}, tmp_path / "runs" / "pickled" / "latest.pt")
    (tmp_path / "runs" / "truncated").mkdir(parents=True)
    torch.save({"model": {}, "config": "unet: tiny\n"}, tmp_path / "runs" / "truncated" / "latest.pt")
    with open(tmp_path / "runs" / "truncated" / "latest.pt", "r+b") as f:
        f.truncate(200)
    (tmp_path / "runs" / "other").mkdir(parents=True)
    (tmp_path / "runs" / "other" / "run.json").write_text(json.dumps({"run_id": "0" * 32, "config": "seed: 1\n"}))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///mlflow.db")
    return tmp_path


def snapshot(folder):
    return {p: p.stat().st_mtime_ns for p in folder.rglob("*")}


@pytest.mark.parametrize("case", CASES, ids=lambda p: p.stem)
def test_bad_input_gives_one_line_and_leaves_nothing(case, workdir, capsys):
    from run_experiment import main
    before = snapshot(workdir)
    assert main([str(case)]) == 1
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if not line.startswith("warning:")]
    assert len(lines) == 1 and lines[0].startswith("error: "), captured.err
    assert expected_error(case) in lines[0]
    assert snapshot(workdir) == before, "a bad input wrote or changed files"
    assert not (workdir / "mlflow.db").exists()


@pytest.mark.parametrize("case", DRY_RUN_CASES, ids=lambda p: p.stem)
def test_dry_run_refuses_what_a_run_refuses_before_loading_data(case, workdir, capsys):
    from run_experiment import main
    before = snapshot(workdir)
    assert main([str(case), "--dry-run"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and expected_error(case) in err
    assert snapshot(workdir) == before and not (workdir / "mlflow.db").exists()


def test_dry_run_refuses_an_unknown_tracking_scheme_from_the_environment(workdir, monkeypatch, capsys):
    from run_experiment import main
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "foo://bar")
    assert main([str(CORPUS / "truncated_checkpoint.yaml"), "--dry-run"]) == 1
    assert capsys.readouterr().err == "error: MLFLOW_TRACKING_URI: unknown scheme 'foo' in 'foo://bar'; MLflow " \
        "stores use file, sqlite, postgresql, mysql, mssql, http, https, databricks, databricks-uc, uc or a folder\n"


def test_a_new_user_sees_no_traceback(workdir):
    """The same through the real command line: exit code 1, one line on stderr."""
    case = CORPUS / "unknown_key.yaml"
    done = subprocess.run([sys.executable, str(Path(__file__).parent.parent / "run_experiment.py"), str(case)],
                          capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(Path.cwd())})
    assert done.returncode == 1 and done.stderr.count("\n") == 1 and "Traceback" not in done.stderr
    assert expected_error(case) in done.stderr
