"""The real-format reader, the synthetic root's format and splits, and the decode cache."""
import json
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

from lab.data import iclevr
from lab.data.iclevr import load_condition_sets, load_train, normalize, to_uint8
from lab.data.labels import load_objects
from lab.data.synthetic import LABELS, write_root
from lab.errors import UserError

REAL = Path(__file__).parent.parent.parent / "shared" / "iclevr"  # a real root beside the checkout, where there is one


def test_tiny_root_loads_in_the_real_format(tiny_root, tmp_path):
    data = load_train(tiny_root, cache_dir=tmp_path)
    assert data.images.shape == (60, 3, 64, 64) and data.images.dtype == torch.uint8
    assert data.labels.shape == (60, 24) and len(data.label_names) == 24
    assert data.label_names == LABELS
    # images _0, _1, _2 of a scene hold its first 1, 2, 3 objects
    table = json.loads((tiny_root / "train.json").read_text())
    scene = sorted(n for n in table if n.startswith("CLEVR_train_000007_"))
    assert [len(table[n]) for n in scene] == [1, 2, 3]
    assert table[scene[1]][:1] == table[scene[0]] and table[scene[2]][:2] == table[scene[1]]
    assert len(set(table[scene[2]])) == 3
    with Image.open(tiny_root / "iclevr" / scene[0]) as img:
        assert img.size == (320, 240) and img.format == "PNG"
    x = normalize(data.images)
    assert -1 <= x.min() < -0.5 and 0.5 < x.max() <= 1
    assert torch.equal(to_uint8(x), data.images)


def test_synthetic_splits(tiny_root):
    sizes = {name: load_condition_sets(tiny_root, name).sum(1).int().tolist()
             for name in ("test.json", "new_test.json", "val.json", "heldout_test.json")}
    assert [sizes["test.json"].count(k) for k in (1, 2, 3)] == [6, 12, 14]
    assert [sizes["new_test.json"].count(k) for k in (1, 2, 3)] == [0, 12, 20]
    assert len(sizes["val.json"]) == 64 and len(sizes["heldout_test.json"]) == 32
    # held-out pairs never appear together in a training image, and every held-out set has one
    pairs = [set(p) for p in json.loads((tiny_root / "heldout_pairs.json").read_text())]
    train = json.loads((tiny_root / "train.json").read_text())
    assert not any(p <= set(labels) for p in pairs for labels in train.values())
    heldout = json.loads((tiny_root / "heldout_test.json").read_text())
    assert all(any(p <= set(s) for p in pairs) for s in heldout)
    # validation sets are not test sets: selection never sees the test conditions
    test_sets = {frozenset(s) for name in ("test.json", "new_test.json")
                 for s in json.loads((tiny_root / name).read_text())}
    assert not test_sets & {frozenset(s) for s in json.loads((tiny_root / "val.json").read_text())}


def test_object_maps_show_each_images_objects_where_they_are_drawn(tiny_root, tmp_path):
    """The evaluator's dense targets: per pixel, the label of the object drawn there and which object of its scene
    it is (GROUND elsewhere)."""
    from lab.data.render import render_scene
    from lab.data.synthetic import GROUND, object_maps
    data = load_train(tiny_root, cache_dir=tmp_path)
    maps = torch.from_numpy(object_maps(tiny_root, workers=1))
    assert maps.shape == (len(data.names), 2, 64, 64) and maps.dtype == torch.uint8
    for name, image_labels, image_map in zip(data.names, data.labels, maps):
        assert set(image_map[0].unique().tolist()) - {GROUND} == set(image_labels.nonzero().flatten().tolist())
        shown = int(name.removesuffix(".png").rsplit("_", 1)[1]) + 1  # CLEVR_train_{scene}_{k}: k + 1 objects
        assert set(image_map[1].unique().tolist()) - {GROUND} == set(range(shown))
        assert torch.equal(image_map[0] == GROUND, image_map[1] == GROUND)
    Image.fromarray(render_scene([], supersample=1)).save(tmp_path / "ground.png")
    ground = torch.from_numpy(iclevr.decode(tmp_path / "ground.png", 64)).int()
    changed = (data.images.int() - ground).abs().sum(1) > 24  # (N, 64, 64): pixels the objects alter
    on_objects = changed[maps[:, 0] != GROUND].float().mean()
    on_ground = changed[maps[:, 0] == GROUND].float().mean()  # shadows and the objects' blurred edges
    assert on_objects > 0.9 and on_ground < 0.05, (on_objects, on_ground)
    assert object_maps(tmp_path) is None  # a real root (no synthetic.json) has none


def test_render_is_deterministic_by_seed(tmp_path, tiny_root):
    again = write_root(tmp_path / "again", scenes=20, seed=1, workers=2, progress=False)
    for name in ("train.json", "test.json", "val.json", "iclevr/CLEVR_train_000013_2.png"):
        assert (again / name).read_bytes() == (tiny_root / name).read_bytes()
    other = write_root(tmp_path / "other", scenes=20, seed=2, workers=1, progress=False)
    assert (other / "train.json").read_bytes() != (tiny_root / "train.json").read_bytes()


def test_label_frequencies_near_uniform(tmp_path):
    from lab.data.synthetic import make_splits
    train, _ = make_splits(seed=0, scenes=6003)
    counts = torch.zeros(24)
    for labels in train:
        for k in range(3):
            counts[labels[:k + 1]] += 1
    assert counts.sum() == 6003 * 6 and counts.min() > 0.9 * counts.mean() and counts.max() < 1.1 * counts.mean()


def test_more_scenes_keep_the_default_roots_scenes_and_evaluation_splits():
    """data.synthetic_scenes above the default adds training scenes only: val and the test sets stay those
    every figure was measured on, the held-out pairs stay out of training and the labels stay balanced."""
    from lab.data.synthetic import DEFAULT_SCENES, make_splits
    train, splits = make_splits(seed=0, scenes=DEFAULT_SCENES)
    more, more_splits = make_splits(seed=0, scenes=DEFAULT_SCENES + 3000)
    assert more[:DEFAULT_SCENES] == train and more_splits == splits and len(set(map(tuple, more))) > len(set(map(tuple, train)))
    pairs = [set(p) for p in splits["heldout_pairs.json"]]
    assert not any(p <= set(labels) for p in pairs for labels in more)
    counts = torch.bincount(torch.tensor([label for labels in more for label in labels]), minlength=24).float()
    assert counts.min() > 0.9 * counts.mean() and counts.max() < 1.1 * counts.mean()


def real_named_root(tmp_path, n=30, rgba=True):
    """A root with the real course label files and images named as in them (our renders as pixels)."""
    root = tmp_path / "real"
    (root / "iclevr").mkdir(parents=True)
    table = json.loads((REAL / "train.json").read_text())
    subset = dict(list(table.items())[:n])
    (root / "train.json").write_text(json.dumps(subset))
    shutil.copy(REAL / "objects.json", root / "objects.json")
    for name in ("test.json", "new_test.json"):
        shutil.copy(REAL / name, root / name)
    for i, name in enumerate(subset):
        mode = "RGBA" if rgba and i % 2 else "RGB"
        Image.new(mode, (320, 240), (20 * (i % 12), 100, 200, 255)[:len(mode)]).save(root / "iclevr" / name)
    return root, subset


@pytest.mark.skipif(not REAL.is_dir(), reason="needs ../shared/iclevr")
def test_reader_on_the_real_label_files(tmp_path):
    root, subset = real_named_root(tmp_path)
    data = load_train(root, cache_dir=tmp_path / "cache")
    assert data.images.shape == (30, 3, 64, 64)
    names = json.loads((REAL / "objects.json").read_text())
    first = next(iter(subset))
    assert data.names[0] == first
    assert {data.label_names[i] for i in data.labels[0].nonzero().flatten()} == set(subset[first])
    assert data.label_names == sorted(names, key=names.get)
    # RGBA originals lose their alpha like the course's .convert('RGB')
    assert data.images[1, :, 0, 0].tolist() == [20, 100, 200]
    for name, total in (("test.json", 32), ("new_test.json", 32)):
        assert load_condition_sets(root, name).shape == (total, 24)
    # the real object.json spelling works too
    (root / "objects.json").rename(root / "object.json")
    assert load_objects(root) == data.label_names


def test_cache_is_reused_and_invalidated(tiny_root, tmp_path, monkeypatch):
    root = tmp_path / "root"
    shutil.copytree(tiny_root, root)
    first = load_train(root, cache_dir=tmp_path / "cache", workers=1)
    assert len(list((tmp_path / "cache" / "decoded").glob("*.pt"))) == 1

    def no_decoding(*args):
        raise AssertionError("decoded again although nothing changed")
    monkeypatch.setattr(iclevr, "_decode_chunk", no_decoding)
    again = load_train(root, cache_dir=tmp_path / "cache", workers=1)
    assert torch.equal(again.images, first.images)

    monkeypatch.undo()
    Image.new("RGB", (320, 240), (255, 0, 0)).save(root / "iclevr" / first.names[5])
    changed = load_train(root, cache_dir=tmp_path / "cache", workers=1)
    assert changed.images[5].float().mean(dim=(1, 2)).tolist() == [255.0, 0.0, 0.0]
    assert torch.equal(changed.images[:5], first.images[:5])
    assert len(list((tmp_path / "cache" / "decoded").glob("*.pt"))) == 2


def broken(tiny_root, tmp_path, edit):
    root = tmp_path / "bad"
    shutil.copytree(tiny_root, root)
    edit(root)
    return root


@pytest.mark.parametrize("edit, where, words", [
    (lambda r: shutil.rmtree(r), "bad", "data root not found"),
    (lambda r: (r / "objects.json").unlink(), "objects.json", "file not found"),
    (lambda r: (r / "train.json").unlink(), "train.json", "file not found"),
    (lambda r: shutil.rmtree(r / "iclevr"), "iclevr", "image folder not found"),
    (lambda r: (r / "iclevr" / "CLEVR_train_000003_1.png").unlink(), "CLEVR_train_000003_1.png", "not found"),
    (lambda r: (r / "train.json").write_text('{"a.png": ["red cube"'), "train.json", "malformed JSON at line 1"),
    (lambda r: (r / "train.json").write_text('{"CLEVR_train_000000_0.png": ["pink cube"]}'),
     "train.json", "'pink cube' is not in objects.json"),
    (lambda r: (r / "objects.json").write_text('{"red cube": 0, "blue cube": 2}'), "objects.json",
     "not a bijection onto 0..1"),
    (lambda r: (r / "objects.json").write_text('{"red cube": 0, "blue cube": 0}'), "objects.json",
     "not a bijection"),
    (lambda r: (r / "iclevr" / "CLEVR_train_000002_0.png").write_bytes(b"\x89PNG not really"),
     "CLEVR_train_000002_0.png", "failed to decode"),
])
def test_bad_roots_give_one_clear_line(tiny_root, tmp_path, edit, where, words):
    root = broken(tiny_root, tmp_path, edit)
    with pytest.raises(UserError) as err:
        load_train(root, cache_dir=tmp_path / "cache", workers=1)
    message = str(err.value)
    assert where in message and words in message and "\n" not in message
    assert not (tmp_path / "cache" / "decoded").exists() or not list((tmp_path / "cache" / "decoded").iterdir())


def test_bad_condition_file(tiny_root, tmp_path):
    root = broken(tiny_root, tmp_path, lambda r: (r / "test.json").write_text('[["red cube"], ["red cubes"]]'))
    with pytest.raises(UserError, match=r"test.json: entry 1: label 'red cubes' is not in objects.json"):
        load_condition_sets(root, "test.json")


def test_cli_render_and_info(tmp_path, capsys):
    from lab.data.__main__ import main
    assert main(["render", "--out", str(tmp_path / "x"), "--scenes", "4", "--seed", "1", "--workers", "1"]) == 0
    assert (tmp_path / "x" / "contact_sheet.png").is_file()
    assert main(["info", str(tmp_path / "x")]) == 0
    out = capsys.readouterr().out
    assert "12 images (3, 64, 64), 24 labels" in out
    assert main(["render", "--out", str(tmp_path / "x"), "--scenes", "4"]) == 1
    assert "already exists" in capsys.readouterr().err
