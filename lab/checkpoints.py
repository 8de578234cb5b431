"""Checkpoint files: written atomically with a checksum, loaded with weights_only, bad files named.

`save_checkpoint(state, path)` writes `path` and `path.sha256` (temporary files in the same folder,
fsync, rename) and keeps the previous good file as `path.prev`; `load_checkpoint(path)` verifies the
checksum and falls back to `path.prev` when `path` is truncated or corrupted.
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


def _write_atomic(data, path):
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


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
    _write_atomic(buffer.getvalue(), path)


def checksum_path(path):
    return Path(f"{path}.sha256")


def previous_path(path):
    return Path(f"{path}.prev")


def save_checkpoint(obj, path):
    """Atomic write with a sha256 beside it; the file it replaces becomes `path.prev` (the fallback)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    data = buffer.getvalue()
    if path.exists() and checksum_path(path).exists():
        os.replace(path, previous_path(path))
        os.replace(checksum_path(path), checksum_path(previous_path(path)))
    _write_atomic(data, path)
    _write_atomic(hashlib.sha256(data).hexdigest().encode(), checksum_path(path))
    _sync_folder(path.parent)


def safe_load(path, what="checkpoint", data=None):
    """torch.load(weights_only=True): a file carrying pickled objects is refused, not executed."""
    path = Path(path).expanduser()
    if data is None:
        if not path.is_file():
            raise UserError(path, f"{what} not found")
        data = path.read_bytes()
    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "Unsupported global" in str(e):
            raise UserError(path, f"refused: the {what} carries pickled objects, not only weights") from None
        raise UserError(path, f"not a readable {what} (truncated or corrupted)") from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise UserError(path, f"not a readable {what} (truncated or corrupted: {type(e).__name__})") from None


def _load_verified(path, what):
    if not path.is_file():
        raise UserError(path, f"{what} not found")
    data = path.read_bytes()
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


def atomic_write_text(path, text):
    """A small text file (a JSON note beside a checkpoint) written the same never-half-written way."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _write_atomic(text.encode(), path)
