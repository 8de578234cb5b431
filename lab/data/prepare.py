"""Make a real i-CLEVR folder ready for ddpm-lab: check every file it needs, and write the validation split that
model selection uses, its label sets held out of training.

The course gives train.json, test.json and new_test.json; choosing a checkpoint by the test sets would score
them twice, so runs select on `val.json`. `prepare_root` draws its label sets (as many of each size as the
synthetic set's: 16 single, 24 double and 24 triple) among those that neither test file holds, and holds the
double and triple ones out of training: every training image whose label set is exactly one of them is left out
(`lab.data.iclevr.load_train` reads the list from `val_holdout.json`), so validation asks for combinations the
model never saw, as the test sets partly do. Single labels stay in training: each is the first object of a
sixth of all scenes, and leaving them out would drop the one-object images of two thirds of the labels.
"""
import json
from pathlib import Path

import numpy as np
from PIL import Image

from lab.data.labels import image_paths, load_objects, read_label_sets, read_train_table
from lab.errors import UserError

VAL_SIZES = (16, 24, 24)  # singles, doubles, triples: as the synthetic set's val.json
HOLDOUT_FILE = "val_holdout.json"


def check_images(paths):
    """Every image file opens as a PNG (or another image PIL reads) and decodes."""
    for path in paths:
        try:
            with Image.open(path) as image:
                image.convert("RGB").load()
        except Exception as e:  # PIL raises several types for broken files
            raise UserError(path, f"image failed to decode ({type(e).__name__}: {e})") from None


def prepare_root(root, seed=0, sizes=VAL_SIZES, check=check_images):
    """Check a real root (objects.json, train.json, test.json, new_test.json, every image named) and write
    val.json and val_holdout.json; returns a one-line report."""
    root = Path(root)
    if (root / "synthetic.json").is_file():
        raise UserError(root, "is a synthetic root: it has its own val.json, held apart when it was rendered")
    names = load_objects(root)
    images, indices = read_train_table(root)
    check(image_paths(root, images))
    tests = {frozenset(s) for name in ("test.json", "new_test.json") for s in read_label_sets(root, name)}
    seen = sorted({frozenset(labels) for labels in indices} - tests, key=sorted)
    rng = np.random.default_rng(seed)
    chosen = []
    for size, count in enumerate(sizes, start=1):
        pool = [s for s in seen if len(s) == size]
        if len(pool) < count:
            raise UserError(root / "train.json", f"only {len(pool)} label sets of {size} outside the test files; "
                                                 f"val.json needs {count}")
        chosen += [sorted(pool[i]) for i in sorted(rng.choice(len(pool), size=count, replace=False))]
    held = {frozenset(s) for s in chosen if len(s) > 1}
    excluded = [name for name, labels in zip(images, indices) if frozenset(labels) in held]
    (root / "val.json").write_text(json.dumps([[names[i] for i in s] for s in chosen], indent=1))
    (root / HOLDOUT_FILE).write_text(json.dumps({"seed": seed, "held_out_label_sets": [[names[i] for i in s]
                                                                                      for s in sorted(held, key=sorted)],
                                                 "excluded_images": excluded}, indent=1))
    return (f"{root}: {len(images)} training images and {len(names)} labels checked; val.json: {len(chosen)} label "
            f"sets ({', '.join(f'{c}x{k}' for k, c in enumerate(sizes, start=1))}) none of test.json and "
            f"new_test.json holds; {len(excluded)} training images of its {len(held)} double and triple sets held "
            f"out of training ({HOLDOUT_FILE})")


def excluded_images(root):
    """The training images `prepare_root` held out of training (none for a root it never prepared)."""
    path = Path(root) / HOLDOUT_FILE
    return set(json.loads(path.read_text())["excluded_images"]) if path.is_file() else set()
