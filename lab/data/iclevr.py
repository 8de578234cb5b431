"""Read an i-CLEVR data root in the course's format, real or synthetic, into cached tensors.

A root holds `train.json` (image name -> label names), `objects.json` or `object.json` (label name ->
index), `test.json` / `new_test.json` (lists of label lists) and an image folder (`iclevr/`).
Images are decoded once into a uint8 tensor file keyed by the inputs' content, so later runs load
the whole training set in seconds and can keep it resident on the GPU.
"""
import contextlib
import hashlib
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
from lab.data.labels import image_paths, load_objects, objects_path, read_label_sets, read_train_table
from lab.data.prepare import excluded_images
from lab.data import default_cache_dir
from lab.errors import UserError

CACHE_VERSION = 1  # bump when the decoding below changes


def multi_hot(indices, num_labels):
    """(M, num_labels) float multi-hot rows for lists of label indices."""
    out = torch.zeros(len(indices), num_labels)
    for row, labels in enumerate(indices):
        out[row, labels] = 1.0
    return out


def label_counts(indices, num_labels):
    """(M, num_labels) uint8: how many objects of each label every list names (a count scene names one twice)."""
    out = torch.zeros(len(indices), num_labels, dtype=torch.uint8)
    for row, labels in enumerate(indices):
        for label in labels:
            out[row, label] += 1
    return out


def load_condition_sets(root, name="test.json"):
    """A list of label lists (test.json, new_test.json, val.json, ...) as (M, N) multi-hot rows."""
    return multi_hot(read_label_sets(root, name), len(load_objects(root)))


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
    # (N, 2, 64, 64) uint8: the label and the object seen at each pixel (lab.data.synthetic.object_maps)
    object_maps: torch.Tensor | None = None
    counts: torch.Tensor | None = None  # (N, num_labels) uint8 objects of each label (repeats in train.json)


def load_train(root, image_size=64, image_dir="iclevr", cache_dir=None, workers=None):
    """Decode the training set once into `cache_dir` and load it from there afterwards."""
    root = Path(root)
    label_names = load_objects(root)
    names, indices = read_train_table(root)
    held = excluded_images(root)  # val.json's label sets, held out of training by `python -m lab.data prepare`
    if held:
        names, indices = zip(*[(n, i) for n, i in zip(names, indices) if n not in held])
        names, indices = list(names), list(indices)
    paths = image_paths(root, names, image_dir)
    folder = root / image_dir
    key = content_key([root / "train.json", objects_path(root), *paths], (CACHE_VERSION, image_size))
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
    return TrainingSet(images, multi_hot(indices, len(label_names)), names, label_names,
                       counts=label_counts(indices, len(label_names)))


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
