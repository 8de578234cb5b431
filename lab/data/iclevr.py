"""Read an i-CLEVR data root in the course's format, real or synthetic, into cached tensors.

A root holds `train.json` (image name -> label names), `objects.json` or `object.json` (label name ->
index), `test.json` / `new_test.json` (lists of label lists) and an image folder (`iclevr/`).
Images are decoded once into a uint8 tensor file keyed by the inputs' content, so later runs load
the whole training set in seconds and can keep it resident on the GPU.
"""
import contextlib
import hashlib
import json
import os
import sys
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from lab.checkpoints import atomic_save
from lab.errors import UserError

CACHE_VERSION = 1  # bump when the decoding below changes


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


def multi_hot(label_sets, names, where):
    """(M, N) float multi-hot rows for lists of label names; `where` names the file for errors."""
    index = {name: i for i, name in enumerate(names)}
    out = torch.zeros(len(label_sets), len(names))
    for row, labels in enumerate(label_sets):
        if not isinstance(labels, list):
            raise UserError(where, f"entry {row} is {labels!r}, not a list of label names")
        for label in labels:
            if label not in index:
                raise UserError(where, f"entry {row}: label {label!r} is not in objects.json")
            out[row, index[label]] = 1.0
    return out


def load_condition_sets(root, name="test.json"):
    """A list of label lists (test.json, new_test.json, val.json, ...) as (M, N) multi-hot rows."""
    names = load_objects(root)
    path = Path(root) / name
    sets = read_json(path)
    if not isinstance(sets, list):
        raise UserError(path, "expected a JSON list of label lists")
    return multi_hot(sets, names, path)


def normalize(images):
    """uint8 (B, 3, H, W) -> float in [-1, 1], exactly Normalize((0.5,)*3, (0.5,)*3) after ToTensor."""
    return images.float().div(255).sub(0.5).div(0.5)


def to_uint8(images):
    """float in [-1, 1] -> uint8, the inverse of `normalize` (for saving samples)."""
    return images.clamp(-1, 1).add(1).mul(127.5).round().to(torch.uint8)


def decode(path, size):
    """One image file -> (3, size, size) uint8, resized like torchvision's Resize on a PIL image."""
    try:
        with Image.open(path) as img:
            img = img.convert("RGB").resize((size, size), Image.BILINEAR)
    except FileNotFoundError:
        raise UserError(path, "image file not found") from None
    except Exception as e:  # PIL raises several types for broken files
        raise UserError(path, f"image failed to decode ({type(e).__name__}: {e})") from None
    return np.asarray(img).transpose(2, 0, 1).copy()


def _decode_chunk(args):
    paths, size = args
    return np.stack([decode(p, size) for p in paths])


def content_key(files, extra):
    """A digest of the files' bytes and `extra`: the cache is reused only for identical inputs."""
    digest = hashlib.blake2b(repr(extra).encode(), digest_size=16)
    for path in files:
        digest.update(str(path.name).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


@dataclass
class TrainingSet:
    images: torch.Tensor   # (N, 3, S, S) uint8
    labels: torch.Tensor   # (N, num_labels) float multi-hot
    names: list            # image file names, in train.json order
    label_names: list      # label names in index order
    label_maps: torch.Tensor | None = None  # (N, 64, 64) uint8 label seen at each pixel (lab.data.synthetic.label_maps)


def default_cache_dir():
    return Path(os.environ.get("DDPM_LAB_CACHE", Path.home() / ".cache" / "ddpm-lab"))


def load_train(root, image_size=64, image_dir="iclevr", cache_dir=None, workers=None):
    """Decode the training set once into `cache_dir` and load it from there afterwards."""
    root = Path(root)
    label_names = load_objects(root)
    train_path = root / "train.json"
    table = read_json(train_path)
    if not isinstance(table, dict):
        raise UserError(train_path, "expected a JSON object mapping image names to label lists")
    names = list(table)
    labels = multi_hot([table[n] for n in names], label_names, train_path)
    folder = root / image_dir
    if not folder.is_dir():
        raise UserError(folder, "image folder not found")
    paths = [folder / n for n in names]
    for path in paths:
        if not path.is_file():
            raise UserError(path, f"image file not found (listed in {train_path})")

    key = content_key([train_path, objects_path(root), *paths], (CACHE_VERSION, image_size))
    cache = Path(cache_dir or default_cache_dir()) / "decoded" / f"{key}.pt"
    images = _load_cache(cache, (len(paths), 3, image_size, image_size))
    if images is None:
        workers = workers or min(os.cpu_count() or 1, 8)
        chunks = [(paths[i:i + 256], image_size) for i in range(0, len(paths), 256)]
        with contextlib.ExitStack() as stack, tqdm(total=len(paths), desc=f"decoding {folder} (once)", unit="img",
                                                   mininterval=1, disable=None) as bar:
            if workers > 1 and len(chunks) > 1:
                decoded = stack.enter_context(ProcessPoolExecutor(workers)).map(_decode_chunk, chunks)
            else:
                decoded = map(_decode_chunk, chunks)
            arrays = []
            for array in decoded:
                arrays.append(array)
                bar.update(len(array))
        images = torch.from_numpy(np.concatenate(arrays))
        atomic_save(images, cache)  # a killed run never leaves a half-written cache; a full disk is one line
    return TrainingSet(images, labels, names, label_names)


def _load_cache(path, shape):
    """The decoded images cached at `path`, or None when there are none or they are damaged (then rebuilt)."""
    if not path.is_file():
        return None
    try:
        images = torch.load(path, weights_only=True)
        if isinstance(images, torch.Tensor) and images.dtype == torch.uint8 and tuple(images.shape) == shape:
            return images
    except Exception:  # truncated or corrupted: torch raises several types
        pass
    print(f"notice: {path}: damaged decoded-image cache; decoding the images again", file=sys.stderr)
    return None
