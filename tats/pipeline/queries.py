"""Where tracks start and which of them are kept, as the original TATs extraction does
(`point_tracking/extract_points.py` and `point_tracking/point_sampler.py` in
pulkitkumar95/tats), with the subset seeded by the video id where the original's is unseeded.

A strategy names the query frames on the track time base (T frames); at each query frame a
G x G grid of points is tracked through the whole clip. Points from later query frames that
stay close to points already kept are dropped; a fixed, seeded subset of the kept points is
what training reads.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import numpy as np

# CoTracker's grid mode lays its grid out at the model resolution; using the same points for
# every tracker keeps stores from different trackers comparable point for point.
MODEL_RESOLUTION = (384, 512)
# How a cluster sample reaches its size: Trokens' repeated points, or tats' masked padding.
FILLS = ("repeat", "pad")


@dataclass(frozen=True)
class QueryStrategy:
    """`uniform:K`, `beginning`, `middle` or `interval:k`, as written on the command line."""

    kind: str
    value: int | None = None

    @classmethod
    def parse(cls, text: str) -> QueryStrategy:
        kind, _, value = text.partition(":")
        if kind in ("beginning", "middle") and not value:
            return cls(kind)
        if kind in ("uniform", "interval") and value.isdigit() and int(value) >= 1:
            if kind == "uniform" and int(value) < 2:
                raise ValueError(f"query strategy {text!r}: uniform needs K >= 2 chunks")
            return cls(kind, int(value))
        raise ValueError(
            f"unknown query strategy {text!r}; use uniform:K, beginning, middle or interval:k"
        )

    def __str__(self) -> str:
        return self.kind if self.value is None else f"{self.kind}:{self.value}"

    def query_frames(self, num_frames: int) -> np.ndarray:
        """Distinct query frames, ascending, for a clip of `num_frames` frames."""
        T = num_frames
        if self.kind == "beginning":
            frames = np.array([0])
        elif self.kind == "middle":
            frames = np.array([0, T // 2])
        elif self.kind == "uniform":
            frames = np.linspace(0, T - 1, self.value).astype(int)[:-1]
        else:
            frames = np.arange(0, max(T - 1, 1), self.value)
        # Short clips make linspace repeat frames; the original then tracked (and filtered)
        # the same grid twice. One grid per distinct frame is what it meant.
        return np.unique(frames)

    def max_query_frames(self, max_frames: int | None = None) -> int:
        """Upper bound on `len(query_frames(T))`; sizes the store's point axis."""
        if self.kind == "beginning":
            return 1
        if self.kind == "middle":
            return 2
        if self.kind == "uniform":
            return self.value - 1
        if max_frames is None:
            raise ValueError(
                f"query strategy {self}: the number of query frames grows with the clip; "
                "give a maximum number of points"
            )
        return max(1, math.ceil((max_frames - 1) / self.value))


def grid_points(grid: int, height: int, width: int) -> np.ndarray:
    """CoTracker's `grid` x `grid` layout in pixels of a `height` x `width` frame, (G*G, 2) (x, y).

    Laid out at the model resolution with a margin of W/64, row-major, then mapped to the
    frame the way the predictor maps its tracks back: by (W-1)/(512-1) and (H-1)/(384-1).
    """
    model_h, model_w = MODEL_RESOLUTION
    if grid == 1:
        xs, ys = np.array([model_w / 2]), np.array([model_h / 2])
    else:
        margin = model_w / 64
        xs = margin + (model_w - 2 * margin) / (grid - 1) * np.arange(grid)
        ys = margin + (model_h - 2 * margin) / (grid - 1) * np.arange(grid)
    x, y = np.meshgrid(xs, ys, indexing="xy")
    points = np.stack([x.ravel(), y.ravel()], axis=-1)
    points *= [(width - 1) / (model_w - 1), (height - 1) / (model_h - 1)]
    return points.astype(np.float32)


def make_queries(
    strategy: QueryStrategy, grid: int, num_frames: int, height: int, width: int
) -> np.ndarray:
    """Queries (N, 3) = (t, x, y): the grid at each query frame, grouped by frame."""
    points = grid_points(grid, height, width)
    frames = strategy.query_frames(num_frames)
    t = np.repeat(frames, len(points)).astype(np.float32)[:, None]
    return np.concatenate([t, np.tile(points, (len(frames), 1))], axis=1)


def hide_before_query(visible: np.ndarray, query_frame: np.ndarray) -> np.ndarray:
    """Visibility (T, N) with every frame before a point's query frame set False."""
    t = np.arange(visible.shape[0])[:, None]
    return visible & (t >= query_frame[None, :])


def filter_redundant(
    tracks: np.ndarray, visible: np.ndarray, query_frame: np.ndarray, min_distance: float = 16.0
) -> np.ndarray:
    """Boolean keep-mask (N,) of the TATs redundancy filter.

    Every point of the first query frame is kept. A point of a later query frame q is kept when
    its mean distance over frames q..T-1 (visibility ignored) to every kept point visible at q
    exceeds `min_distance` pixels; when no kept point is visible at q, all of q's points are kept.
    """
    frames = np.unique(query_frame)
    keep = query_frame == frames[0]
    for q in frames[1:]:
        new = np.flatnonzero(query_frame == q)
        old = np.flatnonzero(keep & visible[q])
        if len(old) == 0:
            keep[new] = True
            continue
        keep[new] = _mean_distance(tracks[q:, new], tracks[q:, old]).min(axis=1) > min_distance
    return keep


def _mean_distance(a: np.ndarray, b: np.ndarray, frames_per_chunk: int = 16) -> np.ndarray:
    """Mean over frames of the distances between points a (T, n, 2) and b (T, m, 2): (n, m)."""
    a, b = a.astype(np.float64), b.astype(np.float64)
    total = np.zeros((a.shape[1], b.shape[1]))
    # In chunks of frames: the (frames, n, m) distance tensor of a long clip is GBs.
    for start in range(0, len(a), frames_per_chunk):
        x, y = a[start : start + frames_per_chunk], b[start : start + frames_per_chunk]
        squared = (
            (x * x).sum(-1)[:, :, None] + (y * y).sum(-1)[:, None, :] - 2 * x @ y.swapaxes(1, 2)
        )
        total += np.sqrt(np.maximum(squared, 0)).sum(axis=0)
    return total / len(a)


def video_seed(video_id: str, purpose: str = "subset") -> int:
    """A seed that depends only on the video id (and what it seeds): stable across machines."""
    digest = hashlib.sha256(f"{purpose}:{video_id}".encode()).digest()
    return int.from_bytes(digest[:8], "little")


def choose_subset(num_points: int, size: int, video_id: str) -> np.ndarray:
    """`size` distinct point indices drawn once per video (seeded by its id); -1 pads short clips.

    The order is the draw's order, as in the original; training reads the points in ascending
    index whatever the order here (tats/episodes.py), as Trokens' relative offsets need.
    """
    rng = np.random.default_rng(video_seed(video_id))
    take = min(size, num_points)
    subset = np.full(size, -1, dtype=np.int32)
    subset[:take] = rng.choice(num_points, take, replace=False)
    return subset


def cluster_subset(
    cluster_ids: np.ndarray, size: int, seed: int, fill: str = "repeat"
) -> np.ndarray:
    """`size` points drawn from clusters, at least one per cluster and the rest in proportion
    to cluster size, as Trokens' `cluster_sample` (`trokens/datasets/point_sampler.py`) and
    its loader's top-up (`trokens/datasets/base_ds.py`, `__getitem__`) do, seeded.

    cluster_ids [N]: each point's cluster. With K clusters and K <= size, cluster k's share is
    1 + int((size - K) * count_k / N), and the shares left over by the rounding go one at a
    time to clusters drawn by size with replacement; each cluster's share is drawn from its
    points, with replacement where it is larger than the cluster. With K > size, `size`
    clusters are drawn by size and one point of each. The release marks the drawn points in
    a mask, so a point drawn twice counts once; the loader then tops up to `size` with points
    drawn again from those marked (without replacement where there are enough). The result:
    the marked points ascending, then the top-up in draw order; every entry a point (a clip
    of at most `size` points repeats some and may leave others out).

    fill "pad" is tats' earlier variant: every point at most once (all of them where there
    are at most `size`), ascending, -1 pads.
    """
    if fill not in FILLS:
        raise ValueError(f"fill {fill!r} is not one of {FILLS}")
    cluster_ids = np.asarray(cluster_ids)
    n = len(cluster_ids)
    if fill == "pad" and n <= size:
        subset = np.full(size, -1, np.int32)
        subset[:n] = np.arange(n)
        return subset
    rng = np.random.default_rng(seed)
    clusters, members_of, counts = np.unique(cluster_ids, return_inverse=True, return_counts=True)
    if len(clusters) >= size:
        quota = np.zeros(len(clusters), np.int64)
        quota[rng.choice(len(clusters), size, replace=False, p=counts / n)] = 1
    elif fill == "pad":
        quota = 1 + (size - len(clusters)) * counts // n  # at most counts, as size < n
        for _ in range(size - int(quota.sum())):
            room = np.where(quota < counts, counts, 0)
            quota[rng.choice(len(clusters), p=room / room.sum())] += 1
    else:
        quota = 1 + ((size - len(clusters)) * counts / n).astype(np.int64)
        extra = size - int(quota.sum())
        quota += np.bincount(rng.choice(len(clusters), extra, p=counts / n), minlength=len(quota))
    drawn = np.concatenate([
        rng.choice(np.flatnonzero(members_of == c), quota[c], replace=quota[c] > counts[c])
        for c in np.flatnonzero(quota)
    ])  # fmt: skip
    marked = np.unique(drawn)
    missing = size - len(marked)
    top_up = rng.choice(marked, missing, replace=missing > len(marked))
    return np.concatenate([marked, top_up]).astype(np.int32)


def padded(subset: np.ndarray, kept: int) -> np.ndarray:
    """A subset as fill "pad" reads it: every point at most once, -1 pads. All `kept` points
    where they fit in the subset; otherwise the subset's points, each once."""
    size = len(subset)
    if kept <= size:
        points = np.arange(kept)
    else:
        points = np.unique(subset[subset >= 0])
    out = np.full(size, -1, np.int32)
    out[: len(points)] = points
    return out


def canonical_order(subset: np.ndarray) -> np.ndarray:
    """The order training reads a subset's points in: each point's first entry in ascending
    point index, then the repeats in the subset's order, then padding (-1).

    Trokens' loader reads its sampled points through a mask, so in ascending stored index, and
    appends its top-up (`trokens/datasets/base_ds.py`); the motion tokens' relative offsets
    depend on the order.
    """
    subset = np.asarray(subset)
    _, first = np.unique(subset, return_index=True)
    first = first[subset[first] >= 0]  # ascending by point index
    rest = np.setdiff1d(np.arange(len(subset)), first)
    rest = rest[np.argsort(subset[rest] < 0, kind="stable")]
    return subset[np.concatenate([first, rest])]
