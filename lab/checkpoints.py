"""Checkpoint files: written atomically with a checksum, loaded with weights_only, bad files named.

`save_checkpoint(state, path)` writes `path` and `path.sha256` under temporary names, fsyncs them and
only then renames them into place; the file it replaces, if it verifies, is first linked to `path.prev`.
So at every moment `path` or `path.prev` holds a whole, verified state, and a damaged file never
becomes the fallback. `load_checkpoint(path)` verifies the checksum and falls back to `path.prev`
when `path` is missing, truncated or corrupted.
"""
import hashlib
import io
import os
import pickle
import sys
import tempfile
from pathlib import Path

import torch

from lab.errors import UserError


def _write_temporary(data, path):
    """`data` in a fsynced temporary file beside `path` (so the final rename is atomic); its path."""
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except BaseException as e:
        if tmp:
            Path(tmp).unlink(missing_ok=True)
        if isinstance(e, OSError):  # a full disk, a quota, a read-only folder: one line naming the file
            raise UserError(path, f"could not be written ({e.strerror or e})") from None
        raise
    return Path(tmp)


def write_atomic(data, path):
    """Write bytes to `path` so that it is never seen half-written, even after a kill."""
    path = Path(path)
    os.replace(_write_temporary(data, path), path)


def _sync_folder(folder):
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_save(obj, path):
    """torch.save to a temporary file in the same folder, fsync, then rename: never a half file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    write_atomic(buffer.getvalue(), path)


def checksum_path(path):
    return Path(f"{path}.sha256")


def previous_path(path):
    return Path(f"{path}.prev")


def checkpoint_exists(path):
    """Whether `path` or its fallback is there (a run killed by an older version mid-save has only `.prev`)."""
    return Path(path).is_file() or previous_path(path).is_file()


def _verifies(path):
    checksum = checksum_path(path)
    return (path.is_file() and checksum.is_file()
            and hashlib.sha256(path.read_bytes()).hexdigest() == checksum.read_text().strip())


def _keep_as_previous(path):
    """Make `path.prev` (and its checksum) a second name of the current file: no moment without it."""
    pairs = [(path, previous_path(path)), (checksum_path(path), checksum_path(previous_path(path)))]
    for source, target in pairs:  # a kill between the two leaves `.prev` unverifiable, `path` intact
        if target.exists() and os.path.samefile(source, target):
            continue  # linked already by a save killed midway (and rename() would leave the link behind)
        link = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        link.unlink(missing_ok=True)
        try:
            os.link(source, link)
        except OSError:  # a file system without hard links: a copy, written the same careful way
            link = _write_temporary(source.read_bytes(), target)
        os.replace(link, target)


def _remove_stale_temporaries(path):
    """Temporary files of writes a kill interrupted (the run folder has one writer: they are not in use)."""
    for stale in path.parent.glob(f".{path.name}.*.tmp"):
        stale.unlink(missing_ok=True)


def save_checkpoint(obj, path):
    """Replace `path` (and `path.sha256`) atomically; the file it replaces becomes `path.prev` if it verifies."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(path)
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    data = buffer.getvalue()
    new_data = _write_temporary(data, path)
    try:
        new_checksum = _write_temporary(hashlib.sha256(data).hexdigest().encode(), checksum_path(path))
    except BaseException:
        new_data.unlink(missing_ok=True)
        raise
    if _verifies(path):  # a damaged file never becomes the fallback
        _keep_as_previous(path)
    # a kill between these two renames leaves a checksum mismatch: the loader then takes `path.prev`
    os.replace(new_data, path)
    os.replace(new_checksum, checksum_path(path))
    _sync_folder(path.parent)


def safe_load(path, what="checkpoint", data=None):
    """torch.load(weights_only=True): a file carrying pickled objects is refused, not executed."""
    path = Path(path).expanduser()
    if data is None:
        data = _read(path, what)
    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "Unsupported global" in str(e):
            raise UserError(path, f"refused: the {what} carries pickled objects, not only weights") from None
        raise UserError(path, f"not a readable {what} (truncated or corrupted)") from None
    except (RuntimeError, EOFError, OSError, ValueError, KeyError, IndexError) as e:  # garbage bytes: pickle fails many ways
        raise UserError(path, f"not a readable {what} (truncated or corrupted: {type(e).__name__})") from None


def _read(path, what):
    if not path.is_file():
        raise UserError(path, f"{what} not found")
    try:
        return path.read_bytes()
    except OSError as e:
        raise UserError(path, f"{what} could not be read ({e.strerror})") from None


def _load_verified(path, what):
    data = _read(path, what)
    # a file copied without its .sha256 still loads; weights_only loading still rejects a truncated one
    expected = checksum_path(path).read_text().strip() if checksum_path(path).is_file() else None
    if expected is not None and hashlib.sha256(data).hexdigest() != expected:
        raise UserError(path, f"{what} is corrupted or truncated (checksum mismatch)")
    return safe_load(path, what, data)


def load_checkpoint(path, what="checkpoint"):
    """The checkpoint at `path`, verified; if it is damaged, the previous good one (with a warning)."""
    path = Path(path)
    try:
        return _load_verified(path, what)
    except UserError as error:
        if not previous_path(path).is_file():
            raise
        print(f"warning: {error}; falling back to {previous_path(path)}", file=sys.stderr)
        return _load_verified(previous_path(path), what)

