"""A run folder (`<output_dir>/<run name>/`): one writing process at a time, the MLflow run it feeds, and the
resume state of a run cut short.

The lock is an flock on the folder itself, so the kernel releases it when its process dies, however
it dies: a later run takes over without asking. `lock` beside it names the holder's PID for the
refusal message. `run.json` records the MLflow run id the moment the run exists, before anything
else can be lost, so a run killed before its first checkpoint resumes into the same MLflow run.
"""
import fcntl
import json
import os
from contextlib import contextmanager
from pathlib import Path

from lab.checkpoints import checkpoint_exists, load_checkpoint, write_atomic
from lab.errors import UserError


@contextmanager
def exclusive(folder):
    """Hold `folder` for this process; another process on it is refused in one line naming its PID.

    The holder's PID is written by `announce`, once the run is checked: a refused bad input writes nothing."""
    folder = Path(folder)
    created = not folder.exists()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(folder, os.O_RDONLY)
    except OSError as e:  # read-only, a file in the way, a full disk
        raise UserError(folder, f"cannot open the run folder ({e.strerror})") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UserError(folder, f"another process ({holder(folder)}) is writing into this run folder; "
                                    "wait for it to end, or set another run_name") from None
        try:
            yield
        finally:
            if holder(folder) == f"PID {os.getpid()}":
                (folder / "lock").unlink()
            if created and not any(folder.iterdir()):  # refused before writing anything: leave no trace
                folder.rmdir()
    finally:
        os.close(fd)  # releases the flock


def announce(folder):
    """Name this process as the folder's writer (read by the processes `exclusive` refuses)."""
    write_atomic(f"{os.getpid()}\n".encode(), Path(folder) / "lock")


def holder(folder):
    try:
        return f"PID {int((Path(folder) / 'lock').read_text())}"
    except (OSError, ValueError):  # the holder is still checking its inputs
        return "a process still starting"


def clear(folder):
    """Start over in `folder`: the old run's checkpoints, temporaries and MLflow run record go."""
    folder = Path(folder)
    for old in [*folder.glob("*.pt*"), *folder.glob(".*.tmp"), record_path(folder)]:
        old.unlink(missing_ok=True)


def record_path(folder):
    return Path(folder) / "run.json"


def write_record(folder, run_id, config_yaml):
    """The MLflow run this folder feeds, and the config it was started with."""
    write_atomic(json.dumps({"run_id": run_id, "config": config_yaml}).encode(), record_path(folder))


def read_record(folder):
    """{'run_id', 'config'} of the run this folder feeds, or None; a damaged record is a one-line error."""
    path = record_path(folder)
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
        return {"run_id": str(record["run_id"]), "config": str(record["config"])}
    except (ValueError, KeyError, TypeError):
        raise UserError(path, "not a run record (expected {\"run_id\", \"config\"}); pass --fresh to start over") from None


DIFFERENT_CONFIG = "belongs to a run with a different config; pass --fresh to start over, or set another run_name/output_dir"


def load_previous(out, config_yaml):
    """(resume state, MLflow run id) of an interrupted run of the same config in `out`; (None, None) if none."""
    record = read_record(out)
    if record and record["config"] != config_yaml:
        raise UserError(record_path(out), DIFFERENT_CONFIG)
    resume = load_resume_state(out / "latest.pt", config_yaml)
    return resume, resume["run_id"] if resume else record and record["run_id"]


def load_resume_state(path, config_yaml):
    """The resume state of an interrupted run of the same config, or None for a fresh start."""
    if not checkpoint_exists(path):
        return None
    state = load_checkpoint(path, "resume checkpoint")
    if state.get("config") != config_yaml:
        raise UserError(path, DIFFERENT_CONFIG)
    return state
