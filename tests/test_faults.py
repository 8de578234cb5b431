"""Faults, done for real: a kill at every step of a checkpoint save, two writers on one run folder, a full
file system, truncated files (checkpoint, PNG, decoded cache) and a render killed midway. Every one ends in
one line naming the file, or is repaired, and leaves a loadable state. (The SIGKILL sequence of a whole
run is in test_resume.py; truncated evaluator and resume checkpoints are in tests/bad_inputs/.)"""
import json
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from lab import run_folder
from lab.checkpoints import atomic_save, checkpoint_exists, load_checkpoint, previous_path, save_checkpoint
from lab.data.iclevr import load_train
from lab.errors import UserError

ROOT = Path(__file__).parent.parent


# --- a kill at every moment of a save ---------------------------------------------------------------

def save_killed_before(k, state, path):
    """save_checkpoint in a forked child that dies (os._exit: no cleanup runs) just before its k-th file
    operation; True if it died, False if the save completed."""
    pid = os.fork()
    if pid == 0:
        calls = 0

        def dying(operation):
            def wrapper(*args, **kwargs):
                nonlocal calls
                if calls == k:
                    os._exit(9)
                calls += 1
                return operation(*args, **kwargs)
            return wrapper
        for name in ("fsync", "link", "replace"):
            setattr(os, name, dying(getattr(os, name)))
        try:
            save_checkpoint(state, path)
        except BaseException:
            os._exit(1)
        os._exit(0)
    code = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
    assert code in (0, 9)
    return code == 9


@pytest.mark.parametrize("saved_before", [0, 2], ids=["first save", "replacing latest and prev"])
def test_a_kill_at_any_moment_of_a_save_leaves_a_loadable_state(saved_before, tmp_path):
    old, new = saved_before, saved_before + 1
    for k in range(20):
        path = tmp_path / str(k) / "latest.pt"
        for step in range(1, saved_before + 1):
            save_checkpoint({"step": step}, path)
        died = save_killed_before(k, {"step": new}, path)
        if checkpoint_exists(path) or old:
            assert load_checkpoint(path)["step"] in (old, new), f"killed before file operation {k}"
        save_checkpoint({"step": new + 1}, path)  # the resumed run's next save
        assert load_checkpoint(path)["step"] == new + 1
        if previous_path(path).exists():
            assert load_checkpoint(previous_path(path))["step"] in (old, new)
        assert not list(path.parent.glob(".*.tmp")), "a killed save's temporary files were left behind"
        if not died:
            break
    assert k > 4 and not died, "the save went through all its file operations"


def test_a_damaged_checkpoint_never_becomes_the_fallback(tmp_path, capsys):
    path = tmp_path / "latest.pt"
    save_checkpoint({"step": 1}, path)
    save_checkpoint({"step": 2}, path)
    path.write_bytes(path.read_bytes()[:-20])
    save_checkpoint({"step": 3}, path)  # the damaged step 2 must not replace the good step 1 as .prev
    assert load_checkpoint(previous_path(path))["step"] == 1
    path.write_bytes(b"")
    assert load_checkpoint(path)["step"] == 1
    path.unlink()  # only .prev left (an older version renamed latest.pt away before writing the new one)
    assert load_checkpoint(path)["step"] == 1
    assert f"{path}: checkpoint not found; falling back to {previous_path(path)}" in capsys.readouterr().err


# --- one writer per run folder --------------------------------------------------------------------

HOLD = """
import sys, time
from lab import run_folder
with run_folder.exclusive(sys.argv[1]):
    run_folder.announce(sys.argv[1])
    print("holding", flush=True)
    time.sleep(300)
"""


def test_a_second_writer_is_refused_naming_the_first_and_a_killed_ones_folder_is_free(tmp_path):
    folder = tmp_path / "runs" / "tiny"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(folder)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline() == "holding\n"
    with pytest.raises(UserError) as refused:
        with run_folder.exclusive(folder):
            pass
    assert str(refused.value) == (f"{folder}: another process (PID {holder.pid}) is writing into this run folder; "
                                  "wait for it to end, or set another run_name")
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    assert (folder / "lock").read_text() == f"{holder.pid}\n"  # the dead process's note stays ...
    with run_folder.exclusive(folder):  # ... but its lock died with it
        run_folder.announce(folder)
        assert (folder / "lock").read_text() == f"{os.getpid()}\n"
    assert not (folder / "lock").exists()


def test_a_run_refused_in_a_new_folder_leaves_no_folder(tmp_path):
    with pytest.raises(UserError):
        with run_folder.exclusive(tmp_path / "new"):
            raise UserError("x", "refused after its checks")
    assert not (tmp_path / "new").exists()


# --- a full file system -----------------------------------------------------------------------------

@pytest.fixture
def full_disk(tmp_path):
    """A 1 MB tmpfs (needs root); skipped where it cannot be mounted."""
    folder = tmp_path / "small"
    folder.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(folder)], capture_output=True)
    if mounted.returncode:
        pytest.skip(f"cannot mount a tmpfs: {mounted.stderr.decode().strip()}")
    yield folder
    subprocess.run(["umount", str(folder)], check=True)


def test_a_full_disk_is_one_line_naming_the_file_and_leaves_nothing_half_written(full_disk):
    path = full_disk / "runs" / "tiny" / "latest.pt"
    save_checkpoint({"weights": torch.zeros(1000)}, path)
    with pytest.raises(UserError) as error:
        save_checkpoint({"weights": torch.zeros(1_000_000)}, path)  # 4 MB
    assert str(error.value) == f"{path}: could not be written (No space left on device)"
    assert load_checkpoint(path)["weights"].shape == (1000,)
    assert sorted(p.name for p in path.parent.iterdir()) == ["latest.pt", "latest.pt.sha256"]
    cache = full_disk / "decoded" / "key.pt"  # the decoded-image cache is written the same way
    with pytest.raises(UserError, match=f"^{cache}: could not be written"):
        atomic_save(torch.zeros(4_000_000, dtype=torch.uint8), cache)
    assert not any(cache.parent.iterdir())


@pytest.mark.slow
def test_a_run_on_a_full_disk_fails_in_one_line_and_resumes_once_there_is_room(tiny_experiment, full_disk, capsys):
    from mlflow import MlflowClient
    from run_experiment import main
    shrink = ["train.max_steps=2", "eval.every_epochs=1", "eval.split=test.json", "eval.test_splits=[test.json]",
              "eval.final_seeds=1", "eval.guidance_scale=1.0"]
    args = [str(tiny_experiment), "--set", f"output_dir={full_disk}", *(f"--set={s}" for s in shrink)]
    assert main(args) == 1
    err = capsys.readouterr().err  # besides MLflow's log lines when it creates its database
    assert [line for line in err.splitlines() if line.startswith("error:")] == \
        [f"error: {full_disk}/tiny/best.pt: could not be written (No space left on device)"]
    assert "Traceback" not in err
    assert sorted(p.name for p in (full_disk / "tiny").iterdir()) == ["run.json"]  # nothing half-written
    client = MlflowClient()
    first, = client.search_runs([client.get_experiment_by_name("tiny").experiment_id])
    assert first.info.status == "FAILED"
    subprocess.run(["mount", "-o", "remount,size=64m", str(full_disk)], check=True)
    assert main(args) == 0  # the same command, once there is room: the same run, finished
    runs = client.search_runs([client.get_experiment_by_name("tiny").experiment_id])
    assert [(r.info.run_id, r.info.status) for r in runs] == [(first.info.run_id, "FINISHED")]


# --- truncated inputs and caches --------------------------------------------------------------------

def test_user_errors_survive_pickling():
    error = pickle.loads(pickle.dumps(UserError("a.png", "image failed to decode")))
    assert type(error) is UserError and str(error) == "a.png: image failed to decode" and error.where == "a.png"


def test_a_truncated_png_in_a_large_root_is_one_line_from_the_decode_workers(tiny_root, tmp_path):
    """More than 256 images: decoded in worker processes, whose error must reach the user unchanged."""
    root = tmp_path / "large"
    (root / "iclevr").mkdir(parents=True)
    (root / "objects.json").write_bytes((tiny_root / "objects.json").read_bytes())
    entries = list(json.loads((tiny_root / "train.json").read_text()).items())
    table = {}
    for i in range(300):
        name, labels = entries[i % len(entries)]
        table[f"{i:03d}_{name}"] = labels
        os.link(tiny_root / "iclevr" / name, root / "iclevr" / f"{i:03d}_{name}")
    (root / "train.json").write_text(json.dumps(table))
    broken = root / "iclevr" / list(table)[280]
    data = broken.read_bytes()
    broken.unlink()  # not the shared tiny root's file
    broken.write_bytes(data[:len(data) // 2])
    with pytest.raises(UserError) as error:
        load_train(root, 32, cache_dir=tmp_path / "cache", workers=2)
    assert str(error.value).startswith(f"{broken}: image failed to decode")


def test_a_binary_config_is_one_line(tmp_path, capsys):
    from run_experiment import main
    config = tmp_path / "photo.yaml"
    config.write_bytes(bytes(range(128, 256)))
    assert main([str(config)]) == 1
    assert capsys.readouterr().err.startswith(f"error: {config}: not a readable YAML text file (")


def test_a_damaged_decoded_cache_is_rebuilt_with_a_notice(tiny_root, tmp_path, capsys):
    images = load_train(tiny_root, 32, cache_dir=tmp_path).images
    cache, = (tmp_path / "decoded").glob("*.pt")
    cache.write_bytes(cache.read_bytes()[:1000])
    assert torch.equal(load_train(tiny_root, 32, cache_dir=tmp_path).images, images)
    assert capsys.readouterr().err == f"notice: {cache}: damaged decoded-image cache; decoding the images again\n"
    assert torch.equal(torch.load(cache, weights_only=True), images)


# --- a render killed midway -------------------------------------------------------------------------

def test_a_render_killed_midway_leaves_no_partial_folder_after_the_next(tmp_path):
    from lab.data.synthetic import write_root
    out = tmp_path / "root"
    render = subprocess.Popen([sys.executable, "-m", "lab.data", "render", "--out", str(out), "--scenes", "5000",
                               "--workers", "1", "--size", "64x48"], cwd=ROOT, start_new_session=True,
                              stdout=subprocess.DEVNULL)
    partial = tmp_path / f"root.partial{render.pid}"
    deadline = time.time() + 120
    while not (partial / "iclevr").is_dir() and time.time() < deadline:
        time.sleep(0.05)
    os.killpg(render.pid, signal.SIGKILL)  # the renderer and its pool
    render.wait()
    assert partial.is_dir()
    alive = subprocess.Popen(["sleep", "60"])
    (tmp_path / f"root.partial{alive.pid}").mkdir()  # a render still running: kept
    try:
        write_root(out, scenes=1, width=32, height=24, workers=1, progress=False)
        assert sorted(p.name for p in tmp_path.iterdir()) == ["root", f"root.partial{alive.pid}"]
    finally:
        alive.kill()
        alive.wait()
