"""The readers' cases of benchmarks/bench_scale.py (issue 19): what stores and manifests of a
million videos cost the trainer, evaluation and `tats predict`.

    nice -n 10 .venv/bin/python benchmarks/bench_scale.py --only startup --only manifest \\
        --only prototypes --out benchmarks/results/scale-readers.json

- startup: `EpisodeData.open` (the manifest, both ledgers, the per-row metadata: frames,
  frame sizes, frame counts) and every split's classes, as the trainer, evaluation and
  `tats predict` start. Stores built by benchmarks/linked_stores.py (one real shard
  hard-linked at every done unit, a ledger record per done unit): all units done up to 100k
  rows, 1% of them (spread over the store) at 1M. Before: up to 10k rows (it decodes a chunk
  per row of five whole arrays, 5 x rows in all: 100k rows take about 25 min here).
- manifest: `read_manifest` of N rows: seconds and the process's peak memory above its imports.
- prototypes: `predict.match` with 100 and 1,000 support clips in one class (random weights of
  a small model: 64-dim tokens of 8 frames x 256 points, 0.5 MB a clip).

Peak memory is the probe process's ru_maxrss; chunk decodes and store reads are counted by
wrappers on zarr's Zstd codec and local store; CPU seconds beside wall seconds, as the machine
here is shared.
"""

from __future__ import annotations

import resource
import time
from pathlib import Path

STARTUP_BEFORE_MAX_ROWS = 10_000
SUPPORT_CLIPS = (100, 1000)


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _count_reads() -> dict[str, int]:
    """Zstd chunk decodes and store reads from now on (wrappers on zarr's own classes)."""
    from zarr.codecs import ZstdCodec
    from zarr.storage import LocalStore

    counts = {"chunk_decodes": 0, "store_reads": 0}
    decode, get = ZstdCodec._decode_sync, LocalStore.get

    def counted_decode(self, *args, **kwargs):
        counts["chunk_decodes"] += 1
        return decode(self, *args, **kwargs)

    async def counted_get(self, *args, **kwargs):
        counts["store_reads"] += 1
        return await get(self, *args, **kwargs)

    ZstdCodec._decode_sync, LocalStore.get = counted_decode, counted_get
    return counts


class _Clock:
    def __init__(self) -> None:
        self.wall, self.cpu = time.perf_counter(), time.process_time()

    def lap(self) -> dict[str, float]:
        wall, cpu = time.perf_counter(), time.process_time()
        lap = {"seconds": round(wall - self.wall, 2), "cpu_seconds": round(cpu - self.cpu, 2)}
        self.wall, self.cpu = wall, cpu
        return lap


# ----------------------------------------------------------------------------- probes
# Run in subprocesses under either code (old or new tats); they use only APIs both have.


def probe_linked(folder: str, rows: int, done: float) -> dict:
    """Manifest and both stores of `rows` rows, `done` of their units done (linked_stores)."""
    import linked_stores

    clock = _Clock()
    linked_stores.build(Path(folder), rows, done)
    return {"rows": rows, "done": done, "build_seconds": clock.lap()["seconds"]}


def probe_startup(folder: str) -> dict:
    """The trainer's start-up: the manifest, EpisodeData.open, every split's classes."""
    import warnings

    import tats.episodes as episodes
    from tats.manifest import read_manifest
    from tats.stores import StoreError

    warnings.simplefilter("ignore")  # classes with too few done rows
    folder = Path(folder)
    counts = _count_reads()
    ledgers = {"seconds": 0.0}
    done_rows = episodes.done_rows

    def timed_done_rows(store):
        tic = time.perf_counter()
        try:
            return done_rows(store)
        finally:
            ledgers["seconds"] += time.perf_counter() - tic

    episodes.done_rows = timed_done_rows
    rss_imports = _rss_mb()
    clock, total = _Clock(), _Clock()
    manifest = read_manifest(folder / "manifest.csv")
    parts = {"manifest": clock.lap()}
    data = episodes.EpisodeData.open(folder / "tracks.zarr", folder / "features.zarr", manifest)
    parts["open_stores"] = clock.lap() | {"of_which_ledgers_s": round(ledgers["seconds"], 2)}
    drawable = {}
    for split in ("train", "val", "test"):
        try:
            drawable[split] = len(data.classes(split, 2, 2).drawable)
        except StoreError:
            drawable[split] = 0
    parts["classes"] = clock.lap()
    return {
        "rows": len(manifest.rows), "usable_rows": len(data.usable), **total.lap(),
        "peak_rss_mb": round(_rss_mb()), "rss_after_imports_mb": round(rss_imports),
        **counts, "parts": parts, "drawable_classes": drawable,
    }  # fmt: skip


def probe_manifest(path: str) -> dict:
    """read_manifest: time, and the process's peak memory above what its imports took."""
    from tats.manifest import read_manifest

    rss_imports = _rss_mb()
    clock = _Clock()
    manifest = read_manifest(path)
    lap = clock.lap()
    peak = _rss_mb()
    return {"rows": len(manifest.rows), **lap, "peak_rss_mb": round(peak),
            "read_mb": round(peak - rss_imports)}  # fmt: skip


def probe_prototypes(folder: str, clips: int) -> dict:
    """predict.match with `clips` support clips of one class and 4 queries."""
    import warnings

    import torch

    from tats.episodes import EpisodeData, ReadOptions
    from tats.model import ModelConfig, TATsModel
    from tats.predict import match
    from tats.runtime import Runtime

    warnings.simplefilter("ignore")
    torch.manual_seed(0)
    torch.set_num_threads(1)
    folder = Path(folder)
    data = EpisodeData.open(folder / "tracks.zarr", folder / "features.zarr",
                            folder / "manifest.csv")  # fmt: skip
    model = TATsModel(ModelConfig(feature_dim=64, grid_size=8, num_heads=4)).eval()
    rt = Runtime.setup("cpu", "off", 0, 2)
    rows = data.usable.tolist()
    rss_before = _rss_mb()
    clock = _Clock()
    distances = match(model, data, [rows[:clips]], rows[clips : clips + 4], ReadOptions(), rt)
    lap = clock.lap()
    peak = _rss_mb()
    tokens = clips * data.num_frames * data.points * model.cfg.dim * 4
    return {
        "support_clips": clips, **lap, "peak_rss_mb": round(peak),
        "match_mb": round(peak - rss_before),
        "tokens_of_the_support_clips_mb": round(tokens / 2**20),
        "distances": [round(float(d), 4) for d in distances[:, 0]],
    }  # fmt: skip


PROBES = {
    "linked": probe_linked, "startup": probe_startup, "manifest": probe_manifest,
    "prototypes": probe_prototypes,
}  # fmt: skip


# ----------------------------------------------------------------------------- cases
# Functions of bench_scale.Context.


def _linked(ctx, code: str, rows: int, done: float) -> Path:
    folder = ctx.work / f"linked-{code}-{rows}-{done}"
    if not (folder / "built").exists():
        ctx.log(f"building {folder}")
        ctx.probe(code, "linked", str(folder), rows, done)
        (folder / "built").write_text("")
    return folder


def case_startup(ctx) -> list[dict]:
    results = []
    for rows in ctx.rows:
        done = 0.01 if rows >= 1_000_000 else 1.0
        for code in ctx.codes:
            if code == "before" and rows > STARTUP_BEFORE_MAX_ROWS:
                result = {"rows": rows, "not_run": f"decodes {5 * rows} chunks, one per row of "
                          "five arrays read whole: the 10k case x rows / 10k"}  # fmt: skip
            else:
                result = ctx.probe(code, "startup", str(_linked(ctx, code, rows, done)))
            result |= {"code": code, "done": done}
            ctx.log(f"startup {code} {rows}: {result}")
            results.append(result)
    return results


def case_manifest(ctx) -> list[dict]:
    results = []
    for rows in ctx.rows:
        for code in ctx.codes:
            folder = _linked(ctx, "after", rows, 0.01 if rows >= 1_000_000 else 1.0)
            result = ctx.probe(code, "manifest", str(folder / "manifest.csv")) | {"code": code}
            ctx.log(f"manifest {code} {rows}: {result}")
            results.append(result)
    return results


def case_prototypes(ctx) -> list[dict]:
    results = []
    for code in ctx.codes:
        folder = _linked(ctx, code, 2048, 1.0)
        for clips in SUPPORT_CLIPS:
            result = ctx.probe(code, "prototypes", str(folder), clips) | {"code": code}
            ctx.log(f"prototypes {code} {clips}: {result}")
            results.append(result)
    return results


CASES = {"startup": case_startup, "manifest": case_manifest, "prototypes": case_prototypes}
