"""Synthetic stores of any size for the scale benchmarks: one shard written for real (through
`RowStore.write_rows`), its files hard-linked at every done unit's shard position, a ledger
record for each done unit (`Ledger.write`), and a manifest of N rows. Costs no disk beyond one
shard, and reads exactly as a store extraction made: a trainer, `status` or `verify` sees the
same files, chunks and records.

Runs under whichever tats is importable, so that the layout of another commit can be built with
its own code (PYTHONPATH=<its checkout>):

    python benchmarks/linked_stores.py OUT --rows 1000000 --done 0.01
    # OUT/manifest.csv, OUT/tracks.zarr, OUT/features.zarr
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
from pathlib import Path

import numpy as np

from tats.pipeline.ledger import Ledger, UnitRecord
from tats.stores import FEATURES, TRACKS, RowStore, features_fields, row_digest, tracks_fields

CLASSES = 700  # Kinetics-700-like: 500 train, 50 val, 150 test classes
FRAMES, POINTS, SUBSET = 8, 256, 256  # tracks: stored frames, kept points, subset
VIEWS, GRID, DIM = 1, 8, 64  # features: small, start-up never reads them
_SHARD = re.compile(r"^c([./])0(?=$|[./])")  # the shard index of a chunk key, shard 0


def write_manifest(path: Path, rows: int) -> str:
    """A manifest of `rows` videos (class = row mod 700, splits by class); its SHA-256."""
    lines = ["video_id,path,label,split"]
    for i in range(rows):
        c = i % CLASSES
        split = "train" if c < 500 else "val" if c < 550 else "test"
        video = f"{i * 2654435761 % (1 << 40):010x}_{i:07d}"
        lines.append(f"{video},{split}/class {c:03d}/{video}.mp4,class {c:03d},{split}")
    data = ("\n".join(lines) + "\n").encode()
    path.write_bytes(data)
    return hashlib.sha256(data).hexdigest()


def done_units(units: int, fraction: float) -> list[int]:
    """Units spread evenly over the store (as many workers leave a partly done store)."""
    count = max(1, round(units * fraction))
    return sorted({int(u) for u in np.linspace(0, units - 1, count).round()})


def shard_data(store: RowStore, rows: range) -> dict[str, np.ndarray]:
    """One shard of plausible rows: every row sound by `stores.row_problem`."""
    rng = np.random.default_rng(0)
    data = store.empty_rows(len(rows))
    n = len(rows)
    data["num_frames"][:] = 40
    data["frames"][:] = np.linspace(0, 39, FRAMES).round().astype(np.int32)
    if store.schema == TRACKS:
        data["frame_size"][:] = (240, 320)
        data["positions"][:] = rng.uniform(0, 239, (n, FRAMES, POINTS, 2))
        data["visible"][:] = True
        data["valid"][:] = True
        data["query_frame"][:] = 0
        data["subset"][:] = np.arange(SUBSET)
    else:
        data["features"][:] = rng.standard_normal(data["features"].shape).astype(np.float16)
        data["view_seed"][:] = np.arange(VIEWS)
    return data


def link_shard(store: RowStore, units: list[int]) -> None:
    """Hard-link shard 0's files of every array to the shard positions of `units`."""
    for name in store.fields:
        folder = store.path / name
        files = [p for p in folder.rglob("*") if p.is_file() and p.name != "zarr.json"]
        for source in files:
            key = source.relative_to(folder).as_posix()
            for unit in units:
                target = folder / _SHARD.sub(lambda m, u=unit: f"c{m.group(1)}{u}", key)
                if target != source:
                    target.parent.mkdir(parents=True, exist_ok=True)
                    os.link(source, target)


def build_store(path: Path, schema: str, sha256: str, rows: int, units: list[int],
                shard_size: int = 64) -> None:  # fmt: skip
    """A store of `rows` rows for the manifest `sha256`, `units` done."""
    if schema == TRACKS:
        fields = tracks_fields(FRAMES, POINTS, SUBSET)
    else:
        fields = features_fields(VIEWS, FRAMES, GRID, DIM)
    provenance = {"manifest_sha256": sha256, "config": {"queries": "grid", "bench": "linked"}}
    store = RowStore.create_or_open(path, schema, fields, rows, shard_size, provenance)
    first = range(0, min(shard_size, rows))
    data = shard_data(store, first)
    store.write_rows(first, data)
    digests = {i: row_digest(data, i) for i in range(len(first))}
    link_shard(store, [u for u in units if u != 0])
    ledger = Ledger(store.ledger_dir)
    for unit in units:
        unit_rows = range(unit * shard_size, min((unit + 1) * shard_size, rows))
        done = {r: digests[i] for i, r in enumerate(unit_rows)}
        ledger.write(UnitRecord(unit, (unit_rows.start, unit_rows.stop), done, []))


def build(out: Path, rows: int, done: float, shard_size: int = 64) -> None:
    """OUT/manifest.csv and its two stores, a `done` fraction of their units done."""
    out.mkdir(parents=True, exist_ok=True)
    sha256 = write_manifest(out / "manifest.csv", rows)
    units = done_units(-(-rows // shard_size), done)
    for name, schema in (("tracks", TRACKS), ("features", FEATURES)):
        build_store(out / f"{name}.zarr", schema, sha256, rows, units, shard_size)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--rows", type=int, required=True)
    parser.add_argument("--done", type=float, default=1.0, help="fraction of units done")
    parser.add_argument("--shard-size", type=int, default=64)
    args = parser.parse_args()
    build(args.out, args.rows, args.done, args.shard_size)
