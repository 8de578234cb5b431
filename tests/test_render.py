"""The CLEVR-like renderer: format, determinism, colours, occlusion, shadows, anti-aliasing, placement."""
import colorsys
import math

import numpy as np
import pytest

from lab.data import render
from lab.data.render import COLORS, SIZES, SceneObject, id_buffer, render_scene, sample_scene

LABELS = [("red", "sphere"), ("blue", "cube"), ("yellow", "cylinder")]


def obj(shape="sphere", color="red", size="large", material="rubber", x=0.0, y=0.0, angle=0.0):
    return SceneObject(shape, color, size, material, x, y, angle)


def changed(image, background, threshold=12):
    return (np.abs(image.astype(int) - background).max(axis=2) > threshold)


@pytest.fixture(scope="module")
def background():
    return render_scene([]).astype(int)


def test_format_and_determinism():
    scene = sample_scene(np.random.default_rng(3), LABELS)
    image = render_scene(scene)
    assert image.dtype == np.uint8 and image.shape == (240, 320, 3)
    assert np.array_equal(image, render_scene(scene))
    assert render_scene(scene, 64, 48, supersample=1).shape == (48, 64, 3)


def test_sample_scene_is_deterministic_by_seed():
    first = sample_scene(np.random.default_rng(7), LABELS)
    assert first == sample_scene(np.random.default_rng(7), LABELS)
    assert first != sample_scene(np.random.default_rng(8), LABELS)
    assert [(o.color, o.shape) for o in first] == LABELS


def test_camera_jitter_moves_the_view_reproducibly():
    scene = [obj()]
    jittered = render_scene(scene, camera_jitter=np.random.default_rng(1))
    assert np.array_equal(jittered, render_scene(scene, camera_jitter=np.random.default_rng(1)))
    assert not np.array_equal(jittered, render_scene(scene))


def hue(rgb):
    return colorsys.rgb_to_hsv(*(np.asarray(rgb, float) / 255))[0]


def hue_distance(a, b):
    return min(abs(a - b), 1 - abs(a - b))


@pytest.mark.parametrize("color", list(COLORS))
def test_base_colour_dominates_the_object(color, background):
    image = render_scene([obj(color=color)])
    # Pixels that changed include the gray shadow; adding gray leaves the hue unchanged.
    mean = image[changed(image, background)].mean(axis=0)
    saturation = colorsys.rgb_to_hsv(*(mean / 255))[1]
    if color == "gray":
        assert saturation < 0.1
        return
    assert saturation > 0.2
    nearest = min((c for c in COLORS if c != "gray"), key=lambda c: hue_distance(hue(COLORS[c]), hue(mean)))
    assert nearest == color


def test_materials_look_different():
    rubber, metal = (render_scene([obj(color="blue", material=m)]) for m in ("rubber", "metal"))
    mask = id_buffer([obj()]) == 0
    assert np.abs(rubber[mask].astype(int) - metal[mask]).mean() > 15
    assert metal[mask].max() > 250  # the metal highlight is white-hot


def test_near_object_hides_far_one():
    far = obj("sphere", "red", size="small", x=-1.5, y=1.5)
    # A tall cylinder on the line of sight from the camera to the far sphere's centre, where it is 0.9 high.
    eye, centre = np.array(render.CAMERA_POSITION), np.array([far.x, far.y, far.radius])
    on_sight = centre + (0.9 - centre[2]) / (eye[2] - centre[2]) * (eye - centre)
    near = obj("cylinder", "blue", x=float(on_sight[0]), y=float(on_sight[1]))
    both, near_alone = render_scene([far, near]), render_scene([near])
    overlap = (id_buffer([far]) == 0) & (id_buffer([near]) == 0)
    assert overlap.sum() > 300
    # The far sphere does not show through: its pixels there are exactly as without it.
    assert np.mean(np.all(both[overlap] == near_alone[overlap], axis=1)) > 0.95
    assert (id_buffer([far, near])[overlap] == 1).all() and (id_buffer([near, far])[overlap] == 0).all()


@pytest.mark.parametrize("shape", ["cube", "sphere", "cylinder"])
def test_shadow_darkens_the_ground_away_from_the_light(shape, background):
    thing = obj(shape, "green")
    image = render_scene([thing]).astype(int)
    camera = render._camera(320, 240, None)
    away = -render.KEY_LIGHT[:2] / np.linalg.norm(render.KEY_LIGHT[:2])
    base, shadow_side, lit_side = camera.project(np.array([[0.0, 0.0, 0.0], [*away, 0.0], [*-1.5 * away, 0.0]]))
    shaded = (id_buffer([thing]) == -1) & (image.mean(axis=2) < background.mean(axis=2) - 15)
    assert shaded.sum() > 200
    rows, cols = np.nonzero(shaded)
    offset = np.array([cols.mean(), rows.mean()]) - base
    assert offset @ (shadow_side - base) > 0  # on the ground, mostly on the side away from the light
    col, row = lit_side.astype(int)
    assert np.array_equal(image[row, col], background[row, col])  # the lit side is untouched


def rows_with_blended_edge(supersample):
    """Fraction of rows whose pixels at the cube's right silhouette include a blend of cube and ground."""
    cube = obj("cube", angle=20)  # flat faces: shading cannot fake a blend
    image = render_scene([cube], supersample=supersample).astype(int)
    redness = image[..., 0] - image[..., 1]
    ids = id_buffer([cube])
    blended = []
    for row in np.nonzero((ids == 0).any(axis=1))[0]:
        col = np.nonzero(ids[row] == 0)[0].max()
        inside, outside = redness[row, col - 2], redness[row, col + 3]
        share = (redness[row, col - 1:col + 3] - outside) / (inside - outside)
        blended.append(((share > 0.15) & (share < 0.85)).any())
    return np.mean(blended)


def test_supersampling_blends_the_edges():
    assert rows_with_blended_edge(1) < 0.2
    assert rows_with_blended_edge(2) > 0.5


@pytest.mark.parametrize("seed", range(8))
def test_sample_scene_places_visible_spread_objects(seed):
    rng = np.random.default_rng(seed)
    labels = [LABELS, [("green", "cube"), ("gray", "sphere")], [("cyan", "cylinder")]][seed % 3]
    scene = sample_scene(rng, labels)
    for a in range(len(scene)):
        for b in range(a):
            gap = math.hypot(scene[a].x - scene[b].x, scene[a].y - scene[b].y) - scene[a].radius - scene[b].radius
            assert gap >= render.MIN_GAP
    for thing in scene:
        alone = id_buffer([thing]) == 0
        rows, cols = np.nonzero(alone)
        assert rows.min() > 0 and cols.min() > 0 and rows.max() < 239 and cols.max() < 319  # inside the view
        assert rows.max() - rows.min() + 1 >= 22  # at least ~6 px tall at 64x64
    for k in range(1, len(scene) + 1):
        ids = id_buffer(scene[:k])
        for index, thing in enumerate(scene[:k]):
            visible, own = (ids == index).sum(), (id_buffer([thing]) == 0).sum()
            assert visible >= 0.6 * own and visible >= 150


def test_sample_scene_rejects_unknown_labels():
    with pytest.raises(ValueError):
        sample_scene(np.random.default_rng(0), [("pink", "sphere")])


def test_sizes_are_clevrs():
    assert SIZES == {"large": 0.7, "small": 0.35}
    assert obj("cube").height == pytest.approx(2 * 0.7 / math.sqrt(2))
    assert obj("cylinder", size="small").height == pytest.approx(0.7)
