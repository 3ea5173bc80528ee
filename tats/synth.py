"""Synthetic motion dataset: procedurally rendered videos whose classes differ only in motion.

Every video shows one or two textured shapes over a textured, static background. Shape, colour,
texture, background, size and starting position are random per video; only the motion (the
class) is shared within a class. Each video comes with exact ground truth: per object and frame
a 2x3 affine matrix mapping the object's canonical coordinates to image pixels, the object's
outline, its RGBA sprite and the background, from which the frames are rendered
(`render_frame`). Tracker tests use `true_tracks` and `object_points` on it.

Pixel convention (as OpenCV and CoTracker): pixel (row i, column j) has its centre at
x = j, y = i; a point is inside the frame when -0.5 <= x < W - 0.5 and -0.5 <= y < H - 0.5.
Angles are radians, positive = clockwise on screen (y points down).
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Callable
from dataclasses import asdict, dataclass
from fractions import Fraction
from pathlib import Path

import av
import cv2
import numpy as np
from tqdm import tqdm

from tats.manifest import VideoRow, write_manifest

SPLIT_FRACTIONS = {"val": 4 / 24, "test": 8 / 24}  # train takes the rest (12/24 by default)


@dataclass(frozen=True)
class SynthConfig:
    """What `generate` writes: classes are the first `classes` entries of `MOTIONS`."""

    classes: int = 24
    videos_per_class: int = 20
    frames: int = 48
    width: int = 128
    height: int = 128
    fps: float = 10.0
    seed: int = 0
    crf: int = 12  # libx264 constant rate factor: low, so tracker tests are not about compression

    def __post_init__(self) -> None:
        if not 3 <= self.classes <= len(MOTIONS):
            raise ValueError(f"classes must be between 3 and {len(MOTIONS)}, got {self.classes}")
        if self.videos_per_class < 1:
            raise ValueError(f"videos_per_class must be >= 1, got {self.videos_per_class}")
        if self.frames < 2:
            raise ValueError(f"frames must be >= 2, got {self.frames}")
        for name in ("width", "height"):
            value = getattr(self, name)
            if value < 32 or value % 2:
                raise ValueError(f"{name} must be even and >= 32 (H.264 yuv420p), got {value}")
        if not self.fps > 0:
            raise ValueError(f"fps must be > 0, got {self.fps}")
        if self.seed < 0:
            raise ValueError(f"seed must be >= 0, got {self.seed}")
        if not 0 <= self.crf <= 51:
            raise ValueError(f"crf must be between 0 and 51, got {self.crf}")

    def class_names(self) -> list[str]:
        return list(MOTIONS)[: self.classes]

    def class_splits(self) -> dict[str, str]:
        """Class name -> split: train, val, test in registry order, proportional to 12/4/8."""
        n_val = max(1, round(self.classes * SPLIT_FRACTIONS["val"]))
        n_test = max(1, round(self.classes * SPLIT_FRACTIONS["test"]))
        n_train = self.classes - n_val - n_test
        splits = ["train"] * n_train + ["val"] * n_val + ["test"] * n_test
        return dict(zip(self.class_names(), splits, strict=True))


# ----------------------------------------------------------------------------------------------
# Motion classes. A motion returns poses [O, T, 4] = (cx, cy, angle, scale) per object and frame.


@dataclass(frozen=True)
class Scene:
    """What a motion may depend on: frame size, normalised time and the objects' radii (px)."""

    width: int
    height: int
    tau: np.ndarray  # [T] normalised time, 0 .. 1
    radii: np.ndarray  # [O] outer radius of each object at scale 1

    @property
    def unit(self) -> float:
        return float(min(self.width, self.height))


@dataclass(frozen=True)
class Motion:
    name: str
    poses: Callable[[np.random.Generator, Scene], np.ndarray]
    objects: int


# Registration order below is the class order: `--classes N` takes the first N, and they are
# split in that order (at 24: 12 train, 4 val, 8 test), so each split mixes motion families.
MOTIONS: dict[str, Motion] = {}


def register_motion(name: str, objects: int = 1):
    """Add a motion class to `MOTIONS`; registry order decides class selection and splits."""

    def add(poses: Callable[[np.random.Generator, Scene], np.ndarray]):
        if name in MOTIONS:
            raise ValueError(f"motion class {name!r} registered twice")
        MOTIONS[name] = Motion(name, poses, objects)
        return poses

    return add


def _poses(paths: list[np.ndarray], angles: list[np.ndarray], scales: list[np.ndarray]):
    """Stack per-object centre paths [T, 2], angles [T] and scales [T] into poses [O, T, 4]."""
    rows = zip(paths, angles, scales, strict=True)
    return np.stack([np.column_stack([p, a, s]) for p, a, s in rows])


def _place(rng: np.random.Generator, scene: Scene, offsets: list[np.ndarray], extents) -> list:
    """Shift paths (offsets [T, 2] from a common origin) to a random spot keeping objects inside.

    `extents` is each object's largest radius along its path (radius * max scale).
    """
    lo = np.max([-o.min(0) + e + 1 for o, e in zip(offsets, extents, strict=True)], axis=0)
    hi = np.array([scene.width - 1, scene.height - 1]) - np.max(
        [o.max(0) + e + 1 for o, e in zip(offsets, extents, strict=True)], axis=0
    )
    # A path too large for the frame is centred instead (then it touches the border).
    origin = np.where(hi >= lo, lo + rng.random(2) * np.maximum(hi - lo, 0), (lo + hi) / 2)
    return [o + origin for o in offsets]


def _single(rng, scene, offsets, angle=None, scale=None) -> np.ndarray:
    """Poses of one object following `offsets` (placed at random), random fixed orientation."""
    t = len(scene.tau)
    angle = rng.uniform(0, 2 * np.pi) + np.zeros(t) if angle is None else angle
    scale = np.ones(t) if scale is None else scale
    (path,) = _place(rng, scene, [offsets], [scene.radii[0] * scale.max()])
    return _poses([path], [angle], [scale])


def _unit(angle: float) -> np.ndarray:
    return np.array([np.cos(angle), np.sin(angle)])


def _translate(direction_deg: float):
    def poses(rng, scene):
        length = scene.unit * rng.uniform(0.35, 0.5)
        return _single(rng, scene, np.outer(scene.tau * length, _unit(np.radians(direction_deg))))

    return poses


def _rotate(sign: int):
    def poses(rng, scene):
        turn = sign * rng.uniform(0.6, 1.0) * np.pi
        return _single(
            rng,
            scene,
            np.zeros((len(scene.tau), 2)),
            angle=rng.uniform(0, 2 * np.pi) + turn * scene.tau,
        )

    return poses


def _scale(grow: bool):
    def poses(rng, scene):
        small, large = rng.uniform(0.55, 0.7), rng.uniform(1.4, 1.7)
        start, end = (small, large) if grow else (large, small)
        return _single(
            rng, scene, np.zeros((len(scene.tau), 2)), scale=start * (end / start) ** scene.tau
        )

    return poses


def _circle(sign: int):
    def poses(rng, scene):
        radius = scene.unit * rng.uniform(0.18, 0.26)
        phase = rng.uniform(0, 2 * np.pi) + sign * 2 * np.pi * scene.tau
        return _single(rng, scene, radius * np.column_stack([np.cos(phase), np.sin(phase)]))

    return poses


def _stop_go(stop_first: bool):
    def poses(rng, scene):
        switch = rng.uniform(0.35, 0.55) if stop_first else rng.uniform(0.45, 0.65)
        if stop_first:
            progress = np.clip((scene.tau - switch) / (1 - switch), 0, 1)
        else:
            progress = np.clip(scene.tau / switch, 0, 1)
        length = scene.unit * rng.uniform(0.3, 0.45)
        return _single(rng, scene, np.outer(progress * length, _unit(rng.uniform(0, 2 * np.pi))))

    return poses


def _two_objects(approach: bool):
    def poses(rng, scene):
        axis = _unit(rng.uniform(0, 2 * np.pi))
        near = scene.radii.sum() + scene.unit * 0.03
        far = scene.unit * 0.7
        distance = far + (near - far) * scene.tau if approach else near + (far - near) * scene.tau
        half = np.outer(distance / 2, axis)
        paths = _place(rng, scene, [-half, half], scene.radii)
        t = len(scene.tau)
        angles = [rng.uniform(0, 2 * np.pi) + np.zeros(t) for _ in range(2)]
        return _poses(paths, angles, [np.ones(t), np.ones(t)])

    return poses


for _name, _deg in [("right", 0), ("left", 180), ("up", 270), ("down", 90)]:
    register_motion(f"translate_{_name}")(_translate(_deg))
register_motion("rotate_cw")(_rotate(+1))
register_motion("grow")(_scale(grow=True))
register_motion("circle_cw")(_circle(+1))


@register_motion("zigzag")
def _zigzag(rng, scene):
    """Travel in a random direction while swinging sideways along a triangle wave, 2 periods."""
    direction = rng.uniform(0, 2 * np.pi)
    length = scene.unit * rng.uniform(0.3, 0.4)
    amplitude = scene.unit * rng.uniform(0.08, 0.12)
    wave = 2 * np.abs(2 * ((2 * scene.tau + 0.25) % 1) - 1) - 1
    offsets = np.outer(scene.tau * length, _unit(direction))
    offsets += np.outer(wave * amplitude, _unit(direction + np.pi / 2))
    return _single(rng, scene, offsets)


@register_motion("bounce")
def _bounce(rng, scene):
    """A ball bouncing on an invisible floor (parabolic arcs) while drifting sideways."""
    bounces = 2
    height = scene.unit * rng.uniform(0.25, 0.35)
    drift = scene.unit * rng.uniform(0.1, 0.25) * rng.choice([-1, 1])
    phase = (bounces * scene.tau + rng.uniform(0, 0.5)) % 1
    offsets = np.column_stack([drift * scene.tau, -height * 4 * phase * (1 - phase)])
    return _single(rng, scene, offsets)


register_motion("approach", objects=2)(_two_objects(approach=True))
register_motion("stop_then_go")(_stop_go(stop_first=True))


@register_motion("shake")
def _shake(rng, scene):
    """Fast small jitter around a fixed point (sum of sinusoids, 4-7 cycles per clip)."""
    amplitude = scene.unit * rng.uniform(0.025, 0.04)
    offsets = np.zeros((len(scene.tau), 2))
    for axis in range(2):
        for _ in range(2):
            cycles, phase = rng.uniform(4, 7), rng.uniform(0, 2 * np.pi)
            offsets[:, axis] += amplitude / 2 * np.sin(2 * np.pi * cycles * scene.tau + phase)
    return _single(rng, scene, offsets)


register_motion("translate_up_right")(_translate(315))
register_motion("rotate_ccw")(_rotate(-1))


@register_motion("spiral_in")
def _spiral_in(rng, scene):
    """One turn (random handedness) while the radius shrinks to 20%."""
    radius = scene.unit * rng.uniform(0.22, 0.28) * (1 - 0.8 * scene.tau)
    phase = rng.uniform(0, 2 * np.pi) + rng.choice([-1, 1]) * 2 * np.pi * scene.tau
    return _single(rng, scene, radius[:, None] * np.column_stack([np.cos(phase), np.sin(phase)]))


register_motion("go_then_stop")(_stop_go(stop_first=False))
register_motion("translate_down_left")(_translate(135))
register_motion("translate_up_left")(_translate(225))
register_motion("translate_down_right")(_translate(45))
register_motion("shrink")(_scale(grow=False))
register_motion("circle_ccw")(_circle(-1))
register_motion("separate", objects=2)(_two_objects(approach=False))


@register_motion("pendulum")
def _pendulum(rng, scene):
    """Swinging below a pivot on a string; the object turns with the string."""
    length = scene.unit * rng.uniform(0.3, 0.4)
    swing = rng.uniform(0.45, 0.7) * np.sin(
        2 * np.pi * rng.uniform(0.75, 1.25) * scene.tau + rng.uniform(0, 2 * np.pi)
    )
    offsets = length * np.column_stack([np.sin(swing), np.cos(swing)])
    return _single(rng, scene, offsets, angle=rng.uniform(0, 2 * np.pi) - swing)


@register_motion("exit")
def _exit(rng, scene):
    """Fast straight motion that carries the object out of the frame at 55-80% of the clip."""
    radius = scene.radii[0]
    direction = _unit(rng.uniform(0, 2 * np.pi))
    start = radius + 1 + rng.random(2) * (np.array([scene.width, scene.height]) - 2 * radius - 3)
    # Distance along `direction` until the whole object is past the first border it meets.
    beyond = np.where(direction > 0, [scene.width - 0.5, scene.height - 0.5], -0.5)
    beyond = beyond + np.sign(direction) * (radius + 1)
    with np.errstate(divide="ignore", invalid="ignore"):
        to_out = np.where(direction != 0, (beyond - start) / direction, np.inf)
    length = to_out.min() / rng.uniform(0.55, 0.8)
    path = start + np.outer(scene.tau * length, direction)
    t = len(scene.tau)
    return _poses([path], [rng.uniform(0, 2 * np.pi) + np.zeros(t)], [np.ones(t)])


# ----------------------------------------------------------------------------------------------
# Appearance: shapes (canonical polygons), textures, backgrounds.


def _regular(n: int, radius: float, inner: float | None = None) -> np.ndarray:
    if inner is None:
        angles = 2 * np.pi * np.arange(n) / n - np.pi / 2
        return radius * np.column_stack([np.cos(angles), np.sin(angles)])
    angles = np.pi * np.arange(2 * n) / n - np.pi / 2
    r = np.where(np.arange(2 * n) % 2 == 0, radius, radius * inner)
    return r[:, None] * np.column_stack([np.cos(angles), np.sin(angles)])


def _shape(rng: np.random.Generator, radius: float) -> np.ndarray:
    """A random outline [K, 2] (canonical coordinates, centred on 0) with outer radius `radius`."""
    kind = rng.choice(
        [
            "circle",
            "ellipse",
            "square",
            "rectangle",
            "triangle",
            "pentagon",
            "hexagon",
            "star",
            "cross",
        ]
    )
    if kind == "circle":
        return _regular(64, radius)
    if kind == "ellipse":
        return _regular(64, radius) * [1, rng.uniform(0.55, 0.75)]
    if kind == "square":
        return _regular(4, radius)
    if kind == "rectangle":
        aspect = rng.uniform(0.5, 0.7)
        return (
            radius
            / np.hypot(1, aspect)
            * np.array([[-1, -aspect], [1, -aspect], [1, aspect], [-1, aspect]])
        )
    if kind == "star":
        return _regular(5, radius, inner=rng.uniform(0.45, 0.55))
    if kind == "cross":
        w = rng.uniform(0.3, 0.4)
        arm = np.array([[w, -w], [1, -w], [1, w], [w, w]])  # one arm, rotated 4 times
        quarter = np.array([[0, -1], [1, 0]])
        pts = [arm @ np.linalg.matrix_power(quarter, k).T for k in range(4)]
        return radius / np.hypot(1, w) * np.concatenate(pts)
    return _regular({"triangle": 3, "pentagon": 5, "hexagon": 6}[kind], radius)


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], sigma: float) -> np.ndarray:
    """Gaussian-blurred white noise rescaled to [0, 1]."""
    noise = cv2.GaussianBlur(rng.random(shape, dtype=np.float32), (0, 0), sigma)
    return (noise - noise.min()) / max(float(np.ptp(noise)), 1e-6)


def _hsv(hue: float, sat: float, val: float) -> np.ndarray:
    pixel = np.array([[[hue * 180, sat * 255, val * 255]]], np.float32)
    return cv2.cvtColor(pixel.astype(np.uint8), cv2.COLOR_HSV2RGB)[0, 0] / 255.0


def _pattern(rng: np.random.Generator, shape: tuple[int, int], kinds: list[str]) -> np.ndarray:
    """A random mixing field [H, W] in [0, 1] of a random kind."""
    kind = rng.choice(kinds)
    y, x = np.mgrid[: shape[0], : shape[1]].astype(np.float32)
    if kind == "blobs":
        return _smooth_noise(rng, shape, rng.uniform(1.5, 3.0))
    if kind == "checker":
        period, angle = rng.uniform(6, 11), rng.uniform(0, np.pi)
        u = x * np.cos(angle) + y * np.sin(angle)
        v = -x * np.sin(angle) + y * np.cos(angle)
        return 0.5 + 0.5 * np.sin(2 * np.pi * u / period) * np.sin(2 * np.pi * v / period)
    if kind == "spots":
        dots = (rng.random(shape) < 0.04).astype(np.float32)
        spots = cv2.GaussianBlur(dots, (0, 0), rng.uniform(1.2, 2.0))
        return np.clip(spots / max(float(spots.max()), 1e-6) * 1.5, 0, 1)
    if kind == "stripes":
        period, angle = rng.uniform(8, 16), rng.uniform(0, np.pi)
        return 0.5 + 0.5 * np.sin(2 * np.pi * (x * np.cos(angle) + y * np.sin(angle)) / period)
    if kind == "gradient":
        angle = rng.uniform(0, 2 * np.pi)
        g = x * np.cos(angle) + y * np.sin(angle)
        return (g - g.min()) / max(float(np.ptp(g)), 1e-6)
    raise AssertionError(kind)


def _texture(rng, shape, colours: np.ndarray, kinds: list[str], grain: float) -> np.ndarray:
    """Two colours mixed by a random pattern, plus fine grain so every patch has texture."""
    mix = _pattern(rng, shape, kinds)[..., None]
    rgb = colours[0] * (1 - mix) + colours[1] * mix
    rgb += grain * (_smooth_noise(rng, shape, 1.0)[..., None] - 0.5)
    return np.clip(rgb, 0, 1)


def _object_colours(rng: np.random.Generator) -> np.ndarray:
    hue = rng.random()
    second = (hue + rng.uniform(0.15, 0.5) * rng.choice([-1, 1])) % 1
    return np.stack(
        [
            _hsv(hue, rng.uniform(0.6, 1), rng.uniform(0.7, 1)),
            _hsv(second, rng.uniform(0.5, 1), rng.uniform(0.3, 0.7)),
        ]
    )


def _background(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    """Muted two-colour textured background [H, W, 3] uint8."""
    # Lower contrast than the objects, so that a tracker's window straddling an object's edge
    # follows the object rather than the background.
    hue, sat, val = rng.random(), rng.uniform(0, 0.35), rng.uniform(0.25, 0.75)
    second = np.clip(val + rng.choice([-1, 1]) * rng.uniform(0.08, 0.2), 0, 1)
    colours = np.stack([_hsv(hue, sat, val), _hsv((hue + rng.uniform(-0.1, 0.1)) % 1, sat, second)])
    kinds = ["blobs", "checker", "stripes", "gradient", "spots"]
    rgb = _texture(rng, (height, width), colours, kinds, grain=0.1)
    return np.round(rgb * 255).astype(np.uint8)


def _sprite(rng: np.random.Generator, polygon: np.ndarray, size: int) -> np.ndarray:
    """RGBA sprite [size, size, 4] uint8: textured object, anti-aliased alpha from the outline.

    Canonical point (u, v) is sprite pixel (u + c, v + c), c = (size - 1) / 2.
    """
    c = (size - 1) / 2
    y, x = np.mgrid[:size, :size]
    grid = np.column_stack([x.ravel() - c, y.ravel() - c]).astype(np.float64)
    # Coverage of a pixel by the shape, approximated from the signed distance of its centre.
    alpha = np.clip(_signed_distance(polygon, grid) + 0.5, 0, 1).reshape(size, size)
    rgb = _texture(rng, (size, size), _object_colours(rng), ["blobs", "checker", "spots"], 0.25)
    return np.round(np.dstack([rgb, alpha]) * 255).astype(np.uint8)


def _signed_distance(polygon: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Distance [N] of points [N, 2] to the outline of polygon [K, 2]; > 0 inside, < 0 outside."""
    a = polygon[None]
    ab = np.roll(polygon, -1, axis=0)[None] - a
    ap = points[:, None] - a
    t = np.clip((ap * ab).sum(-1) / np.maximum((ab * ab).sum(-1), 1e-12), 0, 1)
    distance = np.linalg.norm(ap - t[..., None] * ab, axis=-1).min(1)
    # Even-odd rule: count edges crossing the horizontal ray to the right of each point.
    py = points[:, 1:2]
    ay, by = a[..., 1], a[..., 1] + ab[..., 1]
    crosses = (ay > py) != (by > py)
    with np.errstate(divide="ignore", invalid="ignore"):
        x_cross = a[..., 0] + (py - ay) * ab[..., 0] / ab[..., 1]
    inside = (crosses & (points[:, 0:1] < x_cross)).sum(1) % 2 == 1
    return np.where(inside, distance, -distance)


# ----------------------------------------------------------------------------------------------
# Ground truth: everything needed to render a video and to know where each material point is.


@dataclass(frozen=True, eq=False)
class GroundTruth:
    """Exact description of one synthetic video. Objects are drawn in index order (0 = bottom)."""

    video_id: str
    label: str
    fps: float
    affine: np.ndarray  # [O, T, 2, 3] float64: canonical (u, v, 1) -> image (x, y)
    polygons: tuple[np.ndarray, ...]  # per object [K, 2] float64 outline, canonical coordinates
    sprites: np.ndarray  # [O, P, P, 4] uint8 RGBA; canonical (u, v) = sprite pixel (u+c, v+c)
    background: np.ndarray  # [H, W, 3] uint8 RGB

    @property
    def num_objects(self) -> int:
        return self.affine.shape[0]

    @property
    def num_frames(self) -> int:
        return self.affine.shape[1]

    @property
    def height(self) -> int:
        return self.background.shape[0]

    @property
    def width(self) -> int:
        return self.background.shape[1]

    def outline(self, obj: int, t: int) -> np.ndarray:
        """Object `obj`'s outline [K, 2] in image pixels at frame t."""
        m = self.affine[obj, t]
        return self.polygons[obj] @ m[:, :2].T + m[:, 2]


def ground_truth_path(out_dir: str | Path, video_id: str) -> Path:
    """Where `generate` writes a video's ground truth."""
    return Path(out_dir) / "ground_truth" / f"{video_id}.npz"


def save_ground_truth(gt: GroundTruth, path: str | Path) -> None:
    sizes = [len(p) for p in gt.polygons]
    polygons = np.zeros((gt.num_objects, max(sizes), 2))
    for obj, p in enumerate(gt.polygons):
        polygons[obj, : len(p)] = p
    np.savez_compressed(
        path,
        video_id=np.str_(gt.video_id),
        label=np.str_(gt.label),
        fps=np.float64(gt.fps),
        affine=gt.affine,
        polygons=polygons,
        polygon_sizes=np.array(sizes),
        sprites=gt.sprites,
        background=gt.background,
    )


def load_ground_truth(path: str | Path) -> GroundTruth:
    """Read a ground-truth file written by `generate` (`ground_truth_path(out_dir, video_id)`)."""
    try:
        with np.load(path) as f:
            polygons = tuple(p[:n] for p, n in zip(f["polygons"], f["polygon_sizes"], strict=True))
            return GroundTruth(
                str(f["video_id"]),
                str(f["label"]),
                float(f["fps"]),
                f["affine"],
                polygons,
                f["sprites"],
                f["background"],
            )
    except (OSError, KeyError, ValueError) as e:
        raise ValueError(f"{path}: not a synthetic ground-truth file ({e})") from e


def render_frame(gt: GroundTruth, t: int) -> np.ndarray:
    """Frame t [H, W, 3] uint8 RGB: objects warped at exact sub-pixel poses onto the background."""
    frame = gt.background.astype(np.float32) / 255
    c = (gt.sprites.shape[1] - 1) / 2
    centre = np.array([[1, 0, -c], [0, 1, -c], [0, 0, 1]])
    for obj in range(gt.num_objects):
        sprite = gt.sprites[obj].astype(np.float32) / 255
        premultiplied = np.dstack([sprite[..., :3] * sprite[..., 3:], sprite[..., 3]])
        warped = cv2.warpAffine(
            premultiplied,
            gt.affine[obj, t] @ centre,
            (gt.width, gt.height),
            flags=cv2.INTER_LINEAR,
            borderMode=cv2.BORDER_CONSTANT,
        )
        frame = frame * (1 - warped[..., 3:]) + warped[..., :3]
    return np.round(np.clip(frame, 0, 1) * 255).astype(np.uint8)


def object_points(gt: GroundTruth, t: int, xy: np.ndarray, margin: float = 0.0) -> np.ndarray:
    """Which object each image point [N, 2] (x, y) shows at frame t: top-most object id, or -1.

    With `margin` > 0, points closer than `margin` pixels to the visible edge of an object are
    ambiguous and get -2 (use it to pick query points a tracker can be judged on).
    """
    xy = np.asarray(xy, np.float64).reshape(-1, 2)
    distance = np.stack([_signed_distance(gt.outline(obj, t), xy) for obj in range(gt.num_objects)])
    owner = np.full(len(xy), -1)
    for obj in range(gt.num_objects):
        owner = np.where(distance[obj] >= 0, obj, owner)
    if margin > 0:
        relevant = np.arange(gt.num_objects)[:, None] >= owner[None]  # owner and objects above
        owner = np.where((relevant & (np.abs(distance) < margin)).any(0), -2, owner)
    return owner


def true_tracks(gt: GroundTruth, queries: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """True positions [T, N, 2] (x, y) and visibility [T, N] of query points [N, 3] (t, x, y).

    A query belongs to the top-most object under it at its frame (or to the static background)
    and moves with it at every frame, before and after the query frame. Visible = inside the
    frame and not covered by an object drawn above its owner.
    """
    queries = np.asarray(queries, np.float64).reshape(-1, 3)
    frame = queries[:, 0].astype(int)
    if ((frame < 0) | (frame >= gt.num_frames)).any():
        raise ValueError(
            f"query frames must be in [0, {gt.num_frames}), got {frame.min()}...{frame.max()}"
        )
    owner = np.empty(len(queries), int)
    for t in np.unique(frame):
        owner[frame == t] = object_points(gt, t, queries[frame == t, 1:])
    positions = np.broadcast_to(queries[:, 1:], (gt.num_frames, len(queries), 2)).copy()
    for obj in range(gt.num_objects):
        ours = np.flatnonzero(owner == obj)
        m = gt.affine[obj, frame[ours]]  # [n, 2, 3] pose at each query's frame
        canonical = np.linalg.solve(m[:, :, :2], (queries[ours, 1:] - m[:, :, 2])[..., None])
        positions[:, ours] = np.einsum("tij,nj->tni", gt.affine[obj, :, :, :2], canonical[..., 0])
        positions[:, ours] += gt.affine[obj, :, None, :, 2]
    size = np.array([gt.width, gt.height])
    visible = ((positions >= -0.5) & (positions < size - 0.5)).all(-1)
    for t in range(gt.num_frames):
        for obj in range(gt.num_objects):
            covered = _signed_distance(gt.outline(obj, t), positions[t]) >= 0
            visible[t] &= ~(covered & (obj > owner))
    return positions.astype(np.float32), visible


# ----------------------------------------------------------------------------------------------
# Generation.


def video_rng(seed: int, label: str, index: int) -> np.random.Generator:
    """The random stream of one video: depends only on (seed, class, index)."""
    return np.random.default_rng([seed, zlib.crc32(label.encode()), index])


def make_video(config: SynthConfig, label: str, index: int) -> tuple[np.ndarray, GroundTruth]:
    """Render video `index` of motion class `label`: frames [T, H, W, 3] uint8 and ground truth."""
    motion = MOTIONS[label]
    rng = video_rng(config.seed, label, index)
    low, high = (0.12, 0.19) if motion.objects == 1 else (0.09, 0.13)
    radii = rng.uniform(low, high, motion.objects) * min(config.width, config.height)
    polygons = tuple(_shape(rng, r) for r in radii)
    size = 2 * int(np.ceil(radii.max())) + 6  # room for the anti-aliased edge
    sprites = np.stack([_sprite(rng, p, size) for p in polygons])
    background = _background(rng, config.width, config.height)
    scene = Scene(config.width, config.height, np.linspace(0, 1, config.frames), radii)
    poses = motion.poses(rng, scene)  # [O, T, 4] (cx, cy, angle, scale)
    cos, sin, s = np.cos(poses[..., 2]), np.sin(poses[..., 2]), poses[..., 3]
    affine = np.stack(
        [
            np.stack([s * cos, -s * sin, poses[..., 0]], -1),
            np.stack([s * sin, s * cos, poses[..., 1]], -1),
        ],
        -2,
    )
    gt = GroundTruth(
        f"{label}_{index:03d}", label, config.fps, affine, polygons, sprites, background
    )
    frames = np.stack([render_frame(gt, t) for t in range(config.frames)])
    return frames, gt


def write_video(path: str | Path, frames: np.ndarray, fps: float, crf: int = 12) -> None:
    """Encode frames [T, H, W, 3] uint8 RGB as H.264 (yuv420p) mp4, one frame per 1/fps s.

    Single-threaded encoding, meant to make the bytes depend only on the frames and settings.
    Rarely they do not: the same frames encoded again gave another stream about once in 40
    encodes here (decoded pixels differing by 0.4 levels on average, 16 at most), whether PyAV
    or OpenCV converted the frames to YUV; the cause is not yet found. The rendered frames and
    the ground truth do depend only on the config.
    """
    with av.open(str(path), "w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=Fraction(fps).limit_denominator(100000))
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        stream.codec_context.thread_count = 1
        stream.options = {"crf": str(crf), "preset": "fast"}
        for i, rgb in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24")
            frame.pts = i
            container.mux(stream.encode(frame))
        container.mux(stream.encode())


def generate(config: SynthConfig, out_dir: str | Path, progress: bool = True) -> Path:
    """Write the dataset to out_dir: videos/, ground_truth/, synth.json, manifest.csv.

    Returns the manifest path. Videos are `<class>_<k>`; classes are split into train/val/test.
    """
    out_dir = Path(out_dir)
    (out_dir / "videos").mkdir(parents=True, exist_ok=True)
    (out_dir / "ground_truth").mkdir(exist_ok=True)
    splits = config.class_splits()
    jobs = [(label, k) for label in splits for k in range(config.videos_per_class)]
    rows = []
    for label, k in tqdm(jobs, desc="synth", unit="video", disable=not progress):
        frames, gt = make_video(config, label, k)
        path = out_dir / "videos" / f"{gt.video_id}.mp4"
        write_video(path, frames, config.fps, config.crf)
        save_ground_truth(gt, ground_truth_path(out_dir, gt.video_id))
        rows.append(VideoRow(len(rows), gt.video_id, path.resolve(), label, splits[label], {}))
    (out_dir / "synth.json").write_text(json.dumps(asdict(config), indent=2) + "\n")
    manifest = out_dir / "manifest.csv"
    write_manifest(rows, manifest)
    return manifest
