"""`tats-extract tracks`: point tracks of every manifest video into tracks.zarr.

Per video (REFERENCE.md section 1): decode on the track time base (10 fps; native for .webm),
lay a grid at every query frame, track all of them in one tracker call, hide each point
before its query frame, drop redundant points, draw the video's fixed 256-subset, and keep the
positions and visibility at the S frames training uses.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from tats.manifest import Manifest, VideoRow
from tats.pipeline import queries as Q
from tats.pipeline.executors import extract
from tats.pipeline.runner import RunSummary
from tats.pipeline.trackers import Tracker, create_tracker
from tats.stores import TRACKS, RowStore, tracks_fields
from tats.video import probe, read_frames, stored_frames, timeline


@dataclass(frozen=True)
class TracksConfig:
    """Everything that decides what a tracks store holds (recorded in it, checked on resume)."""

    tracker: str = "lk"
    grid: int = 16
    queries: str = "uniform:8"
    frames: int = 8
    fps: float | None = 10.0
    native_suffixes: tuple[str, ...] = (".webm",)
    min_distance: float = 16.0
    subset: int = 256
    max_points: int | None = None
    shard_size: int = 64

    def __post_init__(self) -> None:
        Q.QueryStrategy.parse(self.queries)
        for name in ("grid", "frames", "subset", "shard_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, not {getattr(self, name)}")
        if self.fps is not None and self.fps <= 0:
            raise ValueError(f"fps must be positive, not {self.fps}")

    @property
    def points(self) -> int:
        """Room on the point axis: every grid point of every query frame."""
        if self.max_points is not None:
            return self.max_points
        return self.grid**2 * Q.QueryStrategy.parse(self.queries).max_query_frames()


@dataclass(frozen=True)
class ClipLoader:
    """Decodes a video on the track time base (runs in decode worker processes)."""

    fps: float | None
    native_suffixes: tuple[str, ...]

    def __call__(self, row: VideoRow) -> np.ndarray:
        info = probe(row.path)
        return read_frames(row.path, timeline(info, self.fps, self.native_suffixes))


def track_clips(
    clips: list[np.ndarray], video_ids: list[str], tracker: Tracker, config: TracksConfig
) -> list[dict[str, np.ndarray]]:
    """Store rows for decoded clips (T, H, W, 3): all query frames of a clip in one call."""
    strategy = Q.QueryStrategy.parse(config.queries)
    queries = [Q.make_queries(strategy, config.grid, len(c), c.shape[1], c.shape[2]) for c in clips]
    if len(clips) == 1:
        outputs = [tracker.track(clips[0], queries[0])]
    else:
        outputs = tracker.track_batch(list(zip(clips, queries, strict=True)))
    return [
        tracks_row(tracks, vis, q[:, 0].astype(np.int32), clip.shape, config, video_id)
        for video_id, clip, q, (tracks, vis) in zip(video_ids, clips, queries, outputs, strict=True)
    ]


def tracks_row(
    tracks: np.ndarray,
    visible: np.ndarray,
    query_frame: np.ndarray,
    shape: tuple[int, ...],
    config: TracksConfig,
    video_id: str,
) -> dict[str, np.ndarray]:
    """Filter, subset and subsample full-length tracks into one store row."""
    T, H, W = shape[:3]
    tracks = np.asarray(tracks, np.float32)
    inside = (
        (tracks[..., 0] >= 0)
        & (tracks[..., 0] <= W - 1)
        & (tracks[..., 1] >= 0)
        & (tracks[..., 1] <= H - 1)
    )
    visible = Q.hide_before_query(np.asarray(visible, bool), query_frame) & inside
    keep = np.flatnonzero(Q.filter_redundant(tracks, visible, query_frame, config.min_distance))
    keep = keep[: config.points]
    n = len(keep)
    stored = stored_frames(T, config.frames)
    P = config.points
    row = {
        "positions": np.zeros((config.frames, P, 2), np.float32),
        "visible": np.zeros((config.frames, P), bool),
        "valid": np.zeros(P, bool),
        "query_frame": np.full(P, -1, np.int32),
        "subset": Q.choose_subset(n, config.subset, video_id),
        "frames": stored.astype(np.int32),
        "num_frames": np.int32(T),
        "frame_size": np.array([H, W], np.int32),
    }
    row["positions"][:, :n] = tracks[stored][:, keep]
    row["visible"][:, :n] = visible[stored][:, keep]
    row["valid"][:n] = True
    row["query_frame"][:n] = query_frame[keep]
    return row


class TracksStage:
    """The tracks stage for the runner: decode in workers, track here."""

    def __init__(self, config: TracksConfig, tracker: Tracker, batch_size: int = 1):
        self.config, self.tracker, self.batch_size = config, tracker, batch_size
        self.loader = ClipLoader(config.fps, config.native_suffixes)

    def compute(self, rows: list[VideoRow], clips: list[np.ndarray]) -> list[dict[str, np.ndarray]]:
        return track_clips(clips, [r.video_id for r in rows], self.tracker, self.config)


def open_tracks_store(
    out: str | Path, manifest: Manifest, config: TracksConfig, tracker: Tracker
) -> RowStore:
    """Create the store for (manifest, config, tracker), or open it if it was made for them."""
    provenance = {
        "manifest_sha256": manifest.sha256,
        "config": asdict(config),
        "tracker": tracker.identity.to_dict(),
    }
    fields = tracks_fields(config.frames, config.points, config.subset)
    return RowStore.create_or_open(
        out, TRACKS, fields, len(manifest.rows), config.shard_size, provenance
    )


@dataclass(frozen=True)
class TracksRecipe:
    """The tracks stage as a picklable recipe (see executors.py)."""

    config: TracksConfig
    checkpoint: str | None = None
    tracker_options: tuple[tuple[str, object], ...] = ()
    device: str = "cpu"
    batch_videos: int = 1
    name: str = "tracks"

    def build(self) -> TracksStage:
        tracker = create_tracker(
            self.config.tracker,
            checkpoint=self.checkpoint,
            device=self.device,
            **dict(self.tracker_options),
        )
        return TracksStage(self.config, tracker, self.batch_videos)

    def open_store(self, out: str | Path, manifest: Manifest, stage: TracksStage) -> RowStore:
        return open_tracks_store(out, manifest, self.config, stage.tracker)


def extract_tracks(
    manifest: Manifest,
    out: str | Path,
    config: TracksConfig,
    *,
    checkpoint: str | Path | None = None,
    tracker_options: dict | None = None,
    device: str = "cpu",
    batch_videos: int = 1,
    **run,
) -> RunSummary:
    """Run this process's share of the tracks stage (see `executors.extract` for `run`).

    `tracker_options` go to the tracker's constructor (and into its identity).
    """
    recipe = TracksRecipe(
        config,
        None if checkpoint is None else str(checkpoint),
        tuple(sorted((tracker_options or {}).items())),
        device,
        batch_videos,
    )
    return extract(recipe, manifest, out, **run)
