"""i-CLEVR data: the real-format reader, the synthetic twin and the contact sheet.

The reader's names load with their module (torch) on first use, so that resolving a root (`--dry-run`)
loads no torch."""
import importlib
from pathlib import Path

from lab.errors import UserError

__all__ = ["TrainingSet", "load_condition_sets", "load_objects", "load_train", "normalize", "to_uint8",
           "is_synthetic", "resolve_root"]
_READER = {"TrainingSet", "load_condition_sets", "load_objects", "load_train", "normalize", "to_uint8"}


def __getattr__(name):  # PEP 562: `from lab.data import load_train` imports lab.data.iclevr then
    if name in _READER:
        return getattr(importlib.import_module("lab.data.iclevr"), name)
    raise AttributeError(f"module 'lab.data' has no attribute {name!r}")


def is_synthetic(root):
    """Whether a `data.root` value means the embedded synthetic set."""
    return root in (None, "", "synthetic")


def resolve_root(root=None, synthetic_seed=0, synthetic_scenes=6003):
    """A data root path, or the embedded synthetic default (rendered once) when `root` is None."""
    if is_synthetic(root):
        from lab.data.synthetic import default_root
        return default_root(seed=synthetic_seed, scenes=synthetic_scenes)
    root = Path(root).expanduser()
    if not root.is_dir():
        raise UserError(root, "data root not found")
    return root
