"""`tats-extract features`: patch-feature grids of the frames training uses, into features.zarr.

The S frames of a video are the ones the tracks stage stores, computed by the same functions
from the decoded frame count, so both stages can run apart. View 0 is the plain clip; views
1..V-1 are clip-consistent photometric augmentations with recorded seeds, so that training
keeps the original's augmentation without decoding video. The original drew a fresh RandAugment
on every read; here training draws one of the V views per read (view 0 included), so V = 1
trains without augmentation, and every view costs one more backbone pass and one more grid of
features on disk per training video. Val and test videos are read at view 0 only, so they get
view 0 alone (their other views stay empty: zeros, seed -1, no bytes on disk).

Frames are decoded no larger than `max_side` (aspect kept), but never with their shorter side
below the backbone's input size, so that the backbone's resize to `size` x `size` still only
shrinks: memory per clip is bounded (a 4K clip is decoded at 512 x 288, not 3840 x 2160), and
a clip the bound does not bite is decoded, augmented and encoded exactly as without it. Where
it bites, the frames are resized twice (area interpolation in the decoder, then the backbone's
antialiased bilinear resize), and augmented at the decoded size: features then differ a little
from those of full-size frames (measured in benchmarks/bench_features_memory.py).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from tats.manifest import Manifest, VideoRow
from tats.pipeline.augment import AugmentConfig, augment_clip, view_seed
from tats.pipeline.backbones import Backbone, Preprocess, create_backbone
from tats.pipeline.executors import extract
from tats.pipeline.runner import RunSummary
from tats.runtime import announce, device_line, extraction_precision, pick_device
from tats.stores import FEATURES, RowStore, features_fields
from tats.video import decode_size, probe, read_frames, stored_frames, timeline


@dataclass(frozen=True)
class FeaturesConfig:
    """Everything that decides what a features store holds (recorded in it, checked on resume)."""

    backbone: str = "dinov2_vitb14"
    frames: int = 8
    fps: float | None = 10.0
    native_suffixes: tuple[str, ...] = (".webm",)
    views: int = 5  # view 0 plain, 4 augmented: training draws one per read (1: no augmentation)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    preprocess: Preprocess = field(default_factory=Preprocess)
    shard_size: int = 64
    max_side: int | None = 512  # decode frames with their longer side at most this (px)

    def __post_init__(self) -> None:
        for name in ("frames", "views", "shard_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, not {getattr(self, name)}")
        if self.max_side is not None and self.max_side < self.preprocess.size:
            raise ValueError(
                f"max_side must be at least the input size {self.preprocess.size}, "
                f"not {self.max_side}"
            )


@dataclass(frozen=True)
class Views:
    """A video's views of its stored frames, as the decode workers hand them over."""

    clips: np.ndarray  # [V, S, H, W, 3] uint8: view 0 plain, the others augmented
    frames: np.ndarray  # [S] the stored frames on the time base
    num_frames: np.int32  # T, frames on the time base
    view_seed: np.ndarray  # [V] int64
    rotation: int | None  # the display rotation decoding applied (see `VideoInfo`)


@dataclass(frozen=True)
class ViewsLoader:
    """Decodes a video's S stored frames and makes its views (runs in decode workers)."""

    config: FeaturesConfig

    def __call__(self, row: VideoRow) -> Views:
        c = self.config
        info = probe(row.path)
        native = timeline(info, c.fps, c.native_suffixes)
        frames_on_time_base = stored_frames(len(native), c.frames)
        size = decode_size(info.width, info.height, c.max_side, c.preprocess.size)
        clip = read_frames(row.path, native[frames_on_time_base], size=size)
        # Only training reads augmented views: val and test rows get view 0 alone.
        views = c.views if row.split == "train" else 1
        seeds = np.array([view_seed(row.video_id, v) for v in range(views)], np.int64)
        return Views(
            np.stack([augment_clip(clip, int(s), c.augment) for s in seeds]),
            frames_on_time_base.astype(np.int32),
            np.int32(len(native)),
            seeds,
            info.rotation,
        )


class FeaturesStage:
    """The features stage for the runner: decode and augment in workers, encode here."""

    def __init__(self, config: FeaturesConfig, backbone: Backbone, batch_size: int = 4):
        self.config, self.backbone, self.batch_size = config, backbone, batch_size
        self.loader = ViewsLoader(config)

    def compute(self, rows: list[VideoRow], loaded: list[Views]) -> list[dict[str, np.ndarray]]:
        # Clips of one batch may differ in size; each is resized on the device, then all of
        # them go through the backbone in one forward.
        clips = [item.clips for item in loaded]  # each [V, S, H, W, 3]
        features = self.backbone.encode([c.reshape(-1, *c.shape[2:]) for c in clips])
        features = features.to("cpu", torch.float16).numpy()
        out, start = [], 0
        for item, clip in zip(loaded, clips, strict=True):
            count = clip.shape[0] * clip.shape[1]
            grids = np.zeros((self.config.views, *clip.shape[1:2], *features.shape[1:]), np.float16)
            grids[: len(clip)] = features[start : start + count].reshape(
                *clip.shape[:2], *features.shape[1:]
            )
            start += count
            seeds = np.full(self.config.views, -1, np.int64)
            seeds[: len(clip)] = item.view_seed
            out.append({"frames": item.frames, "num_frames": item.num_frames,
                        "view_seed": seeds, "features": grids})  # fmt: skip
        return out


def open_features_store(
    out: str | Path, manifest: Manifest, config: FeaturesConfig, backbone: Backbone
) -> RowStore:
    """Create the store for (manifest, config, backbone), or open it if it was made for them."""
    provenance = {
        "manifest_sha256": manifest.sha256,
        "config": asdict(config),
        "backbone": backbone.identity,
    }
    side = backbone.grid[0]
    fields = features_fields(config.views, config.frames, side, backbone.dim)
    return RowStore.create_or_open(
        out, FEATURES, fields, len(manifest.rows), config.shard_size, provenance, manifest.path
    )


@dataclass(frozen=True)
class FeaturesRecipe:
    """The features stage as a picklable recipe (see executors.py)."""

    config: FeaturesConfig
    weights: str | None = None
    device: str = "auto"  # auto: CUDA where there is one
    batch_videos: int = 4
    backbone_options: tuple[tuple[str, object], ...] = ()
    precision: str = "auto"  # auto: bf16 where the device has bf16 units, else fp32
    name: str = "features"

    def __post_init__(self) -> None:
        extraction_precision(self.precision, "cpu")  # a bad name fails before any work

    def build(self) -> FeaturesStage:
        """The backbone on the device picked; says so in one line."""
        device = pick_device(self.device)
        backbone = create_backbone(
            self.config.backbone,
            weights=self.weights,
            device=device,
            preprocess=self.config.preprocess,
            **{"precision": self.precision, **dict(self.backbone_options)},
        )
        where = device_line(self.device, device, backbone.precision)
        announce(f"{self.name}: {backbone.name} on {where}")
        return FeaturesStage(self.config, backbone, self.batch_videos)

    def open_store(self, out: str | Path, manifest: Manifest, stage: FeaturesStage) -> RowStore:
        return open_features_store(out, manifest, self.config, stage.backbone)


def extract_features(
    manifest: Manifest,
    out: str | Path,
    config: FeaturesConfig,
    *,
    weights: str | Path | None = None,
    device: str = "auto",
    batch_videos: int = 4,
    backbone_options: dict | None = None,
    precision: str = "auto",
    **run,
) -> RunSummary:
    """Run this process's share of the features stage (see `executors.extract` for `run`).

    `backbone_options` go to the model constructor (small test models: `{"depth": 2}`);
    `precision` is the backbone's arithmetic: auto (bf16 where the device has bf16 units),
    bf16 or fp32.
    """
    recipe = FeaturesRecipe(
        config,
        None if weights is None else str(weights),
        device,
        batch_videos,
        tuple(sorted((backbone_options or {}).items())),
        precision,
    )
    return extract(recipe, manifest, out, **run)
