"""A fast numpy ray caster for CLEVR-like scenes (a synthetic twin of i-CLEVR, no Blender).

Geometry follows CLEVR: every object rests on the ground and spans z in [0, 2 * size]; spheres have
radius `size`, cylinders radius `size`, cubes half-extent `size / sqrt(2)` (so every footprint fits a
circle of radius `size`). The camera looks at the origin from CLEVR's direction, moved closer so that
small objects stay recognisable at 64x64. Rays are cast only inside each object's projected box, and
shadows are evaluated only inside each shadow's projected box; the rest of the frame is a cached
background per camera. Objects cast soft shadows on the ground, not on each other.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

SHAPES = ("cube", "sphere", "cylinder")
COLORS = {"gray": (87, 87, 87), "red": (173, 35, 35), "blue": (42, 75, 215), "green": (29, 105, 20),
          "brown": (129, 74, 25), "purple": (129, 38, 192), "cyan": (41, 208, 208), "yellow": (255, 238, 51)}
SIZES = {"large": 0.7, "small": 0.35}  # CLEVR's object "radius" in scene units
MATERIALS = ("rubber", "metal")

CAMERA_POSITION = (5.6, -4.95, 4.2)  # CLEVR's (7.5, -6.6, 5.6) scaled by 0.75
HORIZONTAL_FOV_DEG = 50.0
CAMERA_JITTER = 0.15  # standard deviation of the camera offset per axis when jitter is asked for
KEY_LIGHT = np.array([6.4, -2.9, 4.3], np.float32)  # point light, in front and to the right
FILL_DIRECTION = np.array([-0.6, -0.55, 0.58], np.float32)
BACK_DIRECTION = np.array([-0.2, 0.8, 0.56], np.float32)
GROUND_ALBEDO = 0.52
PENUMBRA = 0.14  # half-width of the shadow's soft edge, in scene units
MIN_GAP = 0.3  # minimum free distance between object footprints
PLACEMENT_RANGE = 2.6  # positions are drawn from [-range, range]^2 and kept if fully in view
MAX_GROUND_DISTANCE = 8.0  # from the camera's foot: far objects would be too small at 64x64
MIN_VISIBLE_FRACTION = 0.85  # of an object's pixels when alone, in every prefix of a scene
VISIBILITY_RESOLUTION = (160, 120)  # id buffer size for the visibility check while sampling
for _v in (FILL_DIRECTION, BACK_DIRECTION):
    _v /= np.linalg.norm(_v)


@dataclass(frozen=True)
class SceneObject:
    shape: str
    color: str
    size: str
    material: str
    x: float
    y: float
    angle: float  # rotation about the vertical axis, degrees

    @property
    def radius(self) -> float:
        return SIZES[self.size]

    @property
    def height(self) -> float:
        return 2 * self.radius / math.sqrt(2) if self.shape == "cube" else 2 * self.radius


@dataclass(frozen=True)
class _Camera:
    position: tuple
    width: int
    height: int

    @functools.cached_property
    def basis(self):
        """Forward, right and up unit vectors and the focal length in pixels."""
        eye = np.array(self.position, np.float64)
        forward = -eye / np.linalg.norm(eye)
        right = np.cross(forward, [0.0, 0.0, 1.0])
        right /= np.linalg.norm(right)
        up = np.cross(right, forward)
        focal = self.width / 2 / math.tan(math.radians(HORIZONTAL_FOV_DEG) / 2)
        return forward, right, up, focal

    def project(self, points: np.ndarray) -> np.ndarray:
        """Pixel coordinates (x right, y down) of world points, shape (n, 2)."""
        forward, right, up, focal = self.basis
        rel = points - np.array(self.position)
        depth = rel @ forward
        return np.stack([self.width / 2 + focal * (rel @ right) / depth,
                         self.height / 2 - focal * (rel @ up) / depth], axis=1)

    def rays(self, box, ss: int) -> np.ndarray:
        """Unit ray directions (h*ss, w*ss, 3) for the pixel box (x0, y0, x1, y1), ss*ss rays a pixel."""
        x0, y0, x1, y1 = box
        forward, right, up, focal = (np.float32(v) for v in self.basis)
        a = ((np.arange(x0 * ss, x1 * ss, dtype=np.float32) + 0.5) / ss - self.width / 2) / focal
        b = (self.height / 2 - (np.arange(y0 * ss, y1 * ss, dtype=np.float32) + 0.5) / ss) / focal
        length = np.sqrt(1.0 + b[:, None] ** 2 + a[None, :] ** 2)[..., None]  # the basis is orthonormal
        return (forward + b[:, None, None] * up + a[None, :, None] * right) / length

    def box(self, points: np.ndarray, margin: int = 1):
        """Integer pixel box covering the projected points, clipped to the frame (None if empty)."""
        xy = self.project(points)
        x0, y0 = np.floor(xy.min(0)).astype(int) - margin
        x1, y1 = np.ceil(xy.max(0)).astype(int) + margin
        x0, y0, x1, y1 = max(x0, 0), max(y0, 0), min(x1, self.width), min(y1, self.height)
        return (x0, y0, x1, y1) if x0 < x1 and y0 < y1 else None


def _to_uint8(image: np.ndarray, ss: int) -> np.ndarray:
    h, w = image.shape[0] // ss, image.shape[1] // ss
    # Strided sums: much faster than a mean over the reshaped sample axes.
    mean = sum(image[i::ss, j::ss] for i in range(ss) for j in range(ss)) / (ss * ss)
    return (np.clip(mean, 0.0, 1.0) * 255 + 0.5).astype(np.uint8)


def _ground(camera: _Camera, ss: int):
    """Ground hit points and shading split into ambient and key-light parts, plus the empty frame."""
    dirs = camera.rays((0, 0, camera.width, camera.height), ss)
    eye = np.array(camera.position, np.float32)
    points = eye + (-eye[2] / dirs[..., 2])[..., None] * dirs
    # Key light with a soft distance falloff (1 at the origin) over a flat ambient term: the
    # ground darkens gently toward the horizon, like CLEVR's.
    distance = np.linalg.norm(KEY_LIGHT - points, axis=2)
    key = GROUND_ALBEDO * 0.5 * (KEY_LIGHT @ KEY_LIGHT + 150.0) / (distance ** 2 + 150.0)
    ambient = np.full_like(key, GROUND_ALBEDO * 0.45)
    background = _to_uint8((ambient + key)[..., None].repeat(3, axis=2), ss)
    return points[..., 0].copy(), points[..., 1].copy(), ambient, key, background


_cached_ground = functools.lru_cache(maxsize=4)(_ground)  # jittered cameras bypass it: never reused


def _light_direction(obj: SceneObject) -> np.ndarray:
    to_key = KEY_LIGHT - np.array([obj.x, obj.y, obj.height / 2], np.float32)
    return to_key / np.linalg.norm(to_key)


def _smoothstep(edge0: float, edge1: float, x: np.ndarray) -> np.ndarray:
    t = np.clip((x - edge0) / (edge1 - edge0), 0.0, 1.0)
    return t * t * (3 - 2 * t)


def _shadow_and_occlusion(obj: SceneObject, gx: np.ndarray, gy: np.ndarray):
    """Key-light visibility and ambient occlusion of ground points (gx, gy) near one object."""
    light = _light_direction(obj)
    r, h = obj.radius, obj.height
    dx, dy = gx - obj.x, gy - obj.y
    if obj.shape == "sphere":  # distance from the centre to the shadow ray, minus the radius
        along = dx * -light[0] + dy * -light[1] + r * light[2]
        shadow_sdf = np.sqrt(np.maximum(dx * dx + dy * dy + r * r - along * along, 0.0)) - r
        footprint_sdf = np.sqrt(dx * dx + dy * dy) - 0.5 * r
    else:
        # The shadow of an upright prism under a directional light is its footprint swept
        # along the segment from the object to the shadow tip (a capsule or a hexagon).
        sweep = -h / light[2] * light[:2]
        if obj.shape == "cylinder":
            s = np.clip((dx * sweep[0] + dy * sweep[1]) / (sweep @ sweep), 0.0, 1.0)
            shadow_sdf = np.hypot(dx - s * sweep[0], dy - s * sweep[1]) - r
            footprint_sdf = np.hypot(dx, dy) - r
        else:
            half = r / math.sqrt(2)
            cos, sin = math.cos(math.radians(obj.angle)), math.sin(math.radians(obj.angle))
            side = np.array([-sweep[1], sweep[0]]) / np.linalg.norm(sweep)
            normals = np.array([[cos, sin], [-cos, -sin], [-sin, cos], [sin, -cos], side, -side])
            support = half * (np.abs(normals @ [cos, sin]) + np.abs(normals @ [-sin, cos]))
            support += np.maximum(normals @ sweep, 0.0)
            shadow_sdf = np.max([nx * dx + ny * dy - k for (nx, ny), k in zip(normals, support)], axis=0)
            footprint_sdf = np.max([nx * dx + ny * dy for nx, ny in normals[:4]], axis=0) - half
    visibility = _smoothstep(-PENUMBRA, PENUMBRA, shadow_sdf)
    occlusion = 1.0 - 0.3 * (1.0 - _smoothstep(0.0, 0.6 * r, footprint_sdf))
    return visibility, occlusion


def _intersect(obj: SceneObject, eye: np.ndarray, dirs: np.ndarray):
    """Ray parameter (inf on a miss) and a function giving unit normals of the hit rays."""
    r, h = obj.radius, obj.height
    dx, dy, dz = dirs[:, 0], dirs[:, 1], dirs[:, 2]
    ox, oy, oz = eye[0] - obj.x, eye[1] - obj.y, eye[2]
    if obj.shape == "sphere":
        oz -= r
        b = dx * ox + dy * oy + dz * oz
        disc = b * b - (ox * ox + oy * oy + oz * oz - r * r)
        t = np.where(disc > 0, -b - np.sqrt(np.maximum(disc, 0.0)), np.inf)
        return t, lambda hit, t: (np.array([ox, oy, oz], np.float32) + t[:, None] * dirs[hit]) / r
    if obj.shape == "cylinder":
        t_cap = (h - oz) / dz  # the camera is above every object, so the top cap is hit first
        on_cap = (ox + t_cap * dx) ** 2 + (oy + t_cap * dy) ** 2 <= r * r
        a = dx * dx + dy * dy
        b = dx * ox + dy * oy
        disc = b * b - a * (ox * ox + oy * oy - r * r)
        t_side = (-b - np.sqrt(np.maximum(disc, 0.0))) / a
        z_side = oz + t_side * dz
        t = np.where(on_cap, t_cap, np.where((disc > 0) & (z_side >= 0) & (z_side <= h), t_side, np.inf))

        def cylinder_normals(hit, t):
            normal = np.zeros((len(t), 3), np.float32)
            normal[:, 0] = (ox + t * dx[hit]) / r
            normal[:, 1] = (oy + t * dy[hit]) / r
            return np.where(on_cap[hit, None], np.float32([0, 0, 1]), normal)
        return t, cylinder_normals
    # Cube: slab test in the cube's own frame.
    half = h / 2
    cos, sin = math.cos(math.radians(obj.angle)), math.sin(math.radians(obj.angle))
    rotation = np.array([[cos, sin, 0], [-sin, cos, 0], [0, 0, 1]], np.float32)
    origin = rotation @ np.array([ox, oy, oz - half], np.float32)
    local = dirs @ rotation.T
    local = np.where(np.abs(local) < 1e-9, 1e-9, local)
    t0 = (-half - origin) / local
    t1 = (half - origin) / local
    near = np.minimum(t0, t1)
    far = np.maximum(t0, t1)
    t_near = np.maximum(np.maximum(near[:, 0], near[:, 1]), near[:, 2])
    t_far = np.minimum(np.minimum(far[:, 0], far[:, 1]), far[:, 2])
    t = np.where((t_near < t_far) & (t_near > 0), t_near, np.inf)

    def cube_normals(hit, t):
        axis = near[hit].argmax(axis=1)
        normal = np.zeros((len(t), 3), np.float32)
        normal[np.arange(len(t)), axis] = -np.sign(local[hit, axis])
        return normal @ rotation
    return t, cube_normals


def _shade(obj: SceneObject, normals: np.ndarray, view: np.ndarray) -> np.ndarray:
    """RGB in [0, 1]-ish for unit normals and unit view rays (pointing from the camera)."""
    albedo = np.array(COLORS[obj.color], np.float32) / 255
    light = _light_direction(obj)
    key = np.maximum(normals @ light, 0.0)[:, None]
    fill = np.maximum(normals @ FILL_DIRECTION, 0.0)[:, None]
    back = np.maximum(normals @ BACK_DIRECTION, 0.0)[:, None]
    sky = 0.5 + 0.5 * normals[:, 2:3]  # hemisphere ambient: brighter facing up
    diffuse = 0.85 * key + 0.3 * fill + 0.15 * back + 0.35 * sky
    cosine = np.einsum("ij,ij->i", view, normals)[:, None]
    reflected = view - 2 * cosine * normals
    highlight = np.maximum(reflected @ light, 0.0)[:, None]
    if obj.material == "rubber":
        return albedo * diffuse + 0.08 * highlight ** 8
    # Metal: dark diffuse plus a tinted mirror image of a gray world (darker ground below a
    # soft horizon, bright sky above), a Fresnel rim and a sharp highlight.
    up = reflected[:, 2:3]
    ground, sky = 0.15 + 0.25 * (1.0 + up), 0.45 + 0.5 * up + 0.7 * highlight ** 4
    environment = ground + (sky - ground) * _smoothstep(-0.04, 0.04, up)
    fresnel = 0.04 + 0.4 * (1.0 - np.clip(-cosine, 0.0, 1.0)) ** 4
    return (0.15 * albedo * diffuse + (albedo + fresnel) * environment
            + 1.3 * highlight ** 60 + 0.2 * highlight ** 8)


def _object_points(obj: SceneObject) -> np.ndarray:
    """Corners of a box bounding the object."""
    r = obj.radius
    return np.array([[obj.x + sx * r, obj.y + sy * r, z] for sx in (-1, 1) for sy in (-1, 1)
                     for z in (0.0, obj.height)])


def _shadow_points(obj: SceneObject) -> np.ndarray:
    """Ground corners bounding the shadow, its soft edge and the contact darkening."""
    light = _light_direction(obj)
    tip = -obj.height / light[2] * light[:2]
    reach = obj.radius + 2 * PENUMBRA
    return np.array([[obj.x + ox + sx * reach, obj.y + oy + sy * reach, 0.0]
                     for ox, oy in ((0, 0), tip) for sx in (-1, 1) for sy in (-1, 1)])


def _union(boxes):
    boxes = [b for b in boxes if b is not None]
    if not boxes:
        return None
    x0, y0, x1, y1 = zip(*boxes)
    return min(x0), min(y0), max(x1), max(y1)


def _slices(box, ss: int, origin=(0, 0)):
    """Row and column slices of a pixel box in a supersampled array starting at pixel `origin` (x, y)."""
    (x0, y0, x1, y1), (ox, oy) = box, origin
    return slice((y0 - oy) * ss, (y1 - oy) * ss), slice((x0 - ox) * ss, (x1 - ox) * ss)


def _camera(width: int, height: int, camera_jitter: np.random.Generator | None) -> _Camera:
    position = np.array(CAMERA_POSITION)
    if camera_jitter is not None:
        position = position + camera_jitter.normal(0.0, CAMERA_JITTER, 3)
    return _Camera(tuple(float(v) for v in position), width, height)


def render_scene(objects: Sequence[SceneObject], width: int = 320, height: int = 240,
                 supersample: int = 2, camera_jitter: np.random.Generator | None = None) -> np.ndarray:
    """Return an (height, width, 3) uint8 RGB image of the objects on the gray ground."""
    camera = _camera(width, height, camera_jitter)
    ss = supersample
    ground = _cached_ground if camera_jitter is None else _ground
    ground_x, ground_y, ambient, key, background = ground(camera, ss)
    image = background.copy()
    object_boxes = [camera.box(_object_points(obj)) for obj in objects]
    shadow_boxes = [camera.box(_shadow_points(obj)) for obj in objects]
    region = _union(object_boxes + shadow_boxes)
    if region is None:
        return image
    # Everything below works on the supersampled pixels of `region` only.
    in_frame = _slices(region, ss)
    visibility = np.ones(ambient[in_frame].shape, np.float32)
    occlusion = np.ones_like(visibility)
    for obj, box in zip(objects, shadow_boxes):
        if box is not None:
            frame_box, region_box = _slices(box, ss), _slices(box, ss, region[:2])
            shadow, contact = _shadow_and_occlusion(obj, ground_x[frame_box], ground_y[frame_box])
            visibility[region_box] *= shadow
            occlusion[region_box] *= contact
    canvas = ((ambient[in_frame] + key[in_frame] * visibility) * occlusion)[..., None].repeat(3, axis=2)
    depth = np.full(visibility.shape, np.inf, np.float32)
    eye = np.array(camera.position, np.float32)
    for obj, box in zip(objects, object_boxes):
        if box is None:
            continue
        region_box = _slices(box, ss, region[:2])
        dirs = camera.rays(box, ss)
        shape = dirs.shape[:2]
        dirs = dirs.reshape(-1, 3)
        t, normals_of = _intersect(obj, eye, dirs)
        nearer = t < depth[region_box].reshape(-1)
        if not nearer.any():
            continue
        depth[region_box] = np.where(nearer, t, depth[region_box].reshape(-1)).reshape(shape)
        patch = canvas[region_box].reshape(-1, 3)
        patch[nearer] = _shade(obj, normals_of(nearer, t[nearer]), dirs[nearer])
        canvas[region_box] = patch.reshape(*shape, 3)
    image[region[1]:region[3], region[0]:region[2]] = _to_uint8(canvas, ss)
    return image


def id_buffer(objects: Sequence[SceneObject], width: int = 320, height: int = 240) -> np.ndarray:
    """Index of the nearest object at each pixel centre (one ray a pixel), -1 where the ground shows."""
    camera = _camera(width, height, None)
    eye = np.array(camera.position, np.float32)
    depth = np.full((height, width), np.inf, np.float32)
    nearest = np.full((height, width), -1)
    for index, obj in enumerate(objects):
        box = camera.box(_object_points(obj))
        if box is None:
            continue
        rows, cols = _slices(box, 1)
        t = _intersect(obj, eye, camera.rays(box, 1).reshape(-1, 3))[0].reshape(depth[rows, cols].shape)
        nearer = t < depth[rows, cols]
        depth[rows, cols] = np.where(nearer, t, depth[rows, cols])
        nearest[rows, cols] = np.where(nearer, index, nearest[rows, cols])
    return nearest


@functools.lru_cache(maxsize=4096)
def _pixels_alone(obj: SceneObject) -> int:
    return int((id_buffer([obj], *VISIBILITY_RESOLUTION) == 0).sum())


def _in_view(obj: SceneObject, margin: float = 6.0) -> bool:
    """Whether the object's bounding box projects inside the default 320x240 frame, with a margin."""
    xy = _camera(320, 240, None).project(_object_points(obj))
    return bool((xy.min(0) >= margin).all() and (xy.max(0) <= (320 - margin, 240 - margin)).all())


def _fits(candidate: SceneObject, placed: list) -> bool:
    foot_x, foot_y = CAMERA_POSITION[:2]
    if math.hypot(candidate.x - foot_x, candidate.y - foot_y) > MAX_GROUND_DISTANCE:
        return False
    if not _in_view(candidate):
        return False
    for other in placed:
        gap = math.hypot(candidate.x - other.x, candidate.y - other.y) - candidate.radius - other.radius
        if gap < MIN_GAP:
            return False
    # Occlusion only grows as objects are added, so checking every object now covers every prefix.
    objects = placed + [candidate]
    ids = id_buffer(objects, *VISIBILITY_RESOLUTION)
    visible = np.bincount(ids[ids >= 0], minlength=len(objects))
    return all(seen >= MIN_VISIBLE_FRACTION * _pixels_alone(obj) for obj, seen in zip(objects, visible))


def sample_scene(rng: np.random.Generator, labels: Sequence[tuple[str, str]]) -> list[SceneObject]:
    """Place objects for the (color, shape) labels in order: random size, material, position and
    rotation, at least MIN_GAP apart, fully in view and clearly visible in every prefix of the list."""
    for color, shape in labels:
        if color not in COLORS or shape not in SHAPES:
            raise ValueError(f"unknown object ({color!r}, {shape!r})")
    for _ in range(100):
        placed: list[SceneObject] = []
        for color, shape in labels:
            for _ in range(200):
                x, y = rng.uniform(-PLACEMENT_RANGE, PLACEMENT_RANGE, 2)
                candidate = SceneObject(shape, color, list(SIZES)[rng.integers(len(SIZES))],
                                        MATERIALS[rng.integers(len(MATERIALS))], float(x), float(y),
                                        float(rng.uniform(0.0, 360.0)))
                if _fits(candidate, placed):
                    placed.append(candidate)
                    break
            else:
                break  # this start leaves no room for the next object: start over
        else:
            return placed
    raise RuntimeError(f"could not place {labels} visibly")
