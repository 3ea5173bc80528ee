"""The two Zarr v3 stores that stage one writes and training reads.

Every array's first axis is the row of the dataset manifest, and a shard holds `shard_size`
videos: one file per array per shard, named `c.<shard>.0...` beside the array's zarr.json (the
"." chunk-key separator: no folder per shard). In the large arrays a chunk holds one video (a
reader of one clip decodes only that); the small per-row arrays are one chunk per shard, so
reading one of them for every row decodes one chunk per shard (`RowStore.read_field`).
Writers write whole shards only: Zarr rewrites a shard file on every write into it, and writes
it atomically (a temporary `*.partial` file, then a rename; Zarr 3.1.3 and later), so a shard
on disk is always either its old or its new self. After a shard is written its files and
folders are fsynced, before the unit's ledger record.

The ledger and leases folders live inside the store; the group's consolidated metadata lists
its arrays, so zarr lists the arrays without looking at (and warning about) those folders.
Stores of schema version 2 (before: "/" chunk keys, a folder per shard, every chunk one row)
are read and resumed as they are.

A store is created once for a (manifest, stage config) pair, with fixed shapes, and the pair
is recorded in its attributes; opening it for writing with anything else is an error that
names the difference. The store keeps a copy of its manifest file (`manifest.csv`), so that a
manifest changed since is refused naming its first changed row, not by hashes alone.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import shutil
import time
import uuid
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from zarr.codecs import ZstdCodec
from zarr.errors import ZarrUserWarning

import tats

SCHEMA_VERSION = 3
READABLE_VERSIONS = (2, 3)  # 2: folders per shard, one row per chunk in every array
CHUNK_KEYS = {"name": "default", "separator": "."}
# Zarr writes shard files atomically (temporary file, then rename) from 3.1.3 on; before, a kill
# or a full disk mid-write left a truncated shard that read back as fill values, silently.
ZARR_ATOMIC_WRITES = (3, 1, 3)


def _zarr_version() -> tuple[int, ...]:
    parts = []
    for part in zarr.__version__.split(".")[:3]:
        digits = "".join(c for c in part if c.isdigit()) or "0"
        parts.append(int(digits))
    return tuple(parts)


if _zarr_version() < ZARR_ATOMIC_WRITES:
    raise ImportError(
        f"tats needs zarr >= 3.1.3 (atomic shard writes), found {zarr.__version__}: "
        "pip install -U 'zarr>=3.1.3'"
    )
TRACKS = "tats.tracks"
FEATURES = "tats.features"
NUM_FRAMES = "num_frames"  # > 0 marks a row that holds data: written last (`write_rows`)
MANIFEST_COPY = "manifest.csv"  # the manifest file a store was made for, byte for byte


class StoreError(ValueError):
    """A store that is missing, of another kind, or made for another manifest or config."""


@dataclass(frozen=True)
class Field:
    """One array of a store: its shape and dtype per row, and its value in unwritten rows.

    A chunk holds one row, or the first `split` axes of a row go one index per chunk (a
    features chunk is one view of one video, so a reader of one view decodes only that), or,
    `per_shard`, the whole shard (small per-row fields, read for many rows at once).
    """

    shape: tuple[int, ...]
    dtype: str
    fill: Any = 0
    split: int = 0
    per_shard: bool = False

    @property
    def chunk(self) -> tuple[int, ...]:
        return (1,) * self.split + self.shape[self.split :]

    def spec(self) -> dict:
        """As recorded in a store's attributes."""
        return {"shape": list(self.shape), "dtype": self.dtype, "fill": self.fill,
                "split": self.split, "per_shard": self.per_shard}  # fmt: skip

    @classmethod
    def from_spec(cls, spec: dict) -> Field:
        return cls(tuple(spec["shape"]), spec["dtype"], spec["fill"], spec["split"],
                   spec.get("per_shard", False))  # fmt: skip


def tracks_fields(frames: int, points: int, subset: int) -> dict[str, Field]:
    """tracks.zarr: `frames` stored frames, room for `points` kept points, a `subset` of them."""
    return {
        # (x, y) in pixels of the decoded frame, at the stored frames.
        "positions": Field((frames, points, 2), "float32"),
        "visible": Field((frames, points), "bool", False),
        # True for the points the redundancy filter kept; they come first, padding after.
        "valid": Field((points,), "bool", False, per_shard=True),
        "query_frame": Field((points,), "int32", -1, per_shard=True),
        # Semantic queries: each point's cluster (0 = the largest); -1 for grid queries.
        "cluster": Field((points,), "int32", -1, per_shard=True),
        # Indices into the point axis, in draw order; -1 pads clips with fewer points.
        "subset": Field((subset,), "int32", -1, per_shard=True),
        "frames": Field((frames,), "int32", -1, per_shard=True),
        # Frames on the track time base; 0 marks a row that holds no data.
        "num_frames": Field((), "int32", 0, per_shard=True),
        "frame_size": Field((2,), "int32", 0, per_shard=True),
    }


def features_fields(views: int, frames: int, grid: int, dim: int) -> dict[str, Field]:
    """features.zarr: patch grids of `views` views of the stored frames."""
    return {
        "features": Field((views, frames, grid, grid, dim), "float16", split=1),
        "frames": Field((frames,), "int32", -1, per_shard=True),
        "num_frames": Field((), "int32", 0, per_shard=True),
        "view_seed": Field((views,), "int64", -1, per_shard=True),
    }


def current_layout(schema: str, fields: dict[str, Field]) -> dict[str, Field]:
    """`fields` of a `schema` store of an earlier version (2: every chunk one row), laid out as
    this version lays them out: the same shapes, types and values."""
    current = tracks_fields(1, 1, 1) if schema == TRACKS else features_fields(1, 1, 1, 1)
    return {
        name: replace(f, per_shard=current[name].per_shard) if name in current else f
        for name, f in fields.items()
    }


class RowStore:
    """A Zarr group of arrays with one row per manifest video, written a shard at a time."""

    def __init__(self, path: Path, group: zarr.Group):
        self.path = path
        self.group = group
        self.attrs: dict = dict(group.attrs)
        self.schema: str = self.attrs["schema"]
        self.num_rows: int = self.attrs["num_rows"]
        self.shard_size: int = self.attrs["shard_size"]
        self.version: int = self.attrs["schema_version"]
        self.fields: dict[str, Field] = {
            name: Field.from_spec(spec) for name, spec in self.attrs["fields"].items()
        }
        self._arrays = {name: group[name] for name in self.fields}

    @classmethod
    def open(cls, path: str | Path, schema: str | None = None, writable: bool = False) -> RowStore:
        """Open an existing store for reading (or, `writable`, for writing its rows)."""
        path = Path(path)
        if not (path / "zarr.json").is_file():
            raise StoreError(f"{path}: not a tats store (no zarr.json)")
        with _metadata(path / "zarr.json"):
            group = zarr.open_group(str(path), mode="r+" if writable else "r")
        found = group.attrs.get("schema")
        if found not in (TRACKS, FEATURES):
            raise StoreError(f"{path}: not a tats store (schema {found!r})")
        if schema is not None and found != schema:
            raise StoreError(f"{path}: holds {found}, not {schema}")
        if group.attrs.get("schema_version") not in READABLE_VERSIONS:
            raise StoreError(
                f"{path}: schema version {group.attrs.get('schema_version')}, "
                f"this tats reads versions {', '.join(map(str, READABLE_VERSIONS))}"
            )
        with _metadata(path / "zarr.json"):
            store = cls(path, group)
        # The arrays open from the group's consolidated metadata; their own zarr.json files
        # are what any other Zarr reader opens: a damaged one is named here, not left to it.
        for name in store.fields:
            with _metadata(path / name / "zarr.json"):
                json.loads((path / name / "zarr.json").read_text())
        return store

    @classmethod
    def create_or_open(
        cls,
        path: str | Path,
        schema: str,
        fields: dict[str, Field],
        num_rows: int,
        shard_size: int,
        provenance: dict,
        manifest: Path | None = None,
    ) -> RowStore:
        """Open the store at `path` if it was made for `provenance`, else create it (with a
        copy of the `manifest` file, whose SHA-256 `provenance` holds).

        `provenance` (manifest digest, stage config, tracker or backbone identity) must equal
        the one recorded in an existing store. Creation is race-free: the store is built in a
        temporary folder and renamed into place, and a process that loses the race opens the
        winner's store and checks it like any other existing one.
        """
        path = Path(path)
        if not path.exists():
            cls._create(path, schema, fields, num_rows, shard_size, provenance, manifest)
        store = cls.open(path, schema, writable=True)
        problems = _differences(store.attrs["provenance"], _jsonable(provenance))
        if manifest is not None and store.provenance.get(MANIFEST_SHA) != provenance.get(
            MANIFEST_SHA
        ):
            problems = [p for p in problems if not p.startswith(f"{MANIFEST_SHA}:")]
            change = manifest_change(store, manifest, provenance[MANIFEST_SHA])
            problems.insert(0, f"another manifest than {manifest}: {change}")
        if problems:
            raise StoreError(
                f"{path} was made for another input; "
                + "; ".join(problems)
                + ". Use a new --out, or delete the store to start over."
            )
        return store

    @staticmethod
    def _create(path, schema, fields, num_rows, shard_size, provenance, manifest) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.parent / f".{path.name}.creating-{uuid.uuid4().hex[:12]}"
        group = zarr.open_group(str(tmp), mode="w-")
        for name, field in fields.items():
            whole = (shard_size, *field.shape)
            group.create_array(
                name,
                shape=(num_rows, *field.shape),
                chunks=whole if field.per_shard else (1, *field.chunk),
                shards=None if field.per_shard else whole,
                dtype=field.dtype,
                fill_value=field.fill,
                compressors=ZstdCodec(level=3),
                chunk_key_encoding=CHUNK_KEYS,
            )
        group.attrs.update(
            {
                "schema": schema,
                "schema_version": SCHEMA_VERSION,
                "num_rows": num_rows,
                "shard_size": shard_size,
                "fields": {name: f.spec() for name, f in fields.items()},
                "provenance": _jsonable(provenance),
                "created_by": f"tats {tats.__version__}",
            }
        )
        with warnings.catch_warnings():  # "not part of the Zarr 3 specification (yet)"
            warnings.simplefilter("ignore", ZarrUserWarning)
            zarr.consolidate_metadata(str(tmp))
        (tmp / "ledger").mkdir()
        if manifest is not None:
            keep_manifest(tmp, Path(manifest).read_bytes(), provenance.get(MANIFEST_SHA))
        try:
            os.rename(tmp, path)
        except OSError:
            # Another process created the store first: use theirs.
            shutil.rmtree(tmp, ignore_errors=True)
            if not path.exists():
                raise

    @property
    def provenance(self) -> dict:
        return self.attrs["provenance"]

    @property
    def ledger_dir(self) -> Path:
        return self.path / "ledger"

    @property
    def lease_dir(self) -> Path:
        return self.path / "leases"

    def shards(self) -> list[range]:
        """Row ranges of the shards, in order: the work units of stage one."""
        return [
            range(start, min(start + self.shard_size, self.num_rows))
            for start in range(0, self.num_rows, self.shard_size)
        ]

    def read_row(self, row: int, names: tuple[str, ...] | None = None) -> dict[str, np.ndarray]:
        """One video's arrays. Reads chunk by chunk: fancy-indexing many rows is very slow."""
        return {name: self._arrays[name][row] for name in names or self.fields}

    def read_rows(self, rows: range) -> dict[str, np.ndarray]:
        """A contiguous slice of rows (a shard), for rewriting it."""
        return {name: arr[rows.start : rows.stop] for name, arr in self._arrays.items()}

    def read_field(self, name: str, rows: range | None = None) -> np.ndarray:
        """One field for `rows` (default: all), read a block of whole shards at a time: a
        per-shard field (num_frames, frames, frame_size, subset, ...) costs one chunk decode
        per shard, whatever the row count (a version-2 store: one per row)."""
        rows = range(self.num_rows) if rows is None else rows
        field, array = self.fields[name], self._arrays[name]
        out = np.empty((len(rows), *field.shape), dtype=field.dtype)
        row_bytes = max(1, int(np.prod(field.shape, dtype=np.int64)) * out.itemsize)
        block = self.shard_size * max(1, (32 << 20) // (row_bytes * self.shard_size))
        start = rows.start
        while start < rows.stop:
            stop = min((start // block + 1) * block, rows.stop)
            out[start - rows.start : stop - rows.start] = array[start:stop]
            start = stop
        return out

    def empty_rows(self, count: int) -> dict[str, np.ndarray]:
        """Buffers for `count` rows, filled with every field's fill value."""
        return {
            name: np.full((count, *f.shape), f.fill, dtype=f.dtype)
            for name, f in self.fields.items()
        }

    def write_rows(self, rows: range, data: dict[str, np.ndarray]) -> None:
        """Write whole shards: `rows` must start on a shard boundary and cover whole shards.

        `num_frames` goes last, so that a reader of the store mid-write never sees a row's
        num_frames set before its other arrays ("num_frames 0: not written" holds); a row it
        clears (a retry's row that a killed attempt had written) is cleared there first."""
        if rows.start % self.shard_size or (
            rows.stop != self.num_rows and rows.stop % self.shard_size
        ):
            raise ValueError(f"rows {rows.start}..{rows.stop} do not cover whole shards")
        last = self._arrays.get(NUM_FRAMES)
        if last is not None:
            now = last[rows.start : rows.stop]
            cleared = (now > 0) & (data[NUM_FRAMES] <= 0)
            if cleared.any():
                last[rows.start : rows.stop] = np.where(cleared, data[NUM_FRAMES], now)
        for name, arr in self._arrays.items():
            if arr is not last:
                arr[rows.start : rows.stop] = data[name]
        if last is not None:
            last[rows.start : rows.stop] = data[NUM_FRAMES]

    def sync_rows(self, rows: range) -> None:
        """fsync the shard files of `rows` (whole shards) and their folders, so that they are
        on disk before anything that says they are (the ledger record)."""
        for shard in range(rows.start // self.shard_size, -(-rows.stop // self.shard_size)):
            for name, field in self.fields.items():
                array_dir = self.path / name
                key = (shard,) + (0,) * len(field.shape)
                path = array_dir / self._arrays[name].metadata.encode_chunk_key(key)
                if path.exists():  # Zarr deletes the file of a shard that holds only fill
                    fsync(path)
                folder = path.parent
                while True:
                    if folder.exists():
                        fsync(folder)
                    if folder == array_dir:
                        break
                    folder = folder.parent

    def remove_debris(self, older_than: float) -> list[Path]:
        """Delete what killed writers left behind (Zarr's `*.partial` files, temporary ledger
        records, half-made stores beside this one; the leases' own debris is
        `UnitLeases.sweep`'s) once it is `older_than` seconds old, so that no live writer's
        file is touched. Returns what was removed."""
        candidates = [p for name in self.fields for p in _partials(self.path / name)]
        candidates += list(self.ledger_dir.glob(".unit-*.tmp"))
        candidates += list(self.path.parent.glob(f".{self.path.name}.creating-*"))
        return remove_old(candidates, older_than)


@contextmanager
def _metadata(path: Path) -> Iterator[None]:
    """Errors reading a store's metadata as one StoreError naming the file `path`."""
    try:
        yield
    except (ValueError, KeyError, TypeError, AttributeError, FileNotFoundError) as error:
        if isinstance(error, StoreError):
            raise
        problem = error.msg if isinstance(error, json.JSONDecodeError) else repr(error)
        raise StoreError(
            f"{path}: damaged store metadata ({problem}); it is written once, when the store "
            f"is made: restore it from a copy of the store, or extract into a new --out"
        ) from None


MANIFEST_SHA = "manifest_sha256"  # the provenance key of the manifest file's SHA-256


def keep_manifest(store_dir: Path, data: bytes, sha256: str | None) -> None:
    """Keep `data`, the manifest file a store in `store_dir` is made for, in the store; not if
    its SHA-256 is not `sha256` (the file changed since it was read)."""
    if hashlib.sha256(data).hexdigest() == sha256:
        (Path(store_dir) / MANIFEST_COPY).write_bytes(data)


def manifest_change(store: RowStore, manifest: Path, sha256: str) -> str:
    """How the manifest file `manifest` (of SHA-256 `sha256`) differs from the one `store` was
    made for: its first row that differs, column by column, from the store's copy."""
    made_for = str(store.provenance.get(MANIFEST_SHA))
    try:
        kept = (store.path / MANIFEST_COPY).read_bytes()
    except FileNotFoundError:
        kept = None
    if kept is None or hashlib.sha256(kept).hexdigest() != made_for:
        return (
            f"SHA-256 {sha256[:12]}..., the store's {made_for[:12]}... (the store keeps no copy "
            f"of its manifest to name the rows that differ: made by an older tats)"
        )
    ours, theirs = _csv_rows(Path(manifest).read_bytes()), _csv_rows(kept)
    for row, (a, b) in enumerate(zip(ours, theirs, strict=False)):
        if a != b:
            changes = "; ".join(
                f"{name} {a.get(name)!r} here, {b.get(name)!r} in the store's"
                for name in dict.fromkeys([*a, *b]) if a.get(name) != b.get(name)
            )  # fmt: skip
            return f"row {row} ({b.get('video_id', a.get('video_id'))}) differs: {changes}"
    if len(ours) != len(theirs):
        return f"{len(ours)} rows, the store's manifest has {len(theirs)}"
    return "the same rows in other bytes (quoting, spaces, line ends or column order differ)"


def check_manifest(store: RowStore, manifest) -> None:
    """StoreError naming the first changed row unless `store` was made for `manifest` (a
    `tats.manifest.Manifest`)."""
    if store.provenance.get(MANIFEST_SHA) != manifest.sha256:
        change = manifest_change(store, manifest.path, manifest.sha256)
        raise StoreError(f"{store.path} was made for another manifest than {manifest.path}: "
                         f"{change}")  # fmt: skip


def _csv_rows(data: bytes) -> list[dict[str, str]]:
    """A manifest's records, as `tats.manifest` reads them: the header's columns, values
    stripped, empty records skipped."""
    reader = csv.reader(io.StringIO(data.decode("utf-8-sig", errors="replace"), newline=""))
    header = [name.strip() for name in next(reader, [])]
    return [
        dict(zip(header, (value.strip() for value in record), strict=False))
        for record in reader
        if "".join(record).strip()
    ]


def remove_old(paths: list[Path], older_than: float) -> list[Path]:
    """Delete those of `paths` (files or folders) last changed `older_than` seconds ago or
    before; returns them."""
    now, removed = time.time(), []
    for path in paths:
        try:
            if now - path.lstat().st_mtime < older_than:
                continue
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink()
            removed.append(path)
        except FileNotFoundError:
            pass  # removed by another worker meanwhile
    return removed


def _partials(array_dir: Path) -> list[Path]:
    """Zarr's temporary files in an array's folder: one folder read for a store of version 3
    (shard files lie in the array's folder); the whole tree below it where there are folders
    (version 2, or debris in them)."""
    found = []
    try:
        entries = list(os.scandir(array_dir))
    except FileNotFoundError:
        return found
    for entry in entries:
        if entry.name.endswith(".partial"):
            found.append(Path(entry.path))
        elif entry.is_dir(follow_symlinks=False):
            found += Path(entry.path).rglob("*.partial")
    return found


def fsync(path: Path) -> None:
    """Flush a file, or a folder's entries (files created or renamed in it), to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:
        if not path.is_dir():  # some file systems cannot fsync a folder: nothing more to do
            raise
    finally:
        os.close(fd)


def row_digest(data: dict[str, np.ndarray], index: int | None = None) -> str:
    """A digest of one row's arrays (row `index` of shard buffers, or a single row's arrays)."""
    h = hashlib.blake2b(digest_size=16)
    for name in sorted(data):
        value = data[name] if index is None else data[name][index]
        h.update(name.encode())
        h.update(np.ascontiguousarray(value).tobytes())
    return h.hexdigest()


def row_problem(schema: str, data: dict[str, np.ndarray]) -> str | None:
    """Why a written row cannot be right (None when it looks sound)."""
    if int(data["num_frames"]) <= 0:
        return "no frames recorded"
    frames = data["frames"]
    if (frames < 0).any() or (frames >= data["num_frames"]).any():
        return "stored frame index outside the clip"
    if schema == FEATURES:
        if not np.isfinite(data["features"]).all():
            return "non-finite features"
        return None
    valid, visible, positions = data["valid"], data["visible"], data["positions"]
    n = int(valid.sum())
    if not valid[:n].all():
        return "kept points are not packed at the front"
    if not np.isfinite(positions[:, valid]).all():
        return "non-finite track positions"
    height, width = data["frame_size"]
    if height <= 0 or width <= 0:
        return "no frame size recorded"
    x, y = positions[..., 0], positions[..., 1]
    outside = (x < 0) | (x > width - 1) | (y < 0) | (y > height - 1)
    if (visible & outside).any():
        return "a visible point lies outside the frame"
    if (visible & ~valid[None]).any():
        return "a padding point is marked visible"
    cluster = data.get("cluster")
    if cluster is not None:
        labelled = cluster[valid] >= 0
        if (cluster[~valid] != -1).any() or (labelled.any() and not labelled.all()):
            return "cluster ids on padding points, or on some kept points only"
    subset = data["subset"]
    drawn = subset[subset >= 0]
    if (drawn >= n).any():
        return "subset indices out of range"
    # Cluster samples repeat points where a clip has few (Trokens' fill); grid subsets do not.
    if (cluster is None or (cluster[:n] < 0).all()) and len(np.unique(drawn)) != len(drawn):
        return "subset indices repeated"
    return None


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value))


def _differences(stored: dict, wanted: dict, prefix: str = "") -> list[str]:
    problems = []
    for key in sorted(set(stored) | set(wanted)):
        a, b = stored.get(key), wanted.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            problems += _differences(a, b, f"{prefix}{key}.")
        elif key not in stored and b is not None:
            # A setting added after the store was made; None reproduces the older behaviour.
            problems.append(
                f"{prefix}{key}: not recorded (the store was made by an older tats), this run "
                f"has {b!r}; turned off (as --max-side 0) it resumes the store as it was made"
            )
        elif a != b:
            problems.append(f"{prefix}{key}: store has {a!r}, this run has {b!r}")
    return problems
