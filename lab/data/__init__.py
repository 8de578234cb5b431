"""i-CLEVR data: the label files (labels.py, torch-free), the real-format reader (iclevr.py), the synthetic twin
(render.py draws a scene, synthetic.py writes a root), which root a config means (roots.py) and the command line
(`python -m lab.data`)."""
import os
from pathlib import Path


def default_cache_dir():
    """Where rendered roots, decoded images and our evaluators are kept: $DDPM_LAB_CACHE, else ~/.cache/ddpm-lab."""
    return Path(os.environ.get("DDPM_LAB_CACHE", Path.home() / ".cache" / "ddpm-lab"))
