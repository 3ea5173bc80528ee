"""Point data in and out of tats stores: the original releases' pickles, HDF5 and NPZ.

Import. The original extraction scripts write one pickle per video (named after the video file,
`<name>.pkl`, in any folder below the one given):

- TATs (pulkitkumar95/tats, point_tracking/extract_points.py): `pred_tracks` float16
  [1, T, N, 2] and `pred_visibility` bool [1, T, N] (torch tensors; hidden before each point's
  query frame), `per_point_queries` int [N], `total_points`, and the fixed subset
  `random` -> {256: {"sampled_indices": [256], ...}} (point_sampler.py). N are the points its
  redundancy filter kept, in (x, y) pixels of the video, on its 10 fps time base
  (`int(duration * 10)` frames spread over the video; native for .webm).
- Trokens (pulkitkumar95/trokens, point_tracking/new_point_tracking.py): `pred_tracks` float16
  [T, N, 2], `pred_visibility` bool [T, N], `obj_ids` int64 [N] (each point's semantic cluster)
  and `point_queries` int64 [N] (each point's query frame); no filter, no subset.

Each video's points become a row exactly as extraction makes one (`tats.pipeline.tracks.
tracks_row`: TATs points as grid queries are hidden before their query frame, filtered for
redundancy and subsampled by the seeded subset; Trokens points with their clusters as
semantic queries are all kept and subsampled by cluster; both are hidden outside the frame),
after resampling the pickle's time axis to the store's time base (computed from the video, as
the features stage computes it) where their lengths differ. A TATs pickle's own subset is
kept where it fits: its size is the store's and every point survived the filter. The import
runs through the stage runner, so it has the leases, ledger, resumption and per-video
failures of an extraction.

Unpickling runs whatever code a pickle names: `import_pickles` refuses unless told the files
are trusted.

Export. `export_h5` writes one chunked, gzip-compressed HDF5 dataset per store array (first
axis the manifest row), the store's attributes as HDF5 attributes (nested ones as JSON text,
listed in `tats_json_attributes`), and alongside: `/manifest` (the rows' columns and the
manifest file's text), `/done` (rows the ledger calls done) and `/ledger` (its records).
`import_h5` makes the same store again; `export_npz` writes one `.npz` per done video.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
import uuid
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tats.manifest import Manifest, VideoRow
from tats.pipeline.executors import extract
from tats.pipeline.ledger import Ledger, UnitRecord
from tats.pipeline.runner import RunSummary
from tats.pipeline.status import done_rows
from tats.pipeline.trackers import TrackerIdentity
from tats.pipeline.tracks import TracksConfig, open_tracks_store, tracks_row
from tats.stores import (
    FEATURES,
    MANIFEST_SHA,
    READABLE_VERSIONS,
    TRACKS,
    Field,
    RowStore,
    StoreError,
    check_manifest,
    current_layout,
    keep_manifest,
    row_digest,
)
from tats.video import probe, timeline

LAYOUTS = ("tats-pkl", "trokens-pkl")
RELEASES = {
    "tats-pkl": "pulkitkumar95/tats point_tracking/extract_points.py",
    "trokens-pkl": "pulkitkumar95/trokens point_tracking/new_point_tracking.py",
}
UNTRUSTED = (
    "unpickling runs whatever code a pickle names, so pickles are read only when you trust "
    "them: pass --trust-pickles for files you or a source you trust wrote"
)
H5_EXTRAS = ("manifest", "done", "ledger")  # names beside the store's arrays in an HDF5 export
INT32_MAX = np.iinfo(np.int32).max
# Positions farther than this many frame sides outside the frame are no tracker's output.
MAX_OFFSET_SIDES = 10
# What each layout must hold; the third key is each point's query frame.
ORIGINAL_KEYS = {
    "tats-pkl": ("pred_tracks", "pred_visibility", "per_point_queries"),
    "trokens-pkl": ("pred_tracks", "pred_visibility", "point_queries", "obj_ids"),
}


@dataclass(frozen=True)
class OriginalPoints:
    """One pickle's points on its own time axis: tracks [T, N, 2] float32 (x, y) pixels,
    visible [T, N], query_frame [N]; the TATs subset [K] (indices into N) or None; Trokens'
    cluster of each point [N] or None."""

    tracks: np.ndarray
    visible: np.ndarray
    query_frame: np.ndarray
    subset: np.ndarray | None = None
    cluster: np.ndarray | None = None


def _array(value, what: str, path: Path) -> np.ndarray:
    if hasattr(value, "detach"):  # a torch tensor
        value = value.detach().cpu().numpy()
    try:
        return np.asarray(value)
    except Exception as error:  # noqa: BLE001 - anything a pickle may hold
        raise ValueError(f"{path}: {what} is not an array ({error})") from None


def _numbers(value, what: str, path: Path) -> np.ndarray:
    """An array of numbers (not strings, objects or booleans)."""
    array = _array(value, what, path)
    if array.dtype == bool or not np.issubdtype(array.dtype, np.number):
        kind = {"b": "true/false values", "U": "text", "S": "bytes", "O": "Python objects"}
        found = kind.get(array.dtype.kind, f"{array.dtype} values")
        raise ValueError(f"{path}: {what} holds {found}, not numbers")
    return array


def _integers(value, what: str, path: Path, meaning: str) -> np.ndarray:
    """int64 of an array of whole numbers in 0..2^31-1 (the store's int32), any number dtype;
    NaN, fractions and values outside that range are refused, not cast."""
    array = _numbers(value, what, path).reshape(-1)
    if not np.isfinite(array).all():
        raise ValueError(f"{path}: {what} holds NaN or infinity, expected {meaning}")
    if (array != np.round(array)).any():
        bad = array[array != np.round(array)][0]
        raise ValueError(f"{path}: {what} holds fractions ({bad}), expected {meaning}")
    if len(array) and (array.min() < 0 or array.max() > INT32_MAX):
        bad = array.min() if array.min() < 0 else array.max()
        raise ValueError(f"{path}: {what} holds {bad}, outside 0..{INT32_MAX} ({meaning})")
    return array.astype(np.int64)


def read_original(data: object, layout: str, path: Path) -> OriginalPoints:
    """The points of one unpickled original file, checked: numbers of the right kinds (frame
    numbers and cluster ids whole, visibility true or false), shapes that agree, at least one
    point, positions finite."""
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a dict, found {type(data).__name__}")
    keys = ORIGINAL_KEYS[layout]
    missing = [k for k in keys if k not in data]
    if missing:
        has = ", ".join(map(str, data))
        raise ValueError(f"{path}: not a {layout} pickle: no {', '.join(missing)} (has {has})")
    tracks = _numbers(data["pred_tracks"], "pred_tracks", path).astype(np.float32)
    visible = _array(data["pred_visibility"], "pred_visibility", path)
    if visible.dtype != bool:
        visible = _numbers(visible, "pred_visibility", path)
        if not np.isin(visible, (0, 1)).all():
            bad = visible[~np.isin(visible, (0, 1))].reshape(-1)[0]
            raise ValueError(f"{path}: pred_visibility holds {bad}, expected true/false (1/0)")
    # TATs keeps CoTracker's batch axis; Trokens squeezed it.
    if tracks.ndim == 4 and tracks.shape[0] == 1:
        tracks, visible = tracks[0], visible.reshape(visible.shape[-2:])
    if tracks.ndim != 3 or tracks.shape[2] != 2:
        raise ValueError(f"{path}: pred_tracks has shape {tracks.shape}, expected [T, N, 2]")
    T, N = tracks.shape[:2]
    if N == 0 or T == 0:
        raise ValueError(f"{path}: no points (pred_tracks has shape {tracks.shape})")
    if visible.shape != (T, N):
        raise ValueError(f"{path}: pred_visibility has shape {visible.shape}, expected {(T, N)}")
    query = _integers(data[keys[2]], keys[2], path, "frame numbers")
    if query.shape != (N,):
        raise ValueError(f"{path}: {keys[2]} has shape {query.shape}, expected ({N},)")
    if query.max() >= T:
        raise ValueError(f"{path}: query frames outside 0..{T - 1}")
    if not np.isfinite(tracks).all():
        raise ValueError(f"{path}: non-finite track positions")
    subset = cluster = None
    if layout == "tats-pkl":
        drawn = data.get("random")
        if isinstance(drawn, dict) and drawn:
            size = max(drawn)  # the release draws one size (256)
            entry = drawn[size]
            if isinstance(entry, dict) and "sampled_indices" in entry:
                subset = _array(entry["sampled_indices"], "sampled_indices", path).reshape(-1)
    else:
        cluster = _integers(data["obj_ids"], "obj_ids", path, "cluster numbers")
        if cluster.shape != (N,):
            raise ValueError(f"{path}: obj_ids has shape {cluster.shape}, expected ({N},)")
    return OriginalPoints(tracks, visible.astype(bool), query, subset, cluster)


def resample(points: OriginalPoints, num_frames: int) -> OriginalPoints:
    """The points on a time base of `num_frames` frames spread over the same video: positions
    interpolated linearly in time, visibility of the nearest frame, each query frame moved to
    the first frame at or after it. The same points when the lengths agree."""
    T = len(points.tracks)
    if T == num_frames:
        return points
    if T == 1 or num_frames == 1:
        where = np.zeros(num_frames)
    else:
        where = np.arange(num_frames) * (T - 1) / (num_frames - 1)
    low = np.floor(where).astype(int)
    high = np.minimum(low + 1, T - 1)
    w = (where - low)[:, None, None].astype(np.float32)
    tracks = (1 - w) * points.tracks[low] + w * points.tracks[high]
    visible = points.visible[np.rint(where).astype(int)]
    scale = 0.0 if T == 1 else (num_frames - 1) / (T - 1)
    query = np.minimum(np.ceil(points.query_frame * scale - 1e-6), num_frames - 1).astype(np.int64)
    return OriginalPoints(tracks, visible, query, points.subset, points.cluster)


def pickle_index(source: Path) -> dict[str, list[Path]]:
    """Every `*.pkl` below `source` by the name the releases give it (the video file's name
    up to its first dot)."""
    if not source.is_dir():
        raise FileNotFoundError(f"{source}: no such folder of pickles")
    index: dict[str, list[Path]] = defaultdict(list)
    for path in sorted(source.rglob("*.pkl")):
        index[path.name.split(".")[0]].append(path)
    return dict(index)


@dataclass(frozen=True)
class PickleLoader:
    """Reads one video's pickle and makes its store row (runs in decoding processes)."""

    layout: str
    source: Path
    index: dict[str, list[Path]]
    config: TracksConfig

    def find(self, row: VideoRow) -> Path:
        for name in (row.video_id, Path(row.path).name.split(".")[0]):
            found = self.index.get(name, [])
            if len(found) > 1:
                raise ValueError(f"several pickles named {name}.pkl: {', '.join(map(str, found))}")
            if found:
                return found[0]
        raise FileNotFoundError(
            f"no pickle for {row.video_id} in {self.source} (looked for {row.video_id}.pkl and "
            f"{Path(row.path).name.split('.')[0]}.pkl)"
        )

    def __call__(self, row: VideoRow) -> dict[str, np.ndarray]:
        path = self.find(row)
        with open(path, "rb") as f:
            try:
                data = pickle.load(f)  # noqa: S301 - the user vouched for these files
            except Exception as error:  # noqa: BLE001 - a broken file is this video's failure
                problem = f"{type(error).__name__}: {error}"
                raise ValueError(f"{path}: cannot unpickle ({problem})") from None
        original = read_original(data, self.layout, path)
        points = len(original.query_frame)
        if original.cluster is not None and points > self.config.points:
            raise ValueError(
                f"{path}: {points} points, the store has room for {self.config.points}: raise "
                "--max-clusters or --points-per-cluster"
            )
        info = probe(row.path)
        side = max(info.width, info.height)
        far = np.abs(original.tracks - side / 2).max()
        if far > (MAX_OFFSET_SIDES + 0.5) * side:
            raise ValueError(
                f"{path}: track positions up to {np.abs(original.tracks).max():.3g} px, the video "
                f"is {info.width}x{info.height}: more than {MAX_OFFSET_SIDES} frame sides outside"
            )
        num_frames = len(timeline(info, self.config.fps, self.config.native_suffixes))
        points = resample(original, num_frames)
        shape = (num_frames, info.height, info.width)
        result = tracks_row(points.tracks, points.visible, points.query_frame.astype(np.int32),
                            shape, self.config, row.video_id, points.cluster)  # fmt: skip
        kept = int(result["valid"].sum())
        subset = points.subset
        if (
            subset is not None
            and len(subset) == self.config.subset
            and kept == len(points.query_frame)  # the filter kept every point
            and len(np.unique(subset)) == len(subset)
            and (subset >= 0).all()
            and (subset < kept).all()
        ):
            result["subset"] = subset.astype(np.int32)
        return result


class ImportStage:
    """The import as a stage of the runner: the pickles' points, their release as 'tracker'."""

    batch_size = 16

    def __init__(self, loader: PickleLoader):
        self.loader = loader
        self.identity = TrackerIdentity(f"import:{loader.layout}", RELEASES[loader.layout])

    def compute(self, rows: list[VideoRow], inputs: list[dict]) -> list[dict[str, np.ndarray]]:
        return inputs


@dataclass(frozen=True)
class ImportRecipe:
    """The import as a picklable recipe (see executors.py)."""

    layout: str
    source: str
    config: TracksConfig
    name: str = "import"

    def build(self) -> ImportStage:
        source = Path(self.source)
        return ImportStage(PickleLoader(self.layout, source, pickle_index(source), self.config))

    def open_store(self, out: str | Path, manifest: Manifest, stage: ImportStage) -> RowStore:
        clustering = ReleaseClustering(self.layout) if self.config.semantic is not None else None
        return open_tracks_store(out, manifest, self.config, stage, clustering)


@dataclass(frozen=True)
class ReleaseClustering:
    """Where an imported store's clusters come from (its provenance's clustering backbone)."""

    layout: str

    @property
    def identity(self) -> dict:
        return {"name": f"import:{self.layout}", "source": RELEASES[self.layout]}


def import_pickles(
    layout: str,
    source: str | Path,
    manifest: Manifest,
    out: str | Path,
    config: TracksConfig,
    trust_pickles: bool = False,
    **run,
) -> RunSummary:
    """Import the per-video pickles below `source` (an original release's `layout`, see the
    module docstring) into the tracks store `out` for `manifest`; `run` as for
    `executors.extract`. Refuses (ValueError) unless `trust_pickles`: unpickling runs code."""
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; use {' or '.join(LAYOUTS)}")
    if not trust_pickles:
        raise ValueError(f"{source}: not read: {UNTRUSTED}")
    semantic = config.semantic is not None
    if semantic != (layout == "trokens-pkl"):
        holds = "semantic points (queries='semantic')" if not semantic else "grid points"
        raise ValueError(f"{layout} pickles hold {holds}, not {config.queries!r} queries")
    source = Path(source).absolute()
    pickle_index(source)  # a missing folder stops here, not once per video
    return extract(ImportRecipe(layout, str(source), config), manifest, out, **run)


# ---------------------------------------------------------------------------------------------
# HDF5 and NPZ


def _open_for_export(store_path: str | Path, manifest: Manifest) -> RowStore:
    store = RowStore.open(store_path)
    check_manifest(store, manifest)
    clash = set(store.fields) & set(H5_EXTRAS)
    if clash:
        raise StoreError(f"{store.path}: an array is named {', '.join(sorted(clash))}")
    return store


def _h5_chunks(num_rows: int, field: Field) -> tuple[int, ...]:
    """Chunks of whole rows (one view of one video where a row is split), about 1 MB."""
    chunk = field.chunk
    row_bytes = int(np.prod(chunk, dtype=np.int64)) * np.dtype(field.dtype).itemsize
    rows = max(1, min(num_rows, (1 << 20) // max(row_bytes, 1)))
    return (rows, *chunk) if chunk else (rows,)


def export_h5(store_path: str | Path, manifest: Manifest, out: str | Path) -> Path:
    """Write the store (and its manifest rows, done rows and ledger) to the HDF5 file `out`,
    written aside and renamed into place."""
    import h5py

    out = Path(out)
    if out.is_dir():
        raise ValueError(f"{out}: a folder; the HDF5 export is one file: give its path "
                         f"(e.g. {out / 'store.h5'})")  # fmt: skip
    check_new_path(out)
    store = _open_for_export(store_path, manifest)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with h5py.File(tmp, "w") as h5:
            nested = []
            for key, value in store.attrs.items():
                if isinstance(value, dict | list):
                    value = json.dumps(value)
                    nested.append(key)
                h5.attrs[key] = value
            h5.attrs["tats_json_attributes"] = json.dumps(nested)
            for name, field in store.fields.items():
                h5.create_dataset(
                    name, shape=(store.num_rows, *field.shape), dtype=field.dtype,
                    chunks=_h5_chunks(store.num_rows, field), compression="gzip",
                    compression_opts=4, shuffle=True, fillvalue=field.fill,
                )  # fmt: skip
            for shard in store.shards():
                for name, values in store.read_rows(shard).items():
                    h5[name][shard.start : shard.stop] = values
            text = h5py.string_dtype()
            rows = manifest.rows
            group = h5.create_group("manifest")
            group.attrs["sha256"] = manifest.sha256
            group.attrs["file"] = manifest.path.name
            for column in ("video_id", "path", "label", "split"):
                group.create_dataset(column, data=[str(getattr(r, column)) for r in rows],
                                     dtype=text)  # fmt: skip
            group.create_dataset("csv", data=manifest.path.read_bytes().decode(), dtype=text)
            done = np.zeros(store.num_rows, bool)
            done[done_rows(store)] = True
            h5.create_dataset("done", data=done)
            records = Ledger(store.ledger_dir).records()
            h5.create_dataset("ledger", data=[records[u].to_json() for u in sorted(records)],
                              dtype=text)  # fmt: skip
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out


def import_h5(path: str | Path, out: str | Path, manifest_out: str | Path | None = None) -> Path:
    """Make the store of an `export_h5` file at `out` (which must not exist): the same arrays,
    attributes and ledger. Checked first: the attributes, each array's shape, the ledger
    records and /done (the rows the ledger records, no others); then, shard by shard, every
    done row against its digest and every other row for holding nothing. Built aside and
    renamed into place. `manifest_out`: also write the manifest file it was made for (same
    bytes)."""
    import h5py

    path, out = Path(path), Path(out)
    if out.exists():
        raise StoreError(f"{out} exists; import into a new --out")
    check_new_path(out)
    try:
        h5 = h5py.File(path, "r")
    except OSError as error:
        raise StoreError(f"{path}: not an HDF5 file ({error})") from None
    with h5:
        with _h5_damage(path):
            attrs, fields = _h5_attributes(h5, path)
            records, done = _h5_ledger(h5, path, attrs)
        tmp = out.parent / f".{out.name}.importing-{uuid.uuid4().hex[:12]}"
        try:
            # An export of an earlier version makes a store of this one: the same values.
            fields = current_layout(attrs["schema"], fields)
            store = RowStore.create_or_open(tmp, attrs["schema"], fields, attrs["num_rows"],
                                            attrs["shard_size"], attrs["provenance"])  # fmt: skip
            # created_by and whatever else the export held
            store.group.attrs.update(
                {k: v for k, v in attrs.items() if k not in ("schema_version", "fields")}
            )
            by_unit = {r.unit: r for r in records}
            for unit, shard in enumerate(store.shards()):
                with _h5_damage(path):
                    data = {name: h5[name][shard.start : shard.stop] for name in fields}
                for row, digest in by_unit[unit].done.items() if unit in by_unit else ():
                    if row_digest(data, row - shard.start) != digest:
                        raise StoreError(f"{path}: row {row} differs from its ledger record")
                for row in shard:
                    if row in done:
                        continue
                    holds = [name for name, f in fields.items()
                             if not np.all(data[name][row - shard.start] == f.fill)]  # fmt: skip
                    if holds:
                        raise StoreError(
                            f"{path}: row {row} holds data in {', '.join(holds)} but is not "
                            f"done (no ledger record has it): the export is damaged"
                        )
                store.write_rows(shard, data)
            ledger = Ledger(store.ledger_dir)
            for record in records:
                ledger.write(record)
            with _h5_damage(path):
                text = h5["manifest/csv"].asstr()[()]
            keep_manifest(tmp, text.encode(), attrs["provenance"].get(MANIFEST_SHA))
            if manifest_out is not None:
                Path(manifest_out).write_text(text)
            os.rename(tmp, out)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return out


@contextmanager
def _h5_damage(path: Path) -> Iterator[None]:
    """HDF5's errors reading the export `path` (a valid header over damaged insides: B-trees,
    heaps, compressed chunks) as one StoreError naming it: a rerun cannot mend the file."""
    try:
        yield
    except (OSError, RuntimeError, KeyError) as error:
        raise StoreError(
            f"{path}: the HDF5 file is damaged ({' '.join(str(error).split())}); export the "
            f"store again"
        ) from None


def _h5_attributes(h5, path: Path) -> tuple[dict, dict[str, Field]]:
    """The store attributes of an export, checked, and its fields (each array's shape)."""
    attrs = {key: h5.attrs[key] for key in h5.attrs}
    missing = [f"/{k}" for k in H5_EXTRAS if k not in h5]
    if "tats_json_attributes" not in attrs:
        missing.insert(0, "the attribute tats_json_attributes")
    if missing:
        raise StoreError(f"{path}: not a tats-extract export: no {', '.join(missing)}")
    nested = _json_attribute(attrs.pop("tats_json_attributes"), "tats_json_attributes", path)
    attrs = {
        k: _json_attribute(v, k, path) if k in nested else _native(v) for k, v in attrs.items()
    }
    if attrs.get("schema") not in (TRACKS, FEATURES):
        raise StoreError(f"{path}: holds no tats store (schema {attrs.get('schema')!r})")
    if attrs.get("schema_version") not in READABLE_VERSIONS:
        raise StoreError(
            f"{path}: schema version {attrs.get('schema_version')}, this tats reads versions "
            f"{', '.join(map(str, READABLE_VERSIONS))}"
        )
    for key, least in (("num_rows", 0), ("shard_size", 1)):
        value = attrs.get(key)
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise StoreError(
                f"{path}: attribute {key} is {value!r}, expected a whole number of rows of at "
                f"least {least}: the export is damaged"
            )
    if not isinstance(attrs.get("provenance"), dict) or not isinstance(attrs.get("fields"), dict):
        raise StoreError(f"{path}: attributes provenance and fields must be tables: damaged")
    try:
        fields = {name: Field.from_spec(spec) for name, spec in attrs["fields"].items()}
    except (KeyError, TypeError) as error:
        raise StoreError(f"{path}: attribute fields is damaged ({error!r})") from None
    for name, f in fields.items():
        shape = (attrs["num_rows"], *f.shape)
        if name not in h5 or h5[name].shape != shape:
            found = f"shape {h5[name].shape}" if name in h5 else "no such dataset"
            raise StoreError(
                f"{path}: dataset {name!r} should have shape {shape}, found {found}: "
                f"the export is damaged"
            )
    return attrs, fields


def _json_attribute(text, key: str, path: Path):
    try:
        return json.loads(text)
    except (TypeError, ValueError) as error:
        problem = error.msg if isinstance(error, json.JSONDecodeError) else str(error)
        raise StoreError(f"{path}: attribute {key} is not valid JSON ({problem})") from None


def _h5_ledger(h5, path: Path, attrs: dict) -> tuple[list[UnitRecord], set[int]]:
    """The export's ledger records and the rows they record done, checked: each record for a
    unit of the store and rows of that unit, and /done marking exactly those rows."""
    num_rows, shard_size = attrs["num_rows"], attrs["shard_size"]
    records = []
    for i, text in enumerate(h5["ledger"].asstr()[...]):
        try:
            records.append(UnitRecord.from_json(text))
        except (TypeError, ValueError, KeyError) as error:
            raise StoreError(
                f"{path}: /ledger entry {i} is not a ledger record ({error!r})"
            ) from None
    units = -(-num_rows // shard_size)
    for record in records:
        first = record.unit * shard_size
        rows = range(first, min(first + shard_size, num_rows))
        if not 0 <= record.unit < units or any(row not in rows for row in record.done):
            raise StoreError(
                f"{path}: /ledger has a record of unit {record.unit} with rows outside it "
                f"(the store has {units} units of {shard_size} rows): the export is damaged"
            )
    marked = h5["done"][...]
    if marked.shape != (num_rows,):
        raise StoreError(f"{path}: /done has shape {marked.shape}, expected ({num_rows},)")
    marked = set(np.flatnonzero(marked).tolist())
    recorded = {row for r in records for row in r.done}
    if marked != recorded:
        extra, lost = sorted(marked - recorded), sorted(recorded - marked)
        what = (f"row {extra[0]} is done in /done but in no ledger record" if extra
                else f"row {lost[0]} is done in the ledger but not in /done")  # fmt: skip
        raise StoreError(
            f"{path}: /done marks {len(marked)} rows done, the ledger records {len(recorded)} "
            f"({what}): the export is damaged"
        )
    return records, recorded


def check_new_path(out: Path) -> None:
    """`out` (a file or folder to be made) must lie in a folder: ValueError where a file
    stands in its way (out = file.h5/sub.zarr), before any work."""
    for parent in out.absolute().parents:
        if parent.exists():
            if not parent.is_dir():
                raise ValueError(f"{out}: {parent} is a file, not a folder")
            return


def _native(value):
    """HDF5 scalars as JSON-native Python values."""
    return value.item() if isinstance(value, np.generic) else value


def export_npz(store_path: str | Path, manifest: Manifest, out: str | Path) -> list[Path]:
    """One `<video_id>.npz` per done row in the folder `out` (its arrays, and `row`,
    `video_id`, `label`, `split`), with `attributes.json` (the store's) and a copy of the
    manifest. Characters other than letters, digits, `.`, `_` and `-` in ids become `_`."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out}: a file; the NPZ export is a folder of files: give a folder")
    check_new_path(out)
    store = _open_for_export(store_path, manifest)
    out.mkdir(parents=True, exist_ok=True)
    (out / "attributes.json").write_text(json.dumps(store.attrs, indent=1) + "\n")
    shutil.copyfile(manifest.path, out / manifest.path.name)
    written, used = [], set()
    for row in done_rows(store).tolist():
        video = manifest.rows[row]
        name = re.sub(r"[^\w.-]", "_", video.video_id)
        if name in used:
            name = f"{name}-row{row}"
        used.add(name)
        path = out / f"{name}.npz"
        labels = dict(video_id=video.video_id, label=video.label, split=video.split)
        np.savez_compressed(path, **store.read_row(row), row=np.int64(row), **labels)
        written.append(path)
    return written
