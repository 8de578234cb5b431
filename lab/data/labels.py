"""The label files of an i-CLEVR root, read and checked without torch: `objects.json` (label name -> index),
`train.json` (image name -> label names) and the label-set files (test.json, new_test.json, val.json: lists of
label lists). A run and a dry run check a root with the same functions (lab/checks.py); lab/data/iclevr.py turns
what they return into tensors.

A label list may name a label more than once: one object of it each time (the synthetic roots' count scenes,
which teach the strict judge to count). The course's files never do.
"""
import json
from pathlib import Path

from lab.errors import UserError


def read_json(path):
    path = Path(path)
    if not path.is_file():
        raise UserError(path, "file not found")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise UserError(path, f"malformed JSON at line {e.lineno} column {e.colno}: {e.msg}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(path, f"not a readable JSON text file ({getattr(e, 'strerror', None) or e})") from None


def objects_path(root):
    root = Path(root)
    if not root.is_dir():
        raise UserError(root, "data root not found")
    for name in ("objects.json", "object.json"):
        if (root / name).is_file():
            return root / name
    raise UserError(root / "objects.json", "file not found (nor object.json)")


def load_objects(root):
    """Label names in index order; the index table must be a bijection onto 0..N-1."""
    path = objects_path(root)
    table = read_json(path)
    if not isinstance(table, dict) or not table:
        raise UserError(path, "expected a JSON object mapping label names to indices")
    for name, index in table.items():
        if not isinstance(index, int) or isinstance(index, bool):
            raise UserError(path, f"index of '{name}' is {index!r}, not an integer")
    indices = sorted(table.values())
    if indices != list(range(len(table))):
        missing = sorted(set(range(len(table))) - set(indices))
        raise UserError(path, f"indices are not a bijection onto 0..{len(table) - 1} (missing {missing}, "
                              f"duplicated {sorted({i for i in indices if indices.count(i) > 1})})")
    return sorted(table, key=table.get)


def label_indices(label_sets, names, where, entries=None):
    """Lists of label names -> lists of label indices (repeats kept); `where` names the file and `entries` the
    entries (image names, else their positions) for errors."""
    index = {name: i for i, name in enumerate(names)}
    out = []
    for row, labels in enumerate(label_sets):
        entry = f"entry {row}" if entries is None else f"entry {entries[row]!r}"
        if not isinstance(labels, list) or not all(isinstance(label, str) for label in labels):
            raise UserError(where, f"{entry} is {labels!r}, not a list of label names")
        for label in labels:
            if label not in index:
                raise UserError(where, f"{entry}: label {label!r} is not in objects.json")
        out.append([index[label] for label in labels])
    return out


def read_label_sets(root, name="test.json"):
    """A label-set file of the root (a JSON list of label lists) as lists of label indices."""
    path = Path(root) / name
    sets = read_json(path)
    if not isinstance(sets, list):
        raise UserError(path, "expected a JSON list of label lists")
    return label_indices(sets, load_objects(root), path)


def read_train_table(root):
    """train.json as (image names, their label indices), in the file's order."""
    path = Path(root) / "train.json"
    table = read_json(path)
    if not isinstance(table, dict):
        raise UserError(path, "expected a JSON object mapping image names to label lists")
    names = list(table)
    return names, label_indices([table[n] for n in names], load_objects(root), path, names)


def image_paths(root, names, image_dir="iclevr"):
    """The image files of `names` in the root's image folder, each checked to exist."""
    folder = Path(root) / image_dir
    if not folder.is_dir():
        raise UserError(folder, "image folder not found")
    paths = [folder / n for n in names]
    for path in paths:
        if not path.is_file():
            raise UserError(path, f"image file not found (listed in {Path(root) / 'train.json'})")
    return paths
