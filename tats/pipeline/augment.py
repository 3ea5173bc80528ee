"""Clip-consistent photometric RandAugment for the augmented feature views.

One op sequence and one set of magnitudes is drawn per clip from a seed and applied to every
frame of the clip, so the clip stays temporally coherent. Only photometric ops exist here:
pixels never move, so the point tracks of the clip stay valid for every view.

The defaults reproduce the original TATs training augmentation, timm-style
``rand-m20-mstd0.5-inc1`` over an op list that already left out the geometric ops (and
AutoContrast): two ops drawn with replacement from nine "increasing" photometric ops, each
applied with probability 0.5. As there, clips are augmented at their decoded size, before the
backbone's resize. The original's magnitude
20 is clipped to the maximum level 10 on every draw, so the level is always 10 here
(``magnitude_std`` 0). Three defects of the original are not reproduced: it drew the first
frame's ops from a different random state than the other frames; its ops re-seeded the global
RNGs, so both ops were applied or skipped together; and posterize at level 10 kept 0 bits,
blacking out the whole clip (bits are floored at 1 here).

Views of a video: view 0 is the unaugmented clip (seed ``IDENTITY_SEED``); view v >= 1 uses
``view_seed(video_id, v)``, a stable 63-bit seed recorded in the features store.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torchvision.transforms.v2.functional as TF

MAX_LEVEL = 10.0
IDENTITY_SEED = -1  # the seed of an unaugmented view (view 0)

ORIGINAL_OPS = (
    "equalize",
    "invert",
    "posterize",
    "solarize",
    "solarize_add",
    "color",
    "contrast",
    "brightness",
    "sharpness",
)


def _enhance_factor(level: float, negate: bool) -> float:
    # "increasing" enhance: 1.0 is no change; level 10 gives 0.1 or 1.9
    delta = level / MAX_LEVEL * 0.9
    return 1.0 - delta if negate else 1.0 + delta


def _posterize(x: torch.Tensor, level: float, negate: bool) -> torch.Tensor:
    return TF.posterize(x, max(1, 4 - int(level / MAX_LEVEL * 4)))


def _solarize(x: torch.Tensor, level: float, negate: bool) -> torch.Tensor:
    threshold = 256 - int(level / MAX_LEVEL * 256)
    return torch.where(x.to(torch.int16) >= threshold, 255 - x, x)  # 256 must invert nothing


def _solarize_add(x: torch.Tensor, level: float, negate: bool) -> torch.Tensor:
    added = (x.to(torch.int16) + int(level / MAX_LEVEL * 110)).clamp(max=255).to(torch.uint8)
    return torch.where(x < 128, added, x)


# op(frames uint8 [S, 3, H, W], level in [0, 10], negate) -> frames; every op works per frame
OPS: dict[str, Callable[[torch.Tensor, float, bool], torch.Tensor]] = {
    "autocontrast": lambda x, level, negate: TF.autocontrast(x),
    "equalize": lambda x, level, negate: TF.equalize(x),
    "invert": lambda x, level, negate: TF.invert(x),
    "posterize": _posterize,
    "solarize": _solarize,
    "solarize_add": _solarize_add,
    "color": lambda x, level, negate: TF.adjust_saturation(x, _enhance_factor(level, negate)),
    "contrast": lambda x, level, negate: TF.adjust_contrast(x, _enhance_factor(level, negate)),
    "brightness": lambda x, level, negate: TF.adjust_brightness(x, _enhance_factor(level, negate)),
    "sharpness": lambda x, level, negate: TF.adjust_sharpness(x, _enhance_factor(level, negate)),
}


@dataclass(frozen=True)
class AugmentConfig:
    """RandAugment settings: `num_ops` ops drawn with replacement from `ops`, each applied with
    probability `prob` at a level drawn from N(magnitude, magnitude_std) clipped to [0, 10]."""

    num_ops: int = 2
    magnitude: float = MAX_LEVEL
    magnitude_std: float = 0.0
    prob: float = 0.5
    ops: tuple[str, ...] = ORIGINAL_OPS

    def __post_init__(self) -> None:
        unknown = [name for name in self.ops if name not in OPS]
        if unknown or not self.ops:
            raise ValueError(
                f"augment ops {unknown or '()'} unknown; photometric ops: {', '.join(OPS)}"
            )
        if self.num_ops < 0 or not 0.0 <= self.prob <= 1.0 or self.magnitude_std < 0:
            raise ValueError(
                f"augment config needs num_ops >= 0, 0 <= prob <= 1, magnitude_std >= 0: {self}"
            )


@dataclass(frozen=True)
class AppliedOp:
    name: str
    level: float
    negate: bool


def view_seed(video_id: str, view: int) -> int:
    """Stable seed of `view` of a video: IDENTITY_SEED for view 0, else 63 bits of SHA-256."""
    if view < 0:
        raise ValueError(f"view must be >= 0, got {view}")
    if view == 0:
        return IDENTITY_SEED
    digest = hashlib.sha256(f"tats-augment\0{video_id}\0{view}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


def plan_ops(seed: int, config: AugmentConfig) -> tuple[AppliedOp, ...]:
    """The ops a clip with `seed` receives, in order (skipped ops left out)."""
    if seed == IDENTITY_SEED:
        return ()
    if seed < 0:
        raise ValueError(f"augment seed must be >= 0 or IDENTITY_SEED, got {seed}")
    rng = np.random.default_rng(seed)
    plan = []
    for _ in range(config.num_ops):
        # four draws per op whatever the outcome, so a seed's plan depends only on the config
        index, apply, level, negate = (
            rng.integers(len(config.ops)),
            rng.random() < config.prob,
            rng.normal(config.magnitude, config.magnitude_std),
            rng.random() < 0.5,
        )
        if apply:
            level = float(min(MAX_LEVEL, max(0.0, level)))
            plan.append(AppliedOp(config.ops[index], level, bool(negate)))
    return tuple(plan)


def augment_clip(frames: np.ndarray, seed: int, config: AugmentConfig) -> np.ndarray:
    """Apply the clip's photometric ops to every frame: uint8 [S, H, W, 3] -> same shape.

    `seed` = IDENTITY_SEED returns the frames unchanged (a copy).
    """
    valid = isinstance(frames, np.ndarray) and frames.dtype == np.uint8 and frames.ndim == 4
    if not valid or frames.shape[-1] != 3:
        shape = getattr(frames, "shape", None)
        raise ValueError(f"frames must be a uint8 array [S, H, W, 3], got {type(frames)} {shape}")
    # ops never write into their input, but torch warns on wrapping a read-only array
    x = torch.from_numpy(frames if frames.flags.writeable else frames.copy()).permute(0, 3, 1, 2)
    for op in plan_ops(seed, config):
        x = OPS[op.name](x, op.level, op.negate)
    return np.array(x.permute(0, 2, 3, 1).numpy())
