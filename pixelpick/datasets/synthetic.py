"""The bundled default dataset: procedurally drawn CamVid-like street scenes, written in CamVid's own layout.

Each scene is a street seen from a car: a pinhole camera one unit (about 1.5 m) above a flat road, so the road,
pavements, façades and fences follow true perspective and every object shrinks with depth. Objects are drawn far
to near, so nearer ones occlude farther ones. Class colours deliberately overlap (grey road, pavement, poles,
overcast sky and concrete; red cars, signs and brick) so that a model must use texture, shape and context, and the
thin or small classes (pole, sign, fence, pedestrian, bicyclist) are about as rare as in CamVid.

`generate_synthetic` writes `train/`, `trainannot/`, `val/`, `valannot/` (labels 0..10, 11 = void) plus a small
JSON manifest of its parameters; the folder is then read with `CamVidDataset`. Drawing is vectorised numpy.
"""

from __future__ import annotations

import json
import math
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from pixelpick.datasets.camvid import CAMVID_CLASSES, CAMVID_VOID
from pixelpick.errors import DatasetError

MANIFEST_NAME = "synthetic.json"
# Bump when the drawing changes, so an old generated folder is reported instead of silently mixed with new scenes.
GENERATOR_VERSION = 1

# Class ids, in CAMVID_CLASSES order.
SKY, BUILDING, POLE, ROAD, PAVEMENT, TREE, SIGN, FENCE, CAR, PEDESTRIAN, BICYCLIST = range(len(CAMVID_CLASSES))
VOID = CAMVID_VOID
_SPLIT_STREAMS = {"train": 0, "val": 1}  # each split draws from its own random stream


# ---------------------------------------------------------------------------------------------------------------
# Writing the dataset
# ---------------------------------------------------------------------------------------------------------------


def generate_synthetic(
    root: Path | str, *, num_train: int = 240, num_val: int = 60, height: int = 96, width: int = 128, seed: int = 0
) -> Path:
    """Generate the synthetic street scenes under `root` (CamVid layout) and return `root`.

    Deterministic: the same arguments give byte-identical files (on one installation of numpy and Pillow), and
    each scene depends only on the seed, its split and its index. Idempotent: when `root` already holds a set made
    with the same arguments nothing is written; a set made with other arguments raises DatasetError rather than
    being overwritten. The set is built in a temporary folder beside `root` and renamed into place, so `root` is
    either absent or complete.
    """
    root = Path(root)
    params = {
        "generator": "pixelpick.synthetic", "version": GENERATOR_VERSION,
        "num_train": num_train, "num_val": num_val, "height": height, "width": width, "seed": seed,
    }
    if _matches_existing(root, params):
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    build = Path(tempfile.mkdtemp(dir=root.parent, prefix=f".{root.name}.building-"))
    try:
        for split, count in (("train", num_train), ("val", num_val)):
            _write_split(build, split, count, height, width, seed)
        (build / MANIFEST_NAME).write_text(json.dumps(params, indent=2, sort_keys=True) + "\n")
        try:
            build.replace(root)  # atomic; also replaces an empty folder
        except OSError:
            # Someone else finished first: fine if theirs is what we wanted.
            if not _matches_existing(root, params):
                raise
    finally:
        shutil.rmtree(build, ignore_errors=True)
    return root


def _matches_existing(root: Path, params: dict) -> bool:
    """True when `root` already holds a set generated with `params`; DatasetError when it holds something else."""
    if not root.exists() or (root.is_dir() and not any(root.iterdir())):
        return False
    manifest = root / MANIFEST_NAME
    if not manifest.is_file():
        raise DatasetError(f"{root} exists but is not a generated synthetic dataset (no {MANIFEST_NAME}); "
                           "choose another root or remove it")
    existing = json.loads(manifest.read_text())
    if existing != params:
        changed = {key: (existing.get(key), value) for key, value in params.items() if existing.get(key) != value}
        raise DatasetError(f"{root} holds a synthetic dataset generated with other settings (existing, requested): "
                           f"{changed}; remove the folder or use another root")
    return True


def _write_split(root: Path, split: str, count: int, height: int, width: int, seed: int) -> None:
    (root / split).mkdir()
    (root / f"{split}annot").mkdir()
    for index in range(count):
        rng = np.random.default_rng([seed, _SPLIT_STREAMS[split], index])
        image, label = render_scene(rng, height, width)
        name = f"scene_{index:04d}.png"
        Image.fromarray(image).save(root / split / name)
        Image.fromarray(label).save(root / f"{split}annot" / name)


# ---------------------------------------------------------------------------------------------------------------
# Canvas, camera and texture helpers
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class _Canvas:
    """The image being drawn (float RGB in [0, 1]), its label map and pixel-centre coordinate grids."""

    image: np.ndarray
    label: np.ndarray
    ys: np.ndarray
    xs: np.ndarray

    @classmethod
    def blank(cls, height: int, width: int) -> _Canvas:
        ys, xs = np.mgrid[0:height, 0:width].astype(np.float32) + 0.5
        return cls(np.zeros((height, width, 3), np.float32), np.full((height, width), VOID, np.uint8), ys, xs)

    def paint(self, region, colour, class_id: int, shade: np.ndarray | None = None) -> None:
        """Paint `colour` (an RGB triple) and `class_id` over `region` (a boolean mask or a pair of slices),
        optionally modulated by a per-pixel `shade` map."""
        rgb = np.asarray(colour, np.float32)
        self.image[region] = rgb * shade[region][..., None] if shade is not None else rgb
        self.label[region] = class_id


@dataclass
class _Camera:
    """A pinhole camera at height 1 looking down the street; the horizon is row `vy`, the vanishing point `vx`."""

    focal: float
    vx: float
    vy: float

    def scale(self, depth: float) -> float:
        """Pixels per world unit at `depth`."""
        return self.focal / depth

    def project(self, x: float, y: float, depth: float) -> tuple[float, float]:
        """Image (column, row) of the world point (lateral x, height y, depth)."""
        return self.vx + x * self.focal / depth, self.vy + (1.0 - y) * self.focal / depth

    def ground(self, canvas: _Canvas) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Which pixels see the road plane, and the lateral position and depth of the point each one sees."""
        on_ground = canvas.ys > self.vy
        below = np.where(on_ground, canvas.ys - self.vy, 1e-6)  # above the horizon: a point far away
        return on_ground, (canvas.xs - self.vx) / below, self.focal / below

    def side_plane(self, canvas: _Canvas, lateral: float) -> tuple[np.ndarray, np.ndarray]:
        """Depth and height of the point on the vertical plane `x = lateral` seen at each pixel (nan if behind)."""
        per_unit = (canvas.xs - self.vx) / lateral  # pixels per unit, > 0 on the plane's side of the image
        with np.errstate(divide="ignore", invalid="ignore"):
            depth = np.where(per_unit > 0, self.focal / per_unit, np.nan)
            height = np.where(per_unit > 0, 1.0 - (canvas.ys - self.vy) / per_unit, np.nan)
        return depth, height


def _value_noise(rng: np.random.Generator, shape: tuple[int, int], cell: float) -> np.ndarray:
    """Smooth noise in [0, 1]: random values on a grid of `cell`-pixel squares, bilinearly interpolated."""
    height, width = shape
    grid = rng.random((int(height / cell) + 2, int(width / cell) + 2), dtype=np.float32)
    return np.asarray(Image.fromarray(grid).resize((width, height), Image.Resampling.BILINEAR))


def _jitter(rng: np.random.Generator, colour, spread: float = 0.06) -> np.ndarray:
    return np.clip(np.asarray(colour, np.float32) + rng.normal(0, spread, 3), 0, 1)


def _pick(rng: np.random.Generator, palette: list) -> np.ndarray:
    return np.asarray(palette[rng.integers(len(palette))], np.float32)


# Palettes overlap on purpose: grey shows up in road, pavement, buildings, poles, cars and overcast sky.
_BUILDING_COLOURS = [(0.62, 0.55, 0.45), (0.55, 0.52, 0.50), (0.58, 0.30, 0.24), (0.75, 0.70, 0.60),
                     (0.42, 0.40, 0.42), (0.70, 0.62, 0.48), (0.50, 0.35, 0.30), (0.80, 0.78, 0.74)]
_CAR_COLOURS = [(0.85, 0.85, 0.85), (0.62, 0.63, 0.66), (0.10, 0.10, 0.12), (0.62, 0.10, 0.10),
                (0.12, 0.22, 0.50), (0.18, 0.32, 0.22), (0.70, 0.62, 0.45), (0.40, 0.40, 0.42)]
_SIGN_COLOURS = [(0.75, 0.12, 0.10), (0.12, 0.28, 0.70), (0.85, 0.75, 0.15), (0.90, 0.90, 0.88), (0.10, 0.45, 0.25)]
_CLOTHES = [(0.15, 0.15, 0.20), (0.60, 0.12, 0.12), (0.20, 0.30, 0.60), (0.75, 0.72, 0.65), (0.35, 0.40, 0.25),
            (0.45, 0.30, 0.20), (0.85, 0.60, 0.20), (0.40, 0.40, 0.40)]
_SKIN = [(0.85, 0.68, 0.55), (0.60, 0.42, 0.30), (0.40, 0.27, 0.20), (0.92, 0.78, 0.66)]
_FOLIAGE = [(0.22, 0.38, 0.16), (0.30, 0.42, 0.18), (0.18, 0.30, 0.20), (0.42, 0.42, 0.20), (0.45, 0.35, 0.18)]


# ---------------------------------------------------------------------------------------------------------------
# The street layout of one scene
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class _Street:
    camera: _Camera
    road_left: float  # lateral position of the left kerb (negative)
    road_right: float
    facade_left: float  # lateral position of the left façades (negative), beyond the pavement
    facade_right: float
    far_end: float  # depth where the street ends in a distant skyline

    def kerb(self, side: int) -> float:
        return self.road_right if side > 0 else self.road_left

    def facade(self, side: int) -> float:
        return self.facade_right if side > 0 else self.facade_left

    def on_pavement(self, rng: np.random.Generator, side: int, low: float = 0.15, high: float = 0.85) -> float:
        """A lateral position on the pavement of `side`, `low`..`high` of the way from kerb to façade."""
        kerb, facade = self.kerb(side), self.facade(side)
        return kerb + (facade - kerb) * rng.uniform(low, high)


def _sample_street(rng: np.random.Generator, height: int, width: int) -> _Street:
    camera = _Camera(
        focal=width * rng.uniform(0.75, 0.95),
        vx=width * rng.uniform(0.38, 0.62),
        vy=height * rng.uniform(0.42, 0.50),
    )
    road_left, road_right = -rng.uniform(1.5, 2.6), rng.uniform(1.5, 2.6)
    return _Street(
        camera=camera,
        road_left=road_left,
        road_right=road_right,
        facade_left=road_left - rng.uniform(0.6, 1.5),
        facade_right=road_right + rng.uniform(0.6, 1.5),
        far_end=rng.uniform(45, 90),
    )


# ---------------------------------------------------------------------------------------------------------------
# Background layers: sky, skyline, ground, façades, fences
# ---------------------------------------------------------------------------------------------------------------


def _draw_sky(canvas: _Canvas, rng: np.random.Generator, camera: _Camera) -> None:
    overcast = rng.random() < 0.35
    if overcast:
        top, horizon = _jitter(rng, (0.62, 0.64, 0.68), 0.05), _jitter(rng, (0.78, 0.79, 0.80), 0.04)
    else:
        top, horizon = _jitter(rng, (0.30, 0.50, 0.85), 0.06), _jitter(rng, (0.72, 0.80, 0.90), 0.05)
    t = np.clip(canvas.ys / max(camera.vy, 1.0), 0, 1)[..., None]
    sky = top * (1 - t) + horizon * t
    clouds = np.clip(_value_noise(rng, canvas.ys.shape, 12) * 1.6 - 0.7, 0, 1)[..., None] * rng.uniform(0.2, 0.7)
    canvas.image[:] = sky * (1 - clouds) + np.float32(0.92) * clouds
    canvas.label[:] = SKY


def _draw_skyline(canvas: _Canvas, rng: np.random.Generator, street: _Street, haze: np.ndarray) -> None:
    """Distant blocks at the end of the street: short, hazy, blending into the sky colour."""
    width = canvas.xs.shape[1]
    edges = np.sort(rng.uniform(0, width, 6))
    heights = rng.uniform(2, 14, len(edges) + 1)  # world units above the camera, at the far end of the street
    top = street.camera.vy - heights[np.searchsorted(edges, canvas.xs)] * street.camera.scale(street.far_end)
    mask = (canvas.ys >= top) & (canvas.ys <= street.camera.vy + 1)
    colour = 0.5 * _pick(rng, _BUILDING_COLOURS) + 0.5 * haze
    canvas.paint(mask, colour, BUILDING, shade=0.9 + 0.2 * _value_noise(rng, canvas.ys.shape, 2))


def _draw_ground(canvas: _Canvas, rng: np.random.Generator, street: _Street, sun: float) -> None:
    """Road with lane marks and pavements with paving joints, in perspective, plus a building's shadow."""
    ground, lateral, depth = street.camera.ground(canvas)
    grain = 0.85 + 0.3 * _value_noise(rng, canvas.ys.shape, 1.5)
    # Often a shadow, cast by the façades of one side, darkens the ground beyond a slanted edge.
    shadow_edge = rng.uniform(street.road_left - 1, street.road_right + 1) + rng.uniform(-0.15, 0.15) * depth
    in_shadow = (lateral > shadow_edge) if rng.random() < 0.5 else (lateral < shadow_edge)
    has_shadow = rng.random() < 0.6
    light = np.where(in_shadow & has_shadow, 0.55, 1.0) * sun * grain

    road = ground & (lateral >= street.road_left) & (lateral <= street.road_right)
    canvas.paint(road, _jitter(rng, (0.40, 0.40, 0.42), 0.05), ROAD, shade=light)
    centre = rng.uniform(-0.3, 0.3) + (street.road_left + street.road_right) / 2
    dash = rng.uniform(2.0, 4.0)
    lane = road & (np.abs(lateral - centre) < 0.06) & ((depth / dash) % 1 < 0.5) & (depth < street.far_end)
    canvas.paint(lane, _jitter(rng, (0.88, 0.88, 0.82), 0.03), ROAD, shade=light)
    for kerb in (street.road_left, street.road_right):
        if rng.random() < 0.5:  # a solid line just inside the kerb
            canvas.paint(road & (np.abs(lateral - kerb * 0.93) < 0.04), (0.85, 0.85, 0.80), ROAD, shade=light)

    pavement = ground & ~road
    tile = rng.uniform(0.5, 1.0)
    joints = ((depth / tile) % 1 < 0.08) | ((lateral / tile) % 1 < 0.08)
    paving = _jitter(rng, (0.55, 0.52, 0.48), 0.06)
    canvas.paint(pavement, paving, PAVEMENT, shade=light * np.where(joints, 0.8, 1.0))
    kerb_stone = pavement & ((np.abs(lateral - street.road_left) < 0.12) | (np.abs(lateral - street.road_right) < 0.12))
    canvas.paint(kerb_stone, paving * 1.15, PAVEMENT, shade=light)


def _draw_facades(canvas: _Canvas, rng: np.random.Generator, street: _Street, sun: float) -> None:
    """Each side of the street: a row of buildings of varied height, colour and window grid."""
    sunlit_side = rng.choice([-1, 1])
    for side in (-1, 1):
        depth, height = street.camera.side_plane(canvas, street.facade(side))
        bounds = np.cumsum(rng.uniform(3, 12, 16))  # depths where one building ends and the next begins
        tops = rng.uniform(1.5, 5.0, len(bounds) + 1)
        if rng.random() < 0.15:  # an open side (a park, a car park): only a low wall; trees fill it later
            tops[:] = rng.uniform(0.3, 0.7)
        colours = np.stack([_jitter(rng, _pick(rng, _BUILDING_COLOURS), 0.05) for _ in tops])
        storey, bay = rng.uniform(0.8, 1.3), rng.uniform(1.0, 2.2)
        grain = _value_noise(rng, canvas.ys.shape, 2)
        block = np.searchsorted(bounds, np.nan_to_num(depth))
        facade = (depth < street.far_end) & (height >= 0) & (height <= tops[block])
        depth, height, block = depth[facade], height[facade], block[facade]
        # Windows from the second storey up; their contrast fades with distance as they shrink below a pixel.
        window = (((depth / bay) % 1 > 0.25) & ((depth / bay) % 1 < 0.75)
                  & ((height / storey) % 1 > 0.3) & ((height / storey) % 1 < 0.8) & (height > storey * 0.9))
        fade = np.clip(street.camera.focal / depth / 6, 0, 1)
        light = sun * (1.0 if side == sunlit_side else 0.75) * (0.9 + 0.2 * grain[facade]) * (1 - 0.55 * window * fade)
        rgb = colours[block]
        glazed = window & (fade > 0.5)
        rgb[glazed] = 0.5 * rgb[glazed] + 0.5 * np.float32([0.25, 0.30, 0.38])
        canvas.image[facade] = rgb * light[:, None]
        canvas.label[facade] = BUILDING


def _draw_fence(canvas: _Canvas, rng: np.random.Generator, street: _Street, sun: float) -> None:
    """A low picket or railing fence along the back of a pavement; the gaps still count as fence."""
    side = rng.choice([-1, 1])
    lateral = street.facade(side) - side * rng.uniform(0.05, 0.4)
    depth, height = street.camera.side_plane(canvas, lateral)
    start = rng.uniform(3, 12)
    top = rng.uniform(0.5, 0.9)
    region = (depth > start) & (depth < start + rng.uniform(8, 24)) & (height >= 0) & (height <= top)
    gap = rng.uniform(0.15, 0.35)
    bars = ((depth / gap) % 1 < 0.45) | (height > top - 0.08) | (np.abs(height - top * 0.4) < 0.04)
    colour = _jitter(rng, _pick(rng, [(0.35, 0.30, 0.25), (0.45, 0.45, 0.45), (0.20, 0.25, 0.20), (0.55, 0.45, 0.35)]))
    canvas.paint(region & bars, colour * sun, FENCE)
    canvas.label[region] = FENCE


# ---------------------------------------------------------------------------------------------------------------
# Objects, each drawn at a depth; the caller sorts them far to near
# ---------------------------------------------------------------------------------------------------------------


def _box(canvas: _Canvas, left: float, right: float, top: float, bottom: float) -> tuple[slice, slice]:
    """The pixels whose centres lie in the rectangle, as a pair of slices (cheaper to paint than a mask)."""
    height, width = canvas.label.shape

    def span(low: float, high: float, size: int) -> slice:
        return slice(min(max(math.ceil(low - 0.5), 0), size), min(max(math.ceil(high - 0.5), 0), size))

    return span(top, bottom, height), span(left, right, width)


def _ellipse(canvas: _Canvas, cx: float, cy: float, rx: float, ry: float) -> np.ndarray:
    return ((canvas.xs - cx) / max(rx, 0.5)) ** 2 + ((canvas.ys - cy) / max(ry, 0.5)) ** 2 <= 1


def _world_box(
    canvas: _Canvas, camera: _Camera, x0: float, x1: float, y0: float, y1: float, depth: float
) -> tuple[slice, slice]:
    """The pixels of an upright rectangle facing the camera; at least one pixel wide so thin things stay visible."""
    left, bottom = camera.project(x0, y0, depth)
    right, top = camera.project(x1, y1, depth)
    if right - left < 1:
        centre = (left + right) / 2
        left, right = centre - 0.5, centre + 0.5
    return _box(canvas, left, right, top, bottom)


def _draw_tree(canvas: _Canvas, rng: np.random.Generator, camera: _Camera, lateral: float, depth: float,
               sun: float, outline: np.ndarray, foliage: np.ndarray) -> None:
    """A trunk and a ragged, leafy canopy."""
    scale = camera.scale(depth)
    trunk_w = rng.uniform(0.1, 0.2)
    crown_y, radius = rng.uniform(2.6, 3.8), rng.uniform(1.0, 1.9)
    trunk = _world_box(canvas, camera, lateral - trunk_w / 2, lateral + trunk_w / 2, 0, crown_y, depth)
    canvas.paint(trunk, _jitter(rng, (0.30, 0.22, 0.15), 0.04) * sun, TREE)
    cx, cy = camera.project(lateral, crown_y, depth)
    rx, ry = radius * scale, radius * rng.uniform(0.8, 1.3) * scale
    ragged = 1 + 0.55 * (outline - 0.5)
    crown = ((canvas.xs - cx) / max(rx, 0.5)) ** 2 + ((canvas.ys - cy) / max(ry, 0.5)) ** 2 <= ragged
    canvas.paint(crown, _jitter(rng, _pick(rng, _FOLIAGE), 0.04) * sun, TREE, shade=foliage)


def _draw_pole(canvas: _Canvas, rng: np.random.Generator, camera: _Camera, lateral: float, depth: float,
               sun: float, side: int) -> None:
    """A lamp post or sign post, sometimes with a lamp arm over the road and one or two signs."""
    top = rng.uniform(2.5, 4.5)
    width = rng.uniform(0.12, 0.18)
    colour = _jitter(rng, _pick(rng, [(0.45, 0.45, 0.45), (0.25, 0.27, 0.25), (0.60, 0.60, 0.58)]), 0.04) * sun
    canvas.paint(_world_box(canvas, camera, lateral - width / 2, lateral + width / 2, 0, top, depth), colour, POLE)
    if rng.random() < 0.4:  # lamp arm reaching over the road
        arm = rng.uniform(0.6, 1.5)
        reach = (lateral - arm, lateral) if side > 0 else (lateral, lateral + arm)
        canvas.paint(_world_box(canvas, camera, *reach, top - 0.08, top, depth), colour, POLE)
    for _ in range(rng.integers(1, 3)):
        _draw_sign(canvas, rng, camera, lateral, rng.uniform(1.6, top - 0.2), depth, sun)


def _draw_sign(canvas: _Canvas, rng: np.random.Generator, camera: _Camera, lateral: float, height: float,
               depth: float, sun: float) -> None:
    """A round, square or wide sign board, with a contrasting border or symbol."""
    size = rng.uniform(0.5, 0.9)
    cx, cy = camera.project(lateral, height, depth)
    half = size * camera.scale(depth) / 2
    shape = rng.integers(3)
    if shape == 0:
        board = _ellipse(canvas, cx, cy, half, half)
    elif shape == 1:
        board = _box(canvas, cx - half, cx + half, cy - half, cy + half)
    else:
        board = _box(canvas, cx - 1.8 * half, cx + 1.8 * half, cy - 0.7 * half, cy + 0.7 * half)
    colour = _jitter(rng, _pick(rng, _SIGN_COLOURS), 0.04) * sun
    canvas.paint(board, colour, SIGN)
    symbol = _ellipse(canvas, cx, cy, half * 0.5, half * 0.5)  # inside every board shape
    canvas.paint(symbol, np.float32([0.95, 0.95, 0.95]) * sun, SIGN)


def _draw_car(canvas: _Canvas, rng: np.random.Generator, camera: _Camera, lateral: float, depth: float,
              sun: float, parked: bool) -> None:
    """A car seen from behind; a parked car also shows its side, with wheels, in perspective."""
    width, roof = rng.uniform(1.1, 1.35), rng.uniform(0.9, 1.15)
    body = _jitter(rng, _pick(rng, _CAR_COLOURS), 0.04) * sun
    glass = np.float32([0.12, 0.14, 0.18]) * sun
    if parked:
        near_side = lateral - np.sign(lateral) * width / 2  # the side facing the middle of the street
        side_depth, side_height = camera.side_plane(canvas, near_side)
        length = rng.uniform(2.6, 3.2)
        along = (side_depth - depth) / length  # 0 at the rear, 1 at the front
        in_side = (along >= 0) & (along <= 1) & (side_height >= 0.12)
        lower = in_side & (side_height <= 0.62)
        cabin = in_side & (side_height > 0.62) & (side_height <= roof) & (along > 0.2) & (along < 0.8)
        canvas.paint(lower | cabin, body, CAR)
        canvas.paint(cabin & (side_height < roof - 0.06), glass, CAR)
        for wheel_at in (0.18, 0.82):
            wheel = ((side_depth - depth - wheel_at * length) / 0.3) ** 2 + ((side_height - 0.3) / 0.3) ** 2 <= 1
            canvas.paint(wheel, np.float32([0.06, 0.06, 0.06]), CAR)
    # The rear: bumper and body, a narrower cabin with its window, wheels and tail lights.
    x0, x1 = lateral - width / 2, lateral + width / 2
    canvas.paint(_world_box(canvas, camera, x0, x1, 0.12, 0.65, depth), body, CAR)
    canvas.paint(_world_box(canvas, camera, x0 + 0.1, x1 - 0.1, 0.65, roof, depth), body, CAR)
    canvas.paint(_world_box(canvas, camera, x0 + 0.17, x1 - 0.17, 0.7, roof - 0.06, depth), glass, CAR)
    canvas.paint(_world_box(canvas, camera, x0 + 0.05, x0 + 0.3, 0.0, 0.18, depth), (0.05, 0.05, 0.05), CAR)
    canvas.paint(_world_box(canvas, camera, x1 - 0.3, x1 - 0.05, 0.0, 0.18, depth), (0.05, 0.05, 0.05), CAR)
    for light_x in (x0 + 0.02, x1 - 0.18):
        canvas.paint(_world_box(canvas, camera, light_x, light_x + 0.16, 0.45, 0.58, depth), (0.8, 0.1, 0.1), CAR)


def _draw_pedestrian(canvas: _Canvas, rng: np.random.Generator, camera: _Camera, lateral: float, depth: float,
                     sun: float) -> None:
    """Legs (possibly mid-stride), a torso with arms, and a head."""
    tall = rng.uniform(1.0, 1.25)
    shirt, trousers = _pick(rng, _CLOTHES) * sun, _pick(rng, _CLOTHES) * sun * 0.8
    stride = rng.uniform(0, 0.12)
    for offset in (-0.07 - stride, 0.07 + stride):
        canvas.paint(_world_box(canvas, camera, lateral + offset - 0.06, lateral + offset + 0.06, 0,
                                tall * 0.48, depth), trousers, PEDESTRIAN)
    canvas.paint(_world_box(canvas, camera, lateral - 0.17, lateral + 0.17, tall * 0.46, tall * 0.84, depth),
                 shirt, PEDESTRIAN)
    cx, cy = camera.project(lateral, tall * 0.92, depth)
    head = camera.scale(depth) * 0.085
    canvas.paint(_ellipse(canvas, cx, cy, head, head * 1.2), _pick(rng, _SKIN) * sun, PEDESTRIAN)


def _draw_bicyclist(canvas: _Canvas, rng: np.random.Generator, camera: _Camera, lateral: float, depth: float,
                    sun: float) -> None:
    """A rider on a bicycle crossing the view: two thin wheel rings, a frame and a leaning body."""
    scale = camera.scale(depth)
    facing = rng.choice([-1, 1])
    radius, spacing = 0.24 * scale, 0.38
    frame_colour = _jitter(rng, _pick(rng, _CAR_COLOURS), 0.05) * sun
    wheel_centres = []
    for offset in (-spacing, spacing):
        cx, cy = camera.project(lateral + offset, 0.24, depth)
        distance = np.hypot(canvas.xs - cx, canvas.ys - cy)
        canvas.paint(np.abs(distance - radius) <= max(0.08 * scale, 0.5), (0.08, 0.08, 0.08), BICYCLIST)
        wheel_centres.append((cx, cy))
    (bx0, by0), (bx1, by1) = wheel_centres
    frame = _box(canvas, min(bx0, bx1), max(bx0, bx1), by0 - 0.25 * scale, by0 - 0.25 * scale + max(0.07 * scale, 1))
    canvas.paint(frame, frame_colour, BICYCLIST)
    seat_x = lateral - facing * 0.12
    canvas.paint(_world_box(canvas, camera, seat_x - 0.07, seat_x + 0.07, 0.2, 0.6, depth),
                 _pick(rng, _CLOTHES) * sun * 0.8, BICYCLIST)  # legs
    torso_x = lateral + facing * 0.02
    canvas.paint(_world_box(canvas, camera, torso_x - 0.12, torso_x + 0.12, 0.6, 1.05, depth),
                 _pick(rng, _CLOTHES) * sun, BICYCLIST)
    hx, hy = camera.project(lateral + facing * 0.08, 1.15, depth)
    canvas.paint(_ellipse(canvas, hx, hy, 0.08 * scale, 0.1 * scale), _pick(rng, _SKIN) * sun, BICYCLIST)


def _draw_clutter(canvas: _Canvas, rng: np.random.Generator, camera: _Camera, lateral: float, depth: float,
                  sun: float) -> None:
    """Unlabelled street furniture (bins, boxes, cones, hoardings): void."""
    kind = rng.integers(3)
    if kind == 0:  # a traffic cone
        cx, base = camera.project(lateral, 0, depth)
        tall, half = 0.5 * camera.scale(depth), 0.15 * camera.scale(depth)
        apex = base - tall
        cone = (canvas.ys >= apex) & (canvas.ys < base) & (np.abs(canvas.xs - cx) <= half * (canvas.ys - apex) / tall)
        canvas.paint(cone, (0.9, 0.45, 0.1), VOID)
    else:  # a bin or a crate/hoarding, in colours shared with trees, fences and cars
        width, tall = (0.45, 0.7) if kind == 1 else (rng.uniform(0.6, 1.6), rng.uniform(0.4, 1.2))
        colour = _pick(rng, [(0.2, 0.3, 0.2), (0.3, 0.3, 0.32), (0.5, 0.4, 0.3), (0.6, 0.1, 0.1), (0.8, 0.8, 0.75)])
        box = _world_box(canvas, camera, lateral - width / 2, lateral + width / 2, 0, tall, depth)
        canvas.paint(box, colour * sun, VOID)


def _draw_hood(canvas: _Canvas, rng: np.random.Generator) -> None:
    """The ego car's bonnet at the bottom of the frame (void), reflecting the scene above it."""
    height, width = canvas.ys.shape
    rise = rng.uniform(0.06, 0.12) * height
    top = height - rise + (canvas.xs / width - 0.5) ** 2 * rise * 1.5
    hood = canvas.ys >= top
    reflection = canvas.image[np.clip((2 * top - canvas.ys).astype(int), 0, height - 1), canvas.xs.astype(int)]
    canvas.image[hood] = (0.12 + 0.25 * reflection[hood]) * _jitter(rng, (1, 1, 1), 0.1)
    canvas.label[hood] = VOID


# ---------------------------------------------------------------------------------------------------------------
# One scene
# ---------------------------------------------------------------------------------------------------------------


def render_scene(rng: np.random.Generator, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Draw one street scene: an (H, W, 3) uint8 RGB image and its (H, W) uint8 CamVid label map."""
    canvas = _Canvas.blank(height, width)
    street = _sample_street(rng, height, width)
    camera = street.camera
    sun = rng.uniform(0.75, 1.15)

    _draw_sky(canvas, rng, camera)
    haze = canvas.image[int(camera.vy) - 1, int(camera.vx)].copy()
    _draw_skyline(canvas, rng, street, haze)
    _draw_ground(canvas, rng, street, sun)
    _draw_facades(canvas, rng, street, sun)
    if rng.random() < 0.65:
        _draw_fence(canvas, rng, street, sun)

    for _, draw in sorted(_sample_objects(rng, street, canvas, sun), key=lambda item: -item[0]):
        draw()
    if rng.random() < 0.4:
        _draw_hood(canvas, rng)
    return _develop(canvas.image, rng), canvas.label


def _sample_objects(
    rng: np.random.Generator, street: _Street, canvas: _Canvas, sun: float
) -> list[tuple[float, Callable[[], None]]]:
    """Every object of the scene as (depth, draw), to be drawn far to near."""
    camera = street.camera
    # Noise fields shared by all trees of a scene: a ragged canopy outline and a leafy texture.
    outline = _value_noise(rng, canvas.ys.shape, 3)
    foliage = 0.45 + 0.9 * _value_noise(rng, canvas.ys.shape, rng.uniform(1.2, 2.5))
    objects = []

    def add(depth: float, draw, lateral: float, *extra) -> None:
        objects.append((depth, lambda: draw(canvas, rng, camera, lateral, depth, sun, *extra)))

    for _ in range(rng.integers(1, 6)):
        side = rng.choice([-1, 1])
        add(rng.uniform(4, 26), _draw_tree, street.on_pavement(rng, side, 0.5, 0.9), outline, foliage)
    for _ in range(rng.integers(1, 4)):
        side = rng.choice([-1, 1])
        add(rng.uniform(3, 24), _draw_pole, street.kerb(side) + side * rng.uniform(0.15, 0.4), side)
    for _ in range(rng.integers(0, 2)):  # a sign on its own short post
        side = rng.choice([-1, 1])
        add(rng.uniform(3, 20), _draw_pole, street.on_pavement(rng, side), side)
    for _ in range(rng.integers(0, 4)):
        lane = rng.uniform(street.road_left + 0.8, street.road_right - 0.8)
        add(rng.uniform(4, 20), _draw_car, lane, False)
    for _ in range(rng.integers(0, 4)):
        side = rng.choice([-1, 1])
        add(rng.uniform(2.5, 13), _draw_car, street.kerb(side) - side * 0.75, True)
    for _ in range(rng.integers(0, 5)):
        side = rng.choice([-1, 1])
        lateral = street.on_pavement(rng, side) if rng.random() < 0.8 else rng.uniform(-1.5, 1.5)
        add(rng.uniform(3, 18), _draw_pedestrian, lateral)
    if rng.random() < 0.6:
        side = rng.choice([-1, 1])
        add(rng.uniform(5, 20), _draw_bicyclist, street.kerb(side) - side * rng.uniform(0.4, 1.0))
    for _ in range(rng.integers(0, 4)):
        side = rng.choice([-1, 1])
        add(rng.uniform(3, 18), _draw_clutter, street.on_pavement(rng, side))
    return objects


def _develop(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """What a camera does to the light: white balance, exposure, optical blur, vignetting and sensor noise."""
    height, width = image.shape[:2]
    image = image * (rng.uniform(0.88, 1.12, 3) * rng.uniform(0.8, 1.2)).astype(np.float32)
    blurred = image.copy()  # a light 3x3 blur, as a lens would, so edges are not pixel-perfect
    blurred[1:-1] = 0.15 * image[:-2] + 0.7 * image[1:-1] + 0.15 * image[2:]
    blurred[:, 1:-1] = 0.15 * blurred[:, :-2] + 0.7 * blurred[:, 1:-1] + 0.15 * blurred[:, 2:]
    rows = (np.arange(height, dtype=np.float32) / height - 0.5) ** 2
    cols = (np.arange(width, dtype=np.float32) / width - 0.5) ** 2
    vignette = 1 - np.float32(rng.uniform(0.1, 0.4)) * (rows[:, None] + cols[None, :])
    noise = rng.standard_normal(image.shape, dtype=np.float32) * np.float32(rng.uniform(0.01, 0.035))
    exposed = (np.clip(blurred * vignette[..., None] + noise, 0, 1) * 255 + 0.5).astype(np.uint8)
    gamma = (np.arange(256) / 255) ** rng.uniform(0.85, 1.15) * 255 + 0.5  # the sensor's tone curve
    return gamma.astype(np.uint8)[exposed]
