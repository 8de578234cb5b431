"""Synthetic i-CLEVR: render a data root in exactly the real format, deterministic by seed.

Like i-CLEVR, each scene holds 3 different objects rendered as images `_0`, `_1`, `_2` showing the
first 1, 2 and 3 of them (`objects=5` gives scenes of 5 and images of 1 to 5 objects, as the course's
evaluator was trained on). Besides train.json / test.json / new_test.json it writes the splits the real
set lacks: `val.json` (label sets for model selection, so the test sets are only used for final
scoring) and `heldout_pairs.json` / `heldout_test.json` (label pairs never seen together in training,
for compositional generalisation).

`repeats` (the evaluator's extra scenes) makes that share of the scenes name a label more than once: two, three or
more objects of one colour and shape, as generators wrongly draw them, so that the strict judge learns to count.
`write_kinds_root` renders the strict judge's held-out check: for label sets as the test files hold, the scene
drawn exactly, with an asked object twice, with an object nobody asked for, and with an asked object missing.
"""
import json
import os
import shutil
from multiprocessing import get_context
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from lab.data.render import COLORS, SHAPES, id_buffer, render_scene, sample_scene
from lab.data import default_cache_dir
from lab.errors import UserError

LABELS = [f"{color} {shape}" for shape in SHAPES for color in COLORS]  # the course's shape-major order
SPLIT_SIZES = {  # (singles, doubles, triples), as in the real files
    "test.json": (6, 12, 14),
    "new_test.json": (0, 12, 20),
    "val.json": (16, 24, 24),
}
NUM_HELDOUT_PAIRS = 8
GENERATOR_VERSION = 3  # bump when the renderer or the splits change: cached roots are regenerated
DEFAULT_SCENES = 6003  # the default root's scenes (3 images each, as the real training set's 18,009)
GROUND = 255  # object_maps' value where no object is seen


def _sample_set(rng, k, forbidden):
    """k distinct label indices containing none of the forbidden pairs."""
    while True:
        labels = [int(i) for i in rng.choice(len(LABELS), size=k, replace=False)]
        if not any(frozenset((a, b)) in forbidden for a in labels for b in labels if a != b):
            return labels


def _with_repeats(rng, scene):
    """The scene with some of its objects after the first replaced by copies of earlier ones (at least one)."""
    scene = list(scene)
    positions = [k for k in range(1, len(scene)) if rng.random() < 0.5] or [int(rng.integers(1, len(scene)))]
    for k in positions:
        scene[k] = scene[int(rng.integers(0, k))]
    return scene


def _balanced_scene(rng, counts, forbidden, objects=3):
    """`objects` distinct labels, favouring the rarest so far (with random jitter), so every label ends
    up in about as many images as the others; the object in position k appears in objects - k images."""
    scene = []
    for k in range(objects):
        allowed = [i for i in range(len(LABELS)) if i not in scene
                   and not any(frozenset((i, j)) in forbidden for j in scene)]
        label = min(allowed, key=lambda i: counts[i] + rng.uniform(0, 150))
        scene.append(label)
        counts[label] += objects - k
    return scene


def make_splits(seed, scenes, objects=3, repeats=0.0):
    """Label indices per training scene (ordered) and the label sets of every evaluation split. A root of more
    than DEFAULT_SCENES scenes has the default root's scenes and evaluation splits, then scenes of its own
    (from another random stream), so figures measured with more training scenes compare with the default's.
    A share `repeats` of the scenes (of 2 objects or more) repeats labels (`_with_repeats`)."""
    rng = np.random.default_rng([seed, 0])
    pairs = set()
    while len(pairs) < NUM_HELDOUT_PAIRS:
        pairs.add(frozenset(int(i) for i in rng.choice(len(LABELS), size=2, replace=False)))
    train, counts = [], np.zeros(len(LABELS))
    for _ in range(min(scenes, DEFAULT_SCENES)):
        train.append(_balanced_scene(rng, counts, pairs, objects))
    extra = np.random.default_rng([seed, 3])
    for _ in range(scenes - len(train)):
        train.append(_balanced_scene(extra, counts, pairs, objects))
    if repeats and objects > 1:
        repeating = np.random.default_rng([seed, 4])  # its own stream: the scenes without repeats stay as they were
        train = [_with_repeats(repeating, scene) if repeating.random() < repeats else scene for scene in train]
    splits, taken = {}, set()
    for name, counts in SPLIT_SIZES.items():
        sets = []
        for k, count in enumerate(counts, start=1):
            while sum(len(s) == k for s in sets) < count:
                labels = _sample_set(rng, k, pairs)
                if frozenset(labels) not in taken:  # evaluation sets are distinct across splits
                    taken.add(frozenset(labels))
                    sets.append(labels)
        splits[name] = sets
    heldout = [sorted(p) for p in sorted(pairs, key=sorted)]
    heldout_sets = [list(p) for p in heldout]
    while len(heldout_sets) < 32:  # each held-out pair plus a third label
        pair = heldout[len(heldout_sets) % len(heldout)]
        third = int(rng.choice([i for i in range(len(LABELS)) if i not in pair]))
        heldout_sets.append([*pair, third])
    splits["heldout_test.json"] = heldout_sets
    splits["heldout_pairs.json"] = heldout
    return train, splits


def scene_objects(seed, scene, labels):
    """The placed objects of training scene `scene` of a root of `seed` (labels: its label indices)."""
    rng = np.random.default_rng([seed, 1, scene])  # per scene: output does not depend on scheduling
    return sample_scene(rng, [tuple(LABELS[i].split()) for i in labels])


def _render_scene_files(args):
    """Render one scene as an image per prefix of its objects (`NAME_0.png` shows the first, ...), or with
    `prefixes` False as one image of all of them (`NAME.png`)."""
    folder, name, seed, scene, labels, width, height, prefixes = args
    objects = scene_objects(seed, scene, labels)
    shown = [objects[:k + 1] for k in range(len(objects))] if prefixes else [objects]
    for k, part in enumerate(shown):
        # One ray a pixel: every reader shrinks the 320x240 frame to 64x64 or less, where 2x2 supersampling
        # changes pixels by 0.04/255 on average and costs 2.4x the time.
        image = render_scene(part, width, height, supersample=1)
        Image.fromarray(image).save(folder / (f"{name}_{k}.png" if prefixes else f"{name}.png"), compress_level=1)


def _remove_dead_partials(out):
    """Folders of renders into `out` that were killed midway (their process is gone): never finished, never used."""
    for partial in out.parent.glob(f"{out.name}.partial*"):
        pid = partial.name.rpartition(".partial")[2]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(partial, ignore_errors=True)


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        pass
    return True


def _names_of(sets):
    return [[LABELS[i] for i in labels] for labels in sets]


def _write(out, jobs, files, workers=None, progress=True):
    """Render `jobs` (`_render_scene_files` arguments, their folder left out) and write `files` (name -> JSON
    content) into a root at `out`: written beside it first, then renamed into place, so that a root is whole or
    absent."""
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise UserError(out, "already exists and is not empty; choose another --out or remove it")
    _remove_dead_partials(out)
    partial = out.with_name(out.name + f".partial{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    (partial / "iclevr").mkdir(parents=True)
    try:
        with get_context("fork" if os.name == "posix" else "spawn").Pool(workers or os.cpu_count() or 1) as pool, \
                tqdm(total=len(jobs), desc=f"rendering {out.name}", unit="scene", mininterval=1,
                     disable=None if progress else True) as bar:
            for _ in pool.imap_unordered(_render_scene_files, [(partial / "iclevr", *job) for job in jobs],
                                         chunksize=16):
                bar.update()
    except BaseException:  # an interrupted render leaves nothing behind
        shutil.rmtree(partial, ignore_errors=True)
        raise
    files = {"objects.json": {name: i for i, name in enumerate(LABELS)}, **files}
    for name, content in files.items():
        (partial / name).write_text(json.dumps(content, indent=None if name == "train.json" else 1))
    try:
        if out.exists():
            out.rmdir()
        os.replace(partial, out)
    except OSError:  # another process finished the same root first: keep theirs
        shutil.rmtree(partial, ignore_errors=True)
        if not (out / "synthetic.json").is_file():
            raise
    return out


def write_root(out, scenes=DEFAULT_SCENES, seed=0, width=320, height=240, workers=None, progress=True, objects=3,
               repeats=0.0):
    """Render a complete root of `scenes` scenes of `objects` objects into `out`, a share `repeats` of them
    naming a label more than once."""
    train, splits = make_splits(seed, scenes, objects, repeats)
    names = [f"CLEVR_train_{scene:06d}" for scene in range(scenes)]
    jobs = [(names[s], seed, s, train[s], width, height, True) for s in range(scenes)]
    table = {f"{names[s]}_{k}.png": _names_of([train[s][:k + 1]])[0] for s in range(scenes) for k in range(objects)}
    meta = {"generator_version": GENERATOR_VERSION, "seed": seed, "scenes": scenes, "objects": objects,
            "width": width, "height": height, **({"repeats": repeats} if repeats else {})}
    return _write(out, jobs, {"train.json": table, **{name: _names_of(sets) for name, sets in splits.items()},
                              "synthetic.json": meta}, workers, progress)


KINDS = ("correct", "duplicated", "extra", "missing")  # what a drawn scene holds against the labels asked for


def kinds_scenes(seed, per_kind):
    """(kind, asked label indices, drawn label indices) for `per_kind` label sets of 1-3 labels (as many of each
    size as the test files hold: 6 : 12 : 14) in each of KINDS: drawn exactly; with one asked object twice; with
    one object of a label not asked; with one asked object left out (an empty floor for one asked)."""
    rng = np.random.default_rng([seed, 5])
    out = []
    for kind in KINDS:
        for i in range(per_kind):
            size = 1 + int(rng.choice(3, p=[6 / 32, 12 / 32, 14 / 32]))
            asked = [int(i) for i in rng.choice(len(LABELS), size=size, replace=False)]
            drawn = list(asked)
            if kind == "duplicated":
                drawn.append(asked[int(rng.integers(size))])
            elif kind == "extra":
                drawn.append(int(rng.choice([i for i in range(len(LABELS)) if i not in asked])))
            elif kind == "missing":
                drawn.pop(int(rng.integers(size)))
            out.append((kind, asked, drawn))
    return out


def write_kinds_root(out, per_kind=250, seed=20_001, width=320, height=240, workers=None, progress=True):
    """The strict judge's held-out check as a root: `kinds_scenes` drawn one image each; train.json names what
    each image holds (repeats for the duplicated kind), `asked.json` what was asked and `kinds.json` the kind."""
    scenes = kinds_scenes(seed, per_kind)
    names = [f"{kind}_{i:05d}" for i, (kind, _, _) in enumerate(scenes)]
    jobs = [(name, seed, i, drawn, width, height, False) for i, (name, (_, _, drawn)) in enumerate(zip(names, scenes))]
    files = {"train.json": {f"{name}.png": _names_of([drawn])[0] for name, (_, _, drawn) in zip(names, scenes)},
             "asked.json": {f"{name}.png": _names_of([asked])[0] for name, (_, asked, _) in zip(names, scenes)},
             "kinds.json": {f"{name}.png": kind for name, (kind, _, _) in zip(names, scenes)},
             "synthetic.json": {"generator_version": GENERATOR_VERSION, "seed": seed, "kinds": per_kind,
                                "width": width, "height": height}}
    return _write(out, jobs, files, workers, progress)


def synthetic_root_path(seed=0, scenes=DEFAULT_SCENES, cache_dir=None, objects=3, repeats=0.0):
    """Where the synthetic root of these settings is (or will be) rendered in the cache."""
    suffix = ("" if objects == 3 else f"-o{objects}") + (f"-r{round(100 * repeats)}" if repeats else "")
    return Path(cache_dir or default_cache_dir()) / f"synthetic-iclevr-v{GENERATOR_VERSION}-s{seed}-n{scenes}{suffix}"


def default_root(seed=0, scenes=DEFAULT_SCENES, cache_dir=None, objects=3, repeats=0.0):
    """The embedded default dataset: rendered into the cache folder on first use, reused afterwards."""
    root = synthetic_root_path(seed, scenes, cache_dir, objects, repeats)
    if not (root / "synthetic.json").is_file():
        print(f"Rendering the synthetic i-CLEVR set ({scenes} scenes of {objects} objects) into {root} (once)",
              flush=True)
        shutil.rmtree(root, ignore_errors=True)
        write_root(root, scenes=scenes, seed=seed, objects=objects, repeats=repeats)
    return root


def _scene_object_maps(args):
    seed, scene, labels, size, height = args
    objects = scene_objects(seed, scene, labels)
    # The frame is stretched to a square image as the renders are: cast `height` rows of `size`, stretch them.
    rows = ((np.arange(size) + 0.5) * height / size).astype(int)
    maps = []
    for k in range(len(objects)):
        nearest = id_buffer(objects[:k + 1], size, height)[rows]
        seen = np.where(nearest >= 0, np.array(labels)[nearest], GROUND)
        maps.append(np.stack([seen, np.where(nearest >= 0, nearest, GROUND)]).astype(np.uint8))
    return scene, maps


def object_maps(root, size=64, workers=None):
    """(N, 2, size, size) uint8 array for the training images of a synthetic root, in train.json order: per pixel
    the label index of the object seen there and which object of its scene it is (its place in the scene), GROUND
    where the ground shows. Recomputed from the root's seed (a few seconds); None for a real root, which has no
    such maps."""
    meta_path = Path(root) / "synthetic.json"
    if not meta_path.is_file():
        return None
    meta = json.loads(meta_path.read_text())
    train, _ = make_splits(meta["seed"], meta["scenes"], meta["objects"], meta.get("repeats", 0.0))
    height = round(size * meta["height"] / meta["width"])
    jobs = [(meta["seed"], scene, labels, size, height) for scene, labels in enumerate(train)]
    with get_context("fork" if os.name == "posix" else "spawn").Pool(workers or os.cpu_count() or 1) as pool:
        per_scene = dict(pool.imap_unordered(_scene_object_maps, jobs, chunksize=32))
    maps = []
    for name in json.loads((Path(root) / "train.json").read_text()):
        scene, k = name.removesuffix(".png").rsplit("_", 2)[1:]  # CLEVR_train_{scene}_{k}.png
        maps.append(per_scene[int(scene)][int(k)])
    return np.stack(maps)
