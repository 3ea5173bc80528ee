"""Clip-consistent photometric RandAugment: one op plan per clip seed, applied to every frame."""

from __future__ import annotations

import numpy as np
import pytest

from tats.pipeline.augment import (
    IDENTITY_SEED,
    OPS,
    ORIGINAL_OPS,
    AppliedOp,
    AugmentConfig,
    augment_clip,
    plan_ops,
    view_seed,
)

DEFAULT = AugmentConfig()


@pytest.fixture(scope="module")
def clip() -> np.ndarray:
    """Four 40 x 56 frames: a smooth gradient with a moving square and some noise."""
    rng = np.random.default_rng(0)
    ys, xs = np.mgrid[0:40, 0:56]
    frames = np.zeros((4, 40, 56, 3), dtype=np.float64)
    for t in range(4):
        frames[t, ..., 0] = 40 + 3 * xs
        frames[t, ..., 1] = 20 + 4 * ys
        frames[t, ..., 2] = 128
        frames[t, 10:22, 5 + 8 * t : 17 + 8 * t] = (230, 40, 90)
    frames += rng.normal(0, 6, frames.shape)
    return frames.clip(0, 255).astype(np.uint8)


def single(name: str, level: float = 10.0) -> AugmentConfig:
    return AugmentConfig(num_ops=1, magnitude=level, prob=1.0, ops=(name,))


def test_view_seeds_are_stable_distinct_and_view_zero_is_identity():
    assert view_seed("abc", 0) == IDENTITY_SEED
    seeds = {view_seed(video, view) for video in ("abc", "abd", "12") for view in (1, 2, 3)}
    assert len(seeds) == 9
    assert all(0 <= seed < 2**63 for seed in seeds)
    assert view_seed("abc", 1) == view_seed("abc", 1)
    # stable across processes and versions: the seed is part of the stored data
    assert view_seed("abc", 1) == 4965735668471042207
    with pytest.raises(ValueError, match="view must be >= 0"):
        view_seed("abc", -1)


def test_identity_seed_returns_the_frames_unchanged(clip):
    out = augment_clip(clip, IDENTITY_SEED, DEFAULT)
    assert np.array_equal(out, clip) and out is not clip
    out[0, 0, 0] = 0  # a copy: writing into it leaves the input alone
    assert plan_ops(IDENTITY_SEED, DEFAULT) == ()


def test_every_frame_gets_the_same_ops(clip):
    """Clip consistency: augmenting a frame alone gives the frame augmented within its clip."""
    augmented_any = 0
    for view in range(1, 9):
        seed = view_seed("video-7", view)
        out = augment_clip(clip, seed, DEFAULT)
        assert out.shape == clip.shape and out.dtype == np.uint8
        for t in range(len(clip)):
            assert np.array_equal(out[t], augment_clip(clip[t : t + 1], seed, DEFAULT)[0])
        augmented_any += not np.array_equal(out, clip)
    assert augmented_any >= 4


def test_same_seed_same_clip_and_seeds_differ(clip):
    seed = view_seed("video-3", 2)
    assert np.array_equal(augment_clip(clip, seed, DEFAULT), augment_clip(clip, seed, DEFAULT))
    outputs = {augment_clip(clip, seed, DEFAULT).tobytes() for seed in range(40)}
    assert len(outputs) >= 12  # a quarter of the seeds apply no op; solarize 10 == invert


def test_default_plan_follows_the_original_randaugment():
    """rand-m20-mstd0.5-inc1 without geometric ops: 2 draws from the 9 photometric ops, each
    kept with probability 0.5, always at the top level 10 (m20 is clipped to 10)."""
    plans = [plan_ops(seed, DEFAULT) for seed in range(2000)]
    assert all(len(plan) <= 2 for plan in plans)
    assert all(op.level == 10.0 for plan in plans for op in plan)
    names = [op.name for plan in plans for op in plan]
    assert set(names) == set(ORIGINAL_OPS)
    assert 0.45 < len(names) / (2 * len(plans)) < 0.55
    assert plan_ops(5, DEFAULT) == plan_ops(5, DEFAULT)


def test_magnitude_noise_is_clipped_to_the_level_range():
    config = AugmentConfig(num_ops=3, magnitude=9.0, magnitude_std=2.0, prob=1.0)
    levels = [op.level for seed in range(300) for op in plan_ops(seed, config)]
    assert len(levels) == 900 and min(levels) >= 0 and max(levels) == 10.0
    assert 8.0 < float(np.mean(levels)) < 9.0


def test_level_free_ops(clip):
    assert np.array_equal(augment_clip(clip, 0, single("invert")), 255 - clip)
    for name in ("equalize", "autocontrast"):
        out = augment_clip(clip, 0, single(name))
        assert out.min() == 0 and out.max() == 255 and not np.array_equal(out, clip)


def test_posterize_solarize_and_solarize_add(clip):
    # level 10 posterize keeps 1 bit (the original's 0 bits would black the clip out)
    assert set(np.unique(augment_clip(clip, 0, single("posterize")))) <= {0, 128}
    assert np.array_equal(
        augment_clip(clip, 0, single("posterize", 5.0)), clip & 0b11000000
    )  # level 5: 2 bits
    assert np.array_equal(augment_clip(clip, 0, single("solarize")), 255 - clip)
    assert np.array_equal(augment_clip(clip, 0, single("solarize", 0.0)), clip)
    wide = clip.astype(int)
    expected = np.where(wide < 128, np.minimum(wide + 110, 255), wide)
    assert np.array_equal(augment_clip(clip, 0, single("solarize_add")), expected)


@pytest.mark.parametrize("name", ["brightness", "contrast", "color", "sharpness"])
def test_enhance_ops_move_away_from_the_original_with_the_level(clip, name):
    """Level 10 gives factor 0.1 or 1.9 (sign drawn per clip); level 0 changes nothing."""
    assert np.array_equal(augment_clip(clip, 0, single(name, 0.0)), clip)
    weak, strong = (
        np.abs(augment_clip(clip, seed, single(name, level)).astype(int) - clip).mean()
        for seed, level in ((1, 2.0), (1, 10.0))
    )
    assert 0 < weak < strong
    signs = {plan_ops(seed, single(name))[0].negate for seed in range(20)}
    assert signs == {True, False}


def test_brightness_direction_follows_the_sign(clip):
    for seed in range(6):
        (op,) = plan_ops(seed, single("brightness"))
        assert op == AppliedOp("brightness", 10.0, op.negate)
        mean = augment_clip(clip, seed, single("brightness")).mean()
        assert (mean < clip.mean()) if op.negate else (mean > clip.mean())


def test_only_photometric_ops_and_clear_errors(clip):
    assert not {"rotate", "shear_x", "translate_x"} & set(OPS)
    with pytest.raises(ValueError, match=r"augment ops \['rotate'\] unknown; photometric ops"):
        AugmentConfig(ops=("rotate", "invert"))
    with pytest.raises(ValueError, match="0 <= prob <= 1"):
        AugmentConfig(prob=1.5)
    with pytest.raises(ValueError, match=r"uint8 array \[S, H, W, 3\]"):
        augment_clip(clip.astype(np.float32), 1, DEFAULT)
    with pytest.raises(ValueError, match=r"uint8 array \[S, H, W, 3\]"):
        augment_clip(clip[0], 1, DEFAULT)
    with pytest.raises(ValueError, match="augment seed must be >= 0"):
        augment_clip(clip, -5, DEFAULT)


def test_read_only_frames_are_accepted(clip):
    frozen = clip.copy()
    frozen.flags.writeable = False
    seed = view_seed("v", 1)
    assert np.array_equal(augment_clip(frozen, seed, DEFAULT), augment_clip(clip, seed, DEFAULT))
