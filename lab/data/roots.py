"""Which data root a config means: a folder in the course's format, or the embedded synthetic set (rendered into
the cache on first use)."""
from pathlib import Path

from lab.data.synthetic import DEFAULT_SCENES, default_root
from lab.errors import UserError

def is_synthetic(root):
    """Whether a `data.root` value means the embedded synthetic set."""
    return root in (None, "", "synthetic")


def resolve_root(root=None, synthetic_seed=0, synthetic_scenes=DEFAULT_SCENES):
    """A data root path, or the embedded synthetic default (rendered once) when `root` is None."""
    if is_synthetic(root):
        return default_root(seed=synthetic_seed, scenes=synthetic_scenes)
    root = Path(root).expanduser()
    if not root.is_dir():
        raise UserError(root, "data root not found")
    return root
