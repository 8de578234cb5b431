"""i-CLEVR data: the real-format reader, the synthetic twin and the contact sheet."""
from lab.data.iclevr import (TrainingSet, load_condition_sets, load_objects, load_train, normalize,
                             to_uint8)

__all__ = ["TrainingSet", "load_condition_sets", "load_objects", "load_train", "normalize", "to_uint8",
           "is_synthetic", "resolve_root"]


def is_synthetic(root):
    """Whether a `data.root` value means the embedded synthetic set."""
    return root in (None, "", "synthetic")


def resolve_root(root=None, synthetic_seed=0, synthetic_scenes=6003):
    """A data root path, or the embedded synthetic default (rendered once) when `root` is None."""
    from pathlib import Path

    from lab.data.synthetic import default_root
    from lab.errors import UserError
    if is_synthetic(root):
        return default_root(seed=synthetic_seed, scenes=synthetic_scenes)
    root = Path(root).expanduser()
    if not root.is_dir():
        raise UserError(root, "data root not found")
    return root
