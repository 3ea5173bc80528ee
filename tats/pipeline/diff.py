"""`tats-extract diff`: two stores of one manifest compared row by row.

Tracks: the distance in pixels between the two stores' positions of the same point at the
stored frames both call it visible, and how often they agree on visibility. A point is the
same point when it was queried at the same frame and the same place: where its query frame
is a stored frame, points are matched by their query point there (within `MATCH_PX`; the
redundancy filter may keep other points in each store, so indices alone do not say which point
is which); points of other query frames are matched by index when both rows hold the same
points in the same order (the same query frames and clusters), else left unmatched. A point's
own query frame is left out of both measures: every tracker puts the query point there,
visible. Visibility is compared at stored frames after the query frame (semantic points,
tracked both ways: all but the query frame).

Features: the cosine similarity of every patch vector (each view, stored frame and grid
cell) of the two stores.

Only rows done in both ledgers are compared. Rows are read one shard-size slice at a time
(tracks) or one row at a time (features: a row is megabytes); fancy-indexing many rows of a
sharded Zarr array is very slow. Quantiles over all rows come from a log-spaced histogram
(within 1.2% of the exact value, never outside the observed range); per-row ones are exact.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from tats.manifest import Manifest
from tats.pipeline.status import done_rows
from tats.stores import FEATURES, TRACKS, RowStore, check_manifest

MATCH_PX = 0.5  # query points this close (px, at the query frame) are the same point
_TRACK_FIELDS = (
    "positions",
    "visible",
    "valid",
    "query_frame",
    "cluster",
    "frames",
    "num_frames",
    "frame_size",
)
_FEATURE_FIELDS = ("features", "frames", "num_frames", "view_seed")


class StoreMismatch(ValueError):
    """Two stores that cannot be compared: other kinds, manifests or stored shapes."""


class Histogram:
    """Counts of a non-negative quantity in log-spaced bins (200 a decade, 1e-7 to 1e4), for
    quantiles over more values than fit in memory."""

    EDGES = np.concatenate([[0.0], np.geomspace(1e-7, 1e4, 2201)])

    def __init__(self) -> None:
        self.counts = np.zeros(len(self.EDGES) - 1, np.int64)
        self.low, self.high = np.inf, -np.inf

    def add(self, values: np.ndarray) -> None:
        if values.size == 0:
            return
        values = np.clip(values, 0.0, self.EDGES[-1])
        self.low, self.high = (
            min(self.low, float(values.min())),
            max(self.high, float(values.max())),
        )
        index = np.searchsorted(self.EDGES, values, side="right") - 1
        self.counts += np.bincount(
            np.minimum(index, len(self.counts) - 1), minlength=len(self.counts)
        )

    @property
    def total(self) -> int:
        return int(self.counts.sum())

    def quantile(self, q: float) -> float:
        """The upper edge of the bin holding quantile `q`, clamped to the observed range."""
        if self.total == 0:
            return float("nan")
        cumulative = np.cumsum(self.counts)
        index = int(np.searchsorted(cumulative, q * self.total, side="left"))
        return float(np.clip(self.EDGES[index + 1], self.low, self.high))


@dataclass
class RowDiff:
    """One video's comparison. Tracks: `values` are distances in px (`count` point-frames
    visible in both), `agree` the visibility agreement over `agree_of` point-frames, `matched`
    (points matched, kept in A, kept in B). Features: `values` are cosines (`count` patches).
    `problem`: why the row could not be compared (it then counts as a difference)."""

    row: int
    count: int = 0
    mean: float = float("nan")
    tail: float = float("nan")  # tracks: 99th-percentile px; features: 1st-percentile cosine
    extreme: float = float("nan")  # tracks: max px; features: min cosine
    agree: float | None = None
    agree_of: int = 0
    matched: tuple[int, int, int] | None = None
    problem: str | None = None
    video_id: str | None = None


@dataclass
class StoreDiff:
    """Two stores compared: counts of rows, the summary over all compared rows, each row."""

    kind: str  # TRACKS or FEATURES
    a: Path
    b: Path
    num_rows: int
    only_a: int = 0  # rows done in A only
    only_b: int = 0
    neither: int = 0
    rows: list[RowDiff] = field(default_factory=list)
    count: int = 0
    mean: float = float("nan")
    tail: float = float("nan")
    extreme: float = float("nan")
    agree: float | None = None
    agree_of: int = 0
    matched: tuple[int, int, int] | None = None

    @property
    def compared(self) -> int:
        return len(self.rows)

    @property
    def skipped(self) -> int:
        return self.only_a + self.only_b + self.neither

    @property
    def problems(self) -> list[RowDiff]:
        return [r for r in self.rows if r.problem]

    def worst(self, n: int) -> list[RowDiff]:
        """The `n` rows furthest apart: problems first, then by the tail measure."""
        sign = 1.0 if self.kind == TRACKS else -1.0
        measured = [r for r in self.rows if not r.problem and r.count]
        measured.sort(key=lambda r: (-sign * r.tail, -sign * r.mean, r.row))
        return (self.problems + measured)[:n]

    def to_dict(self, worst: int = 10) -> dict:
        def clean(value):
            if isinstance(value, float) and not np.isfinite(value):
                return None
            return value

        def row(r: RowDiff) -> dict:
            return {k: clean(v) for k, v in asdict(r).items()}

        tracks = self.kind == TRACKS
        summary = {
            "count": self.count,
            "mean": clean(self.mean),
            "p99" if tracks else "p1": clean(self.tail),
            "max" if tracks else "min": clean(self.extreme),
        }
        if tracks:
            summary |= {
                "visibility_agreement": clean(self.agree),
                "visibility_point_frames": self.agree_of,
                "points_matched": self.matched,
            }
        return {
            "kind": "tracks" if tracks else "features",
            "a": str(self.a),
            "b": str(self.b),
            "rows": self.num_rows,
            "compared": self.compared,
            "skipped": {
                "done_in_a_only": self.only_a,
                "done_in_b_only": self.only_b,
                "done_in_neither": self.neither,
            },
            "unit": "px" if tracks else "cosine",
            "summary": summary,
            "problems": [row(r) for r in self.problems],
            "worst": [row(r) for r in self.worst(worst)],
        }


def diff_stores(
    a: str | Path, b: str | Path, manifest: Manifest | None = None, progress: bool = True
) -> StoreDiff:
    """Compare the rows done in both stores `a` and `b` (see the module docstring); the
    stores' `manifest`, where given, names the rows. StoreMismatch where they cannot be
    compared."""
    store_a, store_b = RowStore.open(a), RowStore.open(b)
    check_comparable(store_a, store_b)
    video_ids = None
    if manifest is not None:
        check_manifest(store_a, manifest)
        video_ids = manifest.rows.video_ids
    done_a, done_b = set(done_rows(store_a).tolist()), set(done_rows(store_b).tolist())
    both = sorted(done_a & done_b)
    result = StoreDiff(
        store_a.schema,
        store_a.path,
        store_b.path,
        store_a.num_rows,
        only_a=len(done_a - done_b),
        only_b=len(done_b - done_a),
        neither=store_a.num_rows - len(done_a | done_b),
    )
    histogram = Histogram()  # tracks: px; features: 1 - cosine
    total = agree = agree_of = 0
    matched = np.zeros(3, np.int64)
    extreme = -np.inf if result.kind == TRACKS else np.inf
    bar = tqdm(total=len(both), desc="diff", unit="video", disable=not progress)
    for row, one_a, one_b in _paired_rows(store_a, store_b, both):
        if result.kind == TRACKS:
            diff, values = _tracks_row(row, one_a, one_b)
        else:
            diff, values = _features_row(row, one_a, one_b)
        if video_ids is not None:
            diff.video_id = video_ids[row]
        result.rows.append(diff)
        bar.update()
        if diff.problem:
            continue
        if result.kind == TRACKS:
            histogram.add(values)
            extreme = max(extreme, diff.extreme) if diff.count else extreme
            agree += round(diff.agree * diff.agree_of) if diff.agree_of else 0
            agree_of += diff.agree_of
            matched += diff.matched
        else:
            histogram.add(np.clip(1.0 - values, 0.0, None))
            extreme = min(extreme, diff.extreme)
        total += float(values.sum(dtype=np.float64))
    bar.close()
    result.count = histogram.total
    if result.count:
        result.mean = total / result.count
        if result.kind == TRACKS:
            result.tail, result.extreme = histogram.quantile(0.99), float(extreme)
        else:
            result.tail, result.extreme = 1.0 - histogram.quantile(0.99), float(extreme)
    if result.kind == TRACKS:
        result.agree = agree / agree_of if agree_of else None
        result.agree_of = agree_of
        result.matched = tuple(int(x) for x in matched)
    return result


def check_comparable(a: RowStore, b: RowStore) -> None:
    """StoreMismatch (one line) unless `a` and `b` are stores of one kind, made for one
    manifest, with the same stored frames (and, features, the same patch grids)."""
    where = f"{a.path} and {b.path}"
    if a.schema != b.schema:
        raise StoreMismatch(
            f"{a.path} holds {_kind(a.schema)}, {b.path} holds {_kind(b.schema)}: diff compares "
            "two stores of one kind"
        )
    if a.num_rows != b.num_rows:
        raise StoreMismatch(f"{where} have {a.num_rows} and {b.num_rows} rows: not one manifest")
    sha_a, sha_b = a.provenance.get("manifest_sha256"), b.provenance.get("manifest_sha256")
    if sha_a != sha_b:
        raise StoreMismatch(
            f"{where} were made for different manifests (sha256 {str(sha_a)[:12]} and "
            f"{str(sha_b)[:12]})"
        )
    name = "frames" if a.schema == TRACKS else "features"
    shape_a, shape_b = a.fields[name].shape, b.fields[name].shape
    if a.schema == TRACKS and shape_a != shape_b:
        raise StoreMismatch(f"{where} store {shape_a[0]} and {shape_b[0]} frames per video")
    if shape_a != shape_b:
        raise StoreMismatch(
            f"{where} hold features of shapes {shape_a} and {shape_b} per video "
            "(views, frames, grid, grid, channels)"
        )


def _kind(schema: str) -> str:
    return {TRACKS: "tracks", FEATURES: "features"}.get(schema, schema)


def _paired_rows(a: RowStore, b: RowStore, rows: list[int]):
    """(row, A's arrays, B's arrays) of `rows` (ascending): tracks read one shard-size slice
    of A at a time, features one row at a time."""
    if a.schema == FEATURES:
        for row in rows:
            yield row, a.read_row(row, _FEATURE_FIELDS), b.read_row(row, _FEATURE_FIELDS)
        return
    wanted = np.asarray(rows, np.int64)
    for shard in a.shards():
        inside = wanted[(wanted >= shard.start) & (wanted < shard.stop)]
        if not len(inside):
            continue
        lo, hi = int(inside[0]), int(inside[-1]) + 1
        block_a = {n: a.group[n][lo:hi] for n in _TRACK_FIELDS}
        block_b = {n: b.group[n][lo:hi] for n in _TRACK_FIELDS}
        for row in inside.tolist():
            i = row - lo
            yield (
                row,
                {n: v[i] for n, v in block_a.items()},
                {n: v[i] for n, v in block_b.items()},
            )


def _same_frames(a: dict, b: dict) -> str | None:
    """Why two rows are not of the same frames (None when they are)."""
    if int(a["num_frames"]) != int(b["num_frames"]):
        return f"different time bases ({int(a['num_frames'])} and {int(b['num_frames'])} frames)"
    if not np.array_equal(a["frames"], b["frames"]):
        return f"different stored frames ({a['frames'].tolist()} and {b['frames'].tolist()})"
    return None


def _tracks_row(row: int, a: dict, b: dict) -> tuple[RowDiff, np.ndarray]:
    """One row of two tracks stores: its RowDiff and the distances (px) it measured."""
    problem = _same_frames(a, b)
    if problem is None and not np.array_equal(a["frame_size"], b["frame_size"]):
        problem = f"different frame sizes {a['frame_size'].tolist()} and {b['frame_size'].tolist()}"
    if problem:
        return RowDiff(row, problem=problem), np.zeros(0)
    ia, ib = match_points(a, b)
    kept = (int(a["valid"].sum()), int(b["valid"].sum()))
    frames = a["frames"][:, None]
    query = a["query_frame"][ia][None]
    semantic = (a["cluster"][ia] >= 0)[None]
    own = frames != query  # the query frame holds the query point in every store
    visible_a, visible_b = a["visible"][:, ia], b["visible"][:, ib]
    both = visible_a & visible_b & own
    distances = np.linalg.norm(a["positions"][:, ia] - b["positions"][:, ib], axis=-1)[both]
    window = own & (semantic | (frames > query))
    diff = RowDiff(row, count=int(distances.size), matched=(len(ia), *kept))
    if distances.size:
        diff.mean = float(distances.mean())
        diff.tail = float(np.percentile(distances, 99))
        diff.extreme = float(distances.max())
    diff.agree_of = int(window.sum())
    if diff.agree_of:
        diff.agree = float((visible_a == visible_b)[window].mean())
    return diff, distances


def match_points(a: dict, b: dict, tolerance: float = MATCH_PX) -> tuple[np.ndarray, np.ndarray]:
    """Indices (ia, ib) of the kept points of rows `a` and `b` that are the same query point
    (see the module docstring), ascending in A."""
    na, nb = int(a["valid"].sum()), int(b["valid"].sum())
    qa, qb = a["query_frame"][:na], b["query_frame"][:nb]
    same_layout = (
        na == nb and np.array_equal(qa, qb) and np.array_equal(a["cluster"][:na], b["cluster"][:nb])
    )
    stored = {int(f): s for s, f in enumerate(a["frames"])}
    pairs_a, pairs_b = [], []
    for q in np.intersect1d(qa, qb):
        ia, ib = np.flatnonzero(qa == q), np.flatnonzero(qb == q)
        s = stored.get(int(q))
        if s is None:
            if same_layout:
                pairs_a.append(ia)
                pairs_b.append(ib)
            continue
        pa, pb = a["positions"][s, ia], b["positions"][s, ib]
        d = np.linalg.norm(pa[:, None] - pb[None], axis=-1)
        nearest_b, nearest_a = d.argmin(axis=1), d.argmin(axis=0)
        mutual = (nearest_a[nearest_b] == np.arange(len(ia))) & (
            d[np.arange(len(ia)), nearest_b] <= tolerance
        )
        pairs_a.append(ia[mutual])
        pairs_b.append(ib[nearest_b[mutual]])
    if not pairs_a:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    ia, ib = np.concatenate(pairs_a), np.concatenate(pairs_b)
    order = np.argsort(ia, kind="stable")
    return ia[order], ib[order]


def _features_row(row: int, a: dict, b: dict) -> tuple[RowDiff, np.ndarray]:
    """One row of two features stores: its RowDiff and the cosine of every patch."""
    problem = _same_frames(a, b)
    if problem is None and not np.array_equal(a["view_seed"], b["view_seed"]):
        problem = "different augmentation seeds (views differ by construction)"
    if problem:
        return RowDiff(row, problem=problem), np.zeros(0)
    views = zip(a["features"], b["features"], strict=True)  # a view at a time: bounded memory
    cosine = np.concatenate([patch_cosine(x, y).ravel() for x, y in views])
    diff = RowDiff(
        row,
        count=int(cosine.size),
        mean=float(cosine.mean()),
        tail=float(np.percentile(cosine, 1)),
        extreme=float(cosine.min()),
    )
    return diff, cosine


def patch_cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine similarity over the last axis, in float64; 1 where both vectors are zero, 0
    where one is."""
    a, b = a.astype(np.float64), b.astype(np.float64)
    norms = np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1)
    dot = (a * b).sum(axis=-1)
    zero_a, zero_b = ~a.any(axis=-1), ~b.any(axis=-1)
    cosine = np.divide(dot, norms, out=np.zeros_like(dot), where=norms > 0)
    return np.where(zero_a & zero_b, 1.0, np.clip(cosine, -1.0, 1.0))


def failures(result: StoreDiff, max_px: float | None, min_cosine: float | None) -> list[str]:
    """Why the comparison fails (empty: it passes): rows that could not be compared, no row
    compared, a 99th-percentile distance above `max_px` (tracks) or a 1st-percentile cosine
    below `min_cosine` (features)."""
    reasons = []
    if result.problems:
        reasons.append(f"{len(result.problems)} rows could not be compared")
    if not result.count:
        reasons.append(
            "nothing was compared (no rows done in both stores, or no point both call visible)"
        )
    elif result.kind == TRACKS and max_px is not None and result.tail > max_px:
        reasons.append(
            f"99th-percentile distance {result.tail:.4g} px is above --max-px {max_px:g}"
        )
    elif result.kind == FEATURES and min_cosine is not None and result.tail < min_cosine:
        reasons.append(
            f"1st-percentile cosine {result.tail:.6f} is below --min-cosine {min_cosine:g}"
        )
    return reasons


def report_lines(result: StoreDiff, worst: int) -> list[str]:
    """The summary table and the `worst` rows furthest apart, as lines of text."""
    tracks = result.kind == TRACKS
    lines = [
        f"{_kind(result.kind)}: {result.a} vs {result.b}",
        f"rows: {result.compared} of {result.num_rows} compared; {result.skipped} skipped "
        f"({result.only_a} done in A only, {result.only_b} in B only, {result.neither} in "
        "neither)",
    ]
    if tracks:
        matched, kept_a, kept_b = result.matched
        lines.append(f"points matched: {matched} (kept: {kept_a} in A, {kept_b} in B)")
        header = ("", "mean", "p99", "max", "over")
        body = (
            "distance px",
            _num(result.mean),
            _num(result.tail),
            _num(result.extreme),
            f"{result.count} point-frames visible in both",
        )
        agree = "-" if result.agree is None else f"{100 * result.agree:.2f}%"
        table = [header, body, ("visibility", agree, "", "", f"{result.agree_of} point-frames")]
    else:
        header = ("", "mean", "p1", "min", "over")
        body = (
            "cosine",
            _num(result.mean, 6),
            _num(result.tail, 6),
            _num(result.extreme, 6),
            f"{result.count} patches",
        )
        table = [header, body]
    lines += _table(table)
    rows = result.worst(worst)
    if rows:
        what = "99th-percentile px" if tracks else "1st-percentile cosine"
        lines.append(f"worst {len(rows)} videos (by {what}):")
        digits = 4 if tracks else 6
        header = ("row", "video", "mean", "p99" if tracks else "p1", "max" if tracks else "min")
        header += ("visibility",) if tracks else ()
        table = [header]
        for r in rows:
            name = r.video_id or "-"
            if r.problem:
                table.append((str(r.row), name, r.problem))
                continue
            cells = (
                str(r.row),
                name,
                _num(r.mean, digits),
                _num(r.tail, digits),
                _num(r.extreme, digits),
            )
            if tracks:
                cells += ("-" if r.agree is None else f"{100 * r.agree:.2f}%",)
            table.append(cells)
        lines += ["  " + line for line in _table(table)]
    return lines


def _num(value: float, digits: int = 4) -> str:
    return "-" if not np.isfinite(value) else f"{value:.{digits}f}"


def _table(rows: list[tuple[str, ...]]) -> list[str]:
    """Left-aligned columns; a row with fewer cells (a problem) runs on in its last cell."""
    width = max(len(r) for r in rows)
    sizes = [
        max((len(r[i]) for r in rows if len(r) == width and i < len(r)), default=0)
        for i in range(width)
    ]
    out = []
    for r in rows:
        cells = [c.ljust(sizes[i]) if i < len(r) - 1 else c for i, c in enumerate(r)]
        out.append("  ".join(cells).rstrip())
    return out
