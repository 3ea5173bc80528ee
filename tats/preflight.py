"""The checks of a resolved run before any work (`tats run`, its --print-config and --plan).

The config's values (types, ranges, names) are checked as it is resolved (tats/chain.py); here
what lies outside it: the weight files are there, readable and of the right model (read and
compared with the model built on the meta device: nothing is allocated); the manifest's splits
can make the episodes training and evaluation draw; a sample of its videos is where the
manifest says; the disk can hold the stores. The first problem raises ValueError (one line);
what only may go wrong comes back as warnings.

    warnings = check_run(config, read_manifest(config.manifest, config.video_root))
"""

from __future__ import annotations

import importlib.util
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tats.manifest import SPLITS, Manifest

VIDEO_SAMPLE = 32  # videos looked for, spread over the manifest
VIT_WIDTHS = {"small": 384, "base": 768, "large": 1024}
# The folder layouts the split importers expect under --video-root (data_manifests/README.md).
LAYOUTS = (
    "ssv2: <root>/<id>.webm; hmdb, ucf: <root>/videos/<class>/<video>.avi; kinetics: "
    "<root>/train_256/<class>/<video>.mp4"
)


def check_run(config, manifest: Manifest) -> list[str]:
    """All the checks of a `tats.chain.RunConfig` and its read manifest: ValueError (or
    FileNotFoundError) for the first problem; what only may go wrong is warned of (and
    returned)."""
    check_tracker_weights(config.tracks, dict(config.tracker_options), config.tracker_checkpoint)
    dim = check_backbone_weights(config.tracks, config.features, config.weights)
    found = episode_problems(manifest, config.train)
    found += video_problems(manifest, config.video_root)
    found += disk_problems(config, manifest, dim)
    for line in found:
        warnings.warn(line, PreflightWarning, stacklevel=2)
    return found


class PreflightWarning(UserWarning):
    """Something in a run that may go wrong, found before any work."""


# ---------------------------------------------------------------------------------------------
# weights


def check_tracker_weights(tracks, options: dict, weights: Path | None) -> None:
    """The tracker's weight files: there, readable, of the model the tracker runs."""
    import torch

    from tats.pipeline.trackers import cotracker3 as C3

    name = tracks.tracker
    if name in ("cotracker3", "cotracker3-online"):
        kind = "online" if name == "cotracker3-online" else "offline"
        files = [(C3.resolve_checkpoint(weights, kind), kind)]
        if kind == "offline" and options.get("online_checkpoint") is not None:
            files.append((C3.resolve_checkpoint(options["online_checkpoint"], "online"), "online"))
        for path, model_kind in files:
            state = C3.read_state_dict(path)
            with torch.device("meta"):
                model = C3.build_model(model_kind)
            C3.check_state_dict(model, state, str(path))
    elif name == "official":
        from tats.pipeline.trackers import official

        if importlib.util.find_spec("cotracker") is None:
            raise ValueError(
                f"the 'official' tracker needs the official CoTracker package "
                f"({official.INSTALL_HINT})"
            )
        model = options.get("model", "cotracker3")
        if model == "cotracker3":
            path = C3.resolve_checkpoint(weights, "online" if options.get("online") else "offline")
        else:
            path = official._cotracker2_checkpoint(weights, model)
        found = C3.checkpoint_family(C3.read_state_dict(path))
        if found != model:
            what = f"a {found} checkpoint" if found else "not a CoTracker checkpoint"
            raise ValueError(f"{path}: {what}, not {model}")


def check_backbone_weights(tracks, features, weights: Path | None) -> int:
    """The features backbone's weights (and the clustering backbone's, for semantic queries):
    there, readable, of the backbone named; the features' channels per patch."""
    from tats.pipeline.backbones import DINOV2_MODELS, PixelsBackbone, check_weights

    check_weights(features.backbone, weights)
    if tracks.semantic is not None:
        check_weights(tracks.semantic.backbone, weights)
    if features.backbone in DINOV2_MODELS:  # vit_small_..., vit_base_..., vit_large_...
        return VIT_WIDTHS[DINOV2_MODELS[features.backbone][0].split("_")[1]]
    return PixelsBackbone.dim


# ---------------------------------------------------------------------------------------------
# the manifest


@dataclass(frozen=True)
class SplitCheck:
    """What one split can give episodes: its classes, those with enough videos."""

    split: str
    classes: int
    enough: int  # classes with at least `per_class` videos
    per_class: int
    short: tuple[str, ...]  # "class (videos)" of the others


def split_checks(manifest: Manifest, shot: int, train_queries: int, test_queries: int):
    """Each split's classes against the clips an episode takes of a class."""
    found = []
    for split in SPLITS:
        per_class = shot + (train_queries if split == "train" else test_queries)
        rows = manifest.rows
        labels = rows.labels[rows.splits == SPLITS.index(split)]
        codes, counts = np.unique(labels, return_counts=True)
        short = tuple(
            f"{rows.label_names[c]} ({n})" for c, n in zip(codes, counts, strict=True)
            if n < per_class
        )  # fmt: skip
        found.append(SplitCheck(split, len(codes), int((counts >= per_class).sum()),
                                per_class, short))  # fmt: skip
    return found


def episode_problems(manifest: Manifest, train) -> list[str]:
    """Raise ValueError where a split cannot make the episodes training needs (train: `way`
    classes of shot + train queries videos; test, where tested: `way` of shot + test queries);
    warnings for val (fewer classes validate fewer-way, fewer than 2: no validation) and for
    classes left out for too few videos. `train` is a TrainConfig."""
    warnings = []
    for check in split_checks(manifest, train.shot, train.train_queries, train.test_queries):
        need = {"train": train.way, "val": 2 if train.val_episodes else 0,
                "test": train.way if train.test_episodes else 0}[check.split]  # fmt: skip
        if need == 0:
            continue
        enough = (
            f"the {check.split} split of {manifest.path} has {check.enough} classes with at "
            f"least {check.per_class} videos ({train.shot} support + "
            f"{check.per_class - train.shot} queries)"
        )
        if check.enough < need and check.split != "val":
            raise ValueError(f"{enough}; {train.way}-way episodes need {train.way}")
        if check.split == "val" and check.enough < 2:
            warnings.append(f"{enough}: no validation, best.pt will be the last epoch")
        elif check.split == "val" and check.enough < train.way:
            warnings.append(f"{enough}: validation will be {check.enough}-way")
        if check.short:
            warnings.append(
                f"{check.split} classes with fewer than {check.per_class} videos are left "
                f"out: {', '.join(check.short[:5])}{' ...' if len(check.short) > 5 else ''}"
            )
    return warnings


def sample_rows(count: int, sample: int) -> np.ndarray:
    """`sample` rows spread evenly over `count` (all of them where fewer)."""
    return np.unique(np.linspace(0, count - 1, min(sample, count)).round().astype(np.int64))


def video_problems(manifest: Manifest, video_root: Path | None, sample: int = VIDEO_SAMPLE):
    """Look for a sample of the manifest's videos: ValueError when none is there (the video
    root or the folder layout is wrong: the importers' layouts are named), a warning when
    some are missing (they will fail)."""
    rows = [manifest.rows[int(i)] for i in sample_rows(len(manifest.rows), sample)]
    missing = [r for r in rows if not r.path.is_file()]
    if not missing:
        return []
    root = video_root if video_root is not None else manifest.path.parent
    example = f"{missing[0].video_id}: {missing[0].path}"
    if len(missing) == len(rows):
        raise ValueError(
            f"{manifest.path}: none of {len(rows)} videos looked for is there, e.g. {example}; "
            f"relative paths start from {root} (--video-root); the split importers' folder "
            f"layouts are {LAYOUTS} (data_manifests/README.md)"
        )
    return [
        f"{manifest.path}: {len(missing)} of {len(rows)} videos looked for are missing, e.g. "
        f"{example}; they will be listed as failed (`tats manifest check --check-files` lists "
        f"them all)"
    ]


# ---------------------------------------------------------------------------------------------
# the disk


@dataclass(frozen=True)
class StoreSizes:
    """Bytes of the two stores of a run, uncompressed (Zstd saves little on features)."""

    tracks: int
    features: int

    @property
    def total(self) -> int:
        return self.tracks + self.features


def store_sizes(tracks, features, manifest: Manifest, dim: int) -> StoreSizes:
    """The stores' data for every row of `manifest`, uncompressed: tracks (positions,
    visibility and per-point fields), features (fp16 patch grids: every view of the training
    videos, view 0 of the others)."""
    s, p = tracks.frames, tracks.points
    per_track = s * p * 2 * 4 + s * p + p * (1 + 4 + 4) + tracks.subset * 4 + s * 4 + 4 + 8
    side = features.preprocess.size // 14
    per_view = features.frames * side * side * dim * 2
    train = int((manifest.rows.splits == SPLITS.index("train")).sum())
    views = train * features.views + (len(manifest.rows) - train)
    return StoreSizes(len(manifest.rows) * per_track, views * per_view)


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.exists() else 0


def disk_problems(config, manifest: Manifest, dim: int) -> list[str]:
    """ValueError when the disk under the run folder cannot hold the stores (less what they
    hold already)."""
    from tats.chain import STORES

    sizes = store_sizes(config.tracks, config.features, manifest, dim)
    held = sum(folder_bytes(config.out / name) for name in STORES.values())
    need = max(sizes.total - held, 0)
    where = config.out
    while not where.exists():
        where = where.parent
    free = shutil.disk_usage(where).free
    if need > free:
        raise ValueError(
            f"{where}: {gb(free)} free, and the stores need up to {gb(need)} more (tracks "
            f"{gb(sizes.tracks)}, features {gb(sizes.features)}, uncompressed; `tats run --plan` "
            f"measures them): free some space or give --out on a larger disk"
        )
    return []


def gb(size: float) -> str:
    return f"{size / 1e9:.1f} GB" if size >= 1e8 else f"{size / 1e6:.1f} MB"
