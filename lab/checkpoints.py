"""Checkpoint files: written atomically, loaded with weights_only, bad files named in one line."""
import os
import pickle
import tempfile
from pathlib import Path

import torch

from lab.errors import UserError


def atomic_save(obj, path):
    """torch.save to a temporary file in the same folder, fsync, then rename: never a half file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def safe_load(path, what="checkpoint"):
    """torch.load(weights_only=True): a file carrying pickled objects is refused, not executed."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise UserError(path, f"{what} not found")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "Unsupported global" in str(e):
            raise UserError(path, f"refused: the {what} carries pickled objects, not only weights") from None
        raise UserError(path, f"not a readable {what} (truncated or corrupted)") from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise UserError(path, f"not a readable {what} (truncated or corrupted: {type(e).__name__})") from None
