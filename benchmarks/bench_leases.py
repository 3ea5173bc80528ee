"""What the cluster safety of stage one costs: unit leases, video stamps, fsyncs, debris scans.

    .venv/bin/python benchmarks/bench_leases.py [--out benchmarks/results/leases.json]

Runs `tats-extract tracks` (LK, 16 x 16 grids) and `tats-extract features` (`pixels`) over
the synthetic dataset, in one process each, and times every piece of bookkeeping inside the
run: lease claims, checks, releases and progress records (leases.py), the video stamps taken
while decoding and checked on resume (sources.py), the fsyncs of shards (stores.py) and the
debris scan. Reported: each as a share of the stage's wall time, measured in the same run.
Small shards (8 videos) make the per-unit costs as large as they get. Run on an idle machine.
"""

from __future__ import annotations

import argparse
import functools
import json
import platform
import shutil
import tempfile
import time
from collections import defaultdict
from pathlib import Path

from tats.manifest import read_manifest
from tats.pipeline import decoders, leases, runner
from tats.pipeline.backbones import Preprocess
from tats.pipeline.features import FeaturesConfig, extract_features
from tats.pipeline.tracks import TracksConfig, extract_tracks
from tats.stores import RowStore
from tats.synth import SynthConfig, generate

SPENT: dict[str, float] = defaultdict(float)
CALLS: dict[str, int] = defaultdict(int)


def timed(owner, name: str, kind: str) -> None:
    """Wrap `owner.name` so that its time adds to SPENT[kind]."""
    original = getattr(owner, name)

    @functools.wraps(original)
    def wrapper(*args, **kwargs):
        tic = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            SPENT[kind] += time.perf_counter() - tic
            CALLS[kind] += 1

    setattr(owner, name, wrapper)


def instrument() -> None:
    for method in ("claim", "holds", "release", "progress"):
        timed(leases.UnitLeases, method, "leases")
    timed(runner, "check_share", "stamp checks on resume")
    timed(decoders, "stamp", "stamps while decoding (in the decoders)")
    timed(RowStore, "sync_rows", "fsync of shards")
    timed(runner, "sweep", "debris scan")


def measure(stage: str, manifest, folder: Path) -> dict:
    SPENT.clear()
    CALLS.clear()
    rows = read_manifest(manifest)
    out = folder / f"{stage}.zarr"
    shutil.rmtree(out, ignore_errors=True)
    tic = time.perf_counter()
    if stage == "tracks":
        config = TracksConfig(tracker="lk", grid=16, shard_size=8)
        summary = extract_tracks(rows, out, config, workers=0, progress=False)
    else:
        config = FeaturesConfig(backbone="pixels", views=2, preprocess=Preprocess(), shard_size=8)
        summary = extract_features(rows, out, config, workers=0, progress=False)
    wall = time.perf_counter() - tic
    costs = {
        kind: {"seconds": round(SPENT[kind], 4), "calls": CALLS[kind],
               "share_of_wall": round(SPENT[kind] / wall, 5)}  # fmt: skip
        for kind in sorted(SPENT)
    }
    total = sum(SPENT.values())
    # A resumed run over the finished store: it checks every done video's stamp, then skips.
    SPENT.clear()
    tic = time.perf_counter()
    (extract_tracks if stage == "tracks" else extract_features)(
        rows, out, config, workers=0, progress=False
    )
    resume_wall = time.perf_counter() - tic
    return {
        "stage": stage,
        "videos": summary.videos_done,
        "units": summary.units,
        "wall_s": round(wall, 2),
        "costs": costs,
        "share_of_wall_total": round(total / wall, 5),
        "leases_share_of_wall": costs["leases"]["share_of_wall"],
        "resume": {"wall_s": round(resume_wall, 3),
                   "stamp_checks_s": round(SPENT["stamp checks on resume"], 4)},  # fmt: skip
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/leases.json"))
    parser.add_argument("--work", type=Path, default=None, help="Scratch folder [a temp dir].")
    args = parser.parse_args()
    instrument()
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        manifest = work / "synth" / "manifest.csv"
        if not manifest.is_file():
            generate(SynthConfig(videos_per_class=4), work / "synth", progress=False)
        results = [measure(stage, manifest, work) for stage in ("tracks", "features")]
    report = {
        "machine": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "dataset": "tats synth: 24 classes x 4 videos, 48 frames of 128 px",
        "shard_size": 8,
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    for r in results:
        print(f"{r['stage']}: {r['videos']} videos in {r['wall_s']} s; bookkeeping "
              f"{100 * r['share_of_wall_total']:.3f}% of it; resume {r['resume']}")  # fmt: skip
        for kind, cost in r["costs"].items():
            print(f"  {kind}: {cost['seconds']} s in {cost['calls']} calls "
                  f"({100 * cost['share_of_wall']:.3f}%)")  # fmt: skip


if __name__ == "__main__":
    main()
