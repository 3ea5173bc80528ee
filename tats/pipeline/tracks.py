"""`tats-extract tracks`: point tracks of every manifest video into tracks.zarr.

Per video, as the original TATs extraction: decode on the track time base (10 fps; native for
.webm), lay a grid at every query frame, track all of them in one tracker call, hide each point
before its query frame, drop redundant points, draw the video's fixed 256-subset, and keep the
positions and visibility at the S frames training uses.

Frames are decoded no larger than `max_side` (the tracker's model width by default), so that
memory per clip is bounded; positions are stored in pixels of the video's frames as displayed
(full size, the container's display rotation applied) all the same.

`queries="semantic"` picks the query points as Trokens does instead (`semantic.py`: clusters
of the clustering backbone's patch features, points spread over each cluster's mask at its
peak frame) and tracks them through the whole clip in both directions (`backward=True`) in
one call; every point is kept (no redundancy filter, visibility not hidden before the query
frame), each with its cluster id, and the stored subset is a seeded cluster sample.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from tats.fixes import TRACKS_FIXES, parse_fixes, stage_fixes
from tats.manifest import Manifest, VideoRow
from tats.pipeline import queries as Q
from tats.pipeline import semantic as S
from tats.pipeline.backbones import Backbone
from tats.pipeline.executors import extract
from tats.pipeline.runner import RunSummary
from tats.pipeline.trackers import Tracker, create_tracker
from tats.runtime import announce, device_line, extraction_precision, pick_device
from tats.stores import TRACKS, RowStore, tracks_fields
from tats.video import decode_size, probe, read_frames, stored_frames, timeline

SEMANTIC = "semantic"
CPU_TRACKERS = ("lk",)  # trackers that run on the CPU only: --device auto gives them the CPU
# Videos per tracker call on a GPU by default: CoTracker3 packs them into batches of at most
# `max_batch_tokens` (one clip of 24 frames and 1,792 points is 44k of 1M tokens), which
# keeps a large GPU busy with few launches per clip.
GPU_BATCH = 8


@dataclass(frozen=True)
class TracksConfig:
    """Everything that decides what a tracks store holds (recorded in it, checked on resume)."""

    tracker: str = "cotracker3"
    grid: int = 16
    queries: str = "uniform:8"
    frames: int = 8
    fps: float | None = 10.0
    native_suffixes: tuple[str, ...] = (".webm",)
    min_distance: float = 16.0
    subset: int = 256
    max_points: int | None = None
    max_side: int | None = 512  # decode frames with their longer side at most this (px)
    shard_size: int = 64
    semantic: S.SemanticConfig | None = None  # queries="semantic": its options (None: defaults)
    # The tracks stage's fixes of the releases on (tats/fixes.py: "query-frame",
    # "frame-visibility"); None: all of them, as stores made before the switches.
    fixes: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if self.fixes is not None:
            object.__setattr__(self, "fixes", stage_fixes(parse_fixes(self.fixes), TRACKS_FIXES))
        if self.queries == SEMANTIC:
            if self.semantic is None:
                object.__setattr__(self, "semantic", S.SemanticConfig())
            if self.max_points is not None:
                raise ValueError("semantic queries size the point axis by max_clusters")
        elif self.semantic is not None:
            raise ValueError(f"semantic query options need queries={SEMANTIC!r}")
        else:
            try:
                Q.QueryStrategy.parse(self.queries)
            except ValueError as error:
                raise ValueError(f"{error} (or {SEMANTIC})") from None
        for name in ("grid", "frames", "subset", "shard_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, not {getattr(self, name)}")
        if self.fps is not None and self.fps <= 0:
            raise ValueError(f"fps must be positive, not {self.fps}")
        if self.max_side is not None and self.max_side < 16:
            raise ValueError(f"max_side must be at least 16 px, not {self.max_side}")

    def fixed(self, name: str) -> bool:
        """Whether the fix `name` of this stage is on."""
        return self.fixes is None or name in self.fixes

    @property
    def points(self) -> int:
        """Room on the point axis: every grid point of every query frame (semantic queries:
        `points_per_cluster` for each of `max_clusters` clusters)."""
        if self.semantic is not None:
            return self.semantic.max_points
        if self.max_points is not None:
            return self.max_points
        return self.grid**2 * Q.QueryStrategy.parse(self.queries).max_query_frames()


@dataclass(frozen=True)
class Clip:
    """A decoded clip: frames (T, h, w, 3) at most `max_side`, the video's displayed (H, W),
    and the display rotation decoding applied (see `VideoInfo`)."""

    frames: np.ndarray
    source_size: tuple[int, int]
    rotation: int | None = 0

    def to_source(self, xy: np.ndarray) -> np.ndarray:
        """(x, y) pixels of the decoded frames -> pixels of the video's displayed frames."""
        h, w = self.frames.shape[1:3]
        height, width = self.source_size
        return xy * np.array([(width - 1) / (w - 1), (height - 1) / (h - 1)], np.float32)


@dataclass(frozen=True)
class ClipLoader:
    """Decodes a video on the track time base (runs in decode worker processes)."""

    fps: float | None
    native_suffixes: tuple[str, ...]
    max_side: int | None = None

    def __call__(self, row: VideoRow) -> Clip:
        info = probe(row.path)
        size = decode_size(info.width, info.height, self.max_side)
        frames = read_frames(row.path, timeline(info, self.fps, self.native_suffixes), size=size)
        return Clip(frames, (info.height, info.width), info.rotation)


def track_clips(
    clips: list[Clip],
    video_ids: list[str],
    tracker: Tracker,
    config: TracksConfig,
    backbone: Backbone | None = None,
) -> list[dict[str, np.ndarray]]:
    """Store rows for decoded clips: all query points of a clip in one tracker call (semantic
    queries: found with `backbone`'s features, tracked both ways)."""
    frames = [c.frames for c in clips]
    clusters: list[np.ndarray | None] = [None] * len(clips)
    if config.semantic is not None:
        queries, clusters = semantic_queries(frames, config.semantic, backbone,
                                             not config.fixed("query-frame"))  # fmt: skip
    else:
        strategy = Q.QueryStrategy.parse(config.queries)
        queries = [Q.make_queries(strategy, config.grid, *f.shape[:3]) for f in frames]
    backward = config.semantic is not None
    if len(clips) == 1:
        outputs = [tracker.track(frames[0], queries[0], backward=backward)]
    else:
        outputs = tracker.track_batch(list(zip(frames, queries, strict=True)), backward=backward)
    return [
        tracks_row(
            clip.to_source(tracks), vis, q[:, 0].astype(np.int32),
            (len(clip.frames), *clip.source_size), config, video_id, cluster,
        )  # fmt: skip
        for video_id, clip, q, cluster, (tracks, vis) in zip(
            video_ids, clips, queries, clusters, outputs, strict=True
        )
    ]


def semantic_queries(
    clips: list[np.ndarray],
    config: S.SemanticConfig,
    backbone: Backbone | None,
    release_query_frame: bool = False,
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Per clip (T, H, W, 3): semantic queries (N, 3) = (t, x, y) in its pixels and their cluster
    ids (N,); the clustering frames of all clips go through `backbone` in one forward.
    release_query_frame: the release's query frames (`semantic.semantic_queries`)."""
    if backbone is None:
        raise ValueError("semantic queries need a clustering backbone")
    chosen = [S.clustering_frames(len(c), config.frames) for c in clips]
    features = backbone.encode([c[f] for c, f in zip(clips, chosen, strict=True)]).cpu()
    queries, clusters = [], []
    for clip, frame_ids, grids in zip(
        clips, chosen, features.split([len(f) for f in chosen]), strict=True
    ):
        q, c, _ = S.select_queries(grids, frame_ids, *clip.shape[1:3], config,
                                   release_query_frame)  # fmt: skip
        queries.append(q)
        clusters.append(c)
    return queries, clusters


def tracks_row(
    tracks: np.ndarray,
    visible: np.ndarray,
    query_frame: np.ndarray,
    shape: tuple[int, ...],
    config: TracksConfig,
    video_id: str,
    cluster: np.ndarray | None = None,
) -> dict[str, np.ndarray]:
    """Filter, subset and subsample full-length tracks (pixels of a frame of `shape` (T, H, W))
    into one store row. Points with a `cluster` id (semantic queries) are all kept, visible
    before their query frame where the tracker says so, and subsampled by cluster."""
    T, H, W = shape[:3]
    tracks = np.asarray(tracks, np.float32)
    inside = (
        (tracks[..., 0] >= 0)
        & (tracks[..., 0] <= W - 1)
        & (tracks[..., 1] >= 0)
        & (tracks[..., 1] <= H - 1)
    )
    visible = np.asarray(visible, bool)
    if config.fixed("frame-visibility"):
        visible = visible & inside
    if cluster is None:
        visible = Q.hide_before_query(visible, query_frame)
        keep = np.flatnonzero(Q.filter_redundant(tracks, visible, query_frame, config.min_distance))
        keep = keep[: config.points]
        subset = Q.choose_subset(len(keep), config.subset, video_id)
    else:
        keep = np.arange(len(cluster))
        subset = Q.cluster_subset(cluster, config.subset, Q.video_seed(video_id))
    n = len(keep)
    stored = stored_frames(T, config.frames)
    P = config.points
    row = {
        "positions": np.zeros((config.frames, P, 2), np.float32),
        "visible": np.zeros((config.frames, P), bool),
        "valid": np.zeros(P, bool),
        "query_frame": np.full(P, -1, np.int32),
        "cluster": np.full(P, -1, np.int32),
        "subset": subset,
        "frames": stored.astype(np.int32),
        "num_frames": np.int32(T),
        "frame_size": np.array([H, W], np.int32),
    }
    row["positions"][:, :n] = tracks[stored][:, keep]
    row["visible"][:, :n] = visible[stored][:, keep]
    row["valid"][:n] = True
    row["query_frame"][:n] = query_frame[keep]
    if cluster is not None:
        row["cluster"][:n] = cluster
    return row


class TracksStage:
    """The tracks stage for the runner: decode in workers, track (and cluster) here."""

    def __init__(
        self,
        config: TracksConfig,
        tracker: Tracker,
        batch_size: int = 1,
        backbone: Backbone | None = None,
    ):
        self.config, self.tracker, self.batch_size = config, tracker, batch_size
        self.backbone = backbone
        self.loader = ClipLoader(config.fps, config.native_suffixes, config.max_side)

    def compute(self, rows: list[VideoRow], clips: list[Clip]) -> list[dict[str, np.ndarray]]:
        return track_clips(
            clips, [r.video_id for r in rows], self.tracker, self.config, self.backbone
        )


def open_tracks_store(
    out: str | Path,
    manifest: Manifest,
    config: TracksConfig,
    tracker: Tracker,
    backbone: Backbone | None = None,
) -> RowStore:
    """Create the store for (manifest, config, tracker), or open it if it was made for them
    (semantic queries: and for the clustering `backbone`)."""
    provenance = {
        "manifest_sha256": manifest.sha256,
        "config": asdict(config),
        "tracker": tracker.identity.to_dict(),
    }
    if config.semantic is not None:
        provenance["clustering_backbone"] = backbone.identity
    fields = tracks_fields(config.frames, config.points, config.subset)
    return RowStore.create_or_open(
        out, TRACKS, fields, len(manifest.rows), config.shard_size, provenance, manifest.path
    )


@dataclass(frozen=True)
class TracksRecipe:
    """The tracks stage as a picklable recipe (see executors.py)."""

    config: TracksConfig
    checkpoint: str | None = None
    tracker_options: tuple[tuple[str, object], ...] = ()
    device: str = "auto"  # auto: CUDA where there is one (the lk tracker: the CPU)
    batch_videos: int | None = None  # None: GPU_BATCH on a GPU (the tracker packs them), else 1
    cluster_weights: str | None = None  # semantic queries: the clustering backbone's weights
    precision: str = "auto"  # the tracker's: auto, bf16 or fp32 (lk, official: fp32 only)
    name: str = "tracks"

    def __post_init__(self) -> None:
        extraction_precision(self.precision, "cpu")  # a bad name fails before any work

    def build(self) -> TracksStage:
        """The tracker (and clustering backbone) on the device picked; says so in one line."""
        device = pick_device(self.device, cpu_only=self.config.tracker in CPU_TRACKERS)
        options = dict(self.tracker_options)
        if self.precision != "auto":  # trackers without a choice (lk, official) keep theirs
            options["precision"] = self.precision
        tracker = create_tracker(
            self.config.tracker, checkpoint=self.checkpoint, device=str(device), **options
        )
        precision = getattr(tracker, "precision", "fp32")
        where = device_line(self.device, device, precision)
        line = f"{self.name}: {self.config.tracker} on {where}"
        backbone = None
        if self.config.semantic is not None:
            backbone = S.clustering_backbone(
                self.config.semantic.backbone, self.cluster_weights, pick_device(self.device)
            )
            line += f"; clustering {backbone.name} on {backbone.device}, {backbone.precision}"
        elif self.cluster_weights is not None:
            raise ValueError("clustering weights need semantic queries")
        announce(line)
        batch = self.batch_videos or (GPU_BATCH if device.type == "cuda" else 1)
        return TracksStage(self.config, tracker, batch, backbone)

    def open_store(self, out: str | Path, manifest: Manifest, stage: TracksStage) -> RowStore:
        return open_tracks_store(out, manifest, self.config, stage.tracker, stage.backbone)


def extract_tracks(
    manifest: Manifest,
    out: str | Path,
    config: TracksConfig,
    *,
    checkpoint: str | Path | None = None,
    tracker_options: dict | None = None,
    device: str = "auto",
    batch_videos: int | None = None,
    cluster_weights: str | Path | None = None,
    precision: str = "auto",
    **run,
) -> RunSummary:
    """Run this process's share of the tracks stage (see `executors.extract` for `run`).

    `tracker_options` go to the tracker's constructor (and into its identity);
    `cluster_weights` are the weights of semantic queries' clustering backbone (default: the
    backbone's caches); `precision` is the tracker's arithmetic: auto (bf16 where the device
    has bf16 units), bf16 or fp32.
    """
    recipe = TracksRecipe(
        config,
        None if checkpoint is None else str(checkpoint),
        tuple(sorted((tracker_options or {}).items())),
        device,
        batch_videos,
        None if cluster_weights is None else str(cluster_weights),
        precision,
    )
    return extract(recipe, manifest, out, **run)
