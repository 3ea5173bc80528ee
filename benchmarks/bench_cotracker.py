"""CoTracker3 for TATs tracks: the official procedure against tats' own implementation.

    PYTHONPATH=/path/to/co-tracker .venv/bin/python benchmarks/bench_cotracker.py

Each procedure extracts the TATs tracks of the same clips (a 16x16 grid at every query frame
of `uniform:8`, then the redundancy filter) with the same weights, in its own process (so
that its peak memory is its own):

  official_seven   the official predictor, one grid-mode call per query frame (original TATs)
  ours_seven       tats' CoTracker3, same seven passes (feature CNN once per clip)
  ours_one_pass    tats' CoTracker3, all query frames in one pass, whole clips (exact mode)
  ours_from_query  one pass, each point tracked only from its query frame on (the default of
                   `tats-extract tracks --tracker cotracker3`)
  ours_batched     as ours_from_query, all clips in one `track_batch` call
  official_online  the official online predictor over 16-frame windows (step 8), as its demo
  ours_online      tats' CoTracker3 online, same windows: parity of the online model
  official_one_pass, ours_one_pass_explicit (on request): parity of explicit queries with the
                   support grid, in one pass

It reports seconds per clip, peak memory, and how far each procedure's tracks are from the
official ones (pixels; on all frames and on the frames from each point's query frame on, the
only ones TATs uses), with visibility and filter agreement. Without the official package
(or with --skip-official) only tats' procedures run, compared with ours_seven.

Weights are random unless --checkpoint/--online-checkpoint are given: the real architecture
(speed does not depend on the values), with the flow and visibility heads drawn at std 0.01
instead of the official 0.001 init so that tracks move (~10 px) and visibility crosses its
threshold; track differences measured with random weights only bound those of real weights
loosely. Clips: `tats synth` videos (moving textured objects), or --video files decoded on
the 10 fps time base. Timings are only meaningful on an idle machine.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from tats.pipeline import queries as Q
from tats.pipeline.trackers.cotracker3 import build_model

PROCEDURES = {
    # name: (tracker, options, reference for the difference, how it is called)
    "official_seven": (
        "official",
        {"passes": "per_query_frame", "support_grid": False},
        None,
        "track",
    ),
    "ours_seven": (
        "cotracker3",
        {"passes": "per_query_frame", "support_grid": False, "from_query_frame": False},
        "official_seven",
        "track",
    ),
    "ours_one_pass": ("cotracker3", {"from_query_frame": False}, "official_seven", "track"),
    "ours_from_query": ("cotracker3", {"from_query_frame": True}, "official_seven", "track"),
    "ours_batched": ("cotracker3", {"from_query_frame": True}, "official_seven", "track_batch"),
    "official_online": ("official", {"online": True}, None, "track"),
    "ours_online": ("cotracker3-online", {"from_query_frame": False}, "official_online", "track"),
    "official_one_pass": ("official", {}, None, "track"),
    "ours_one_pass_explicit": (
        "cotracker3",
        {"from_query_frame": False},
        "official_one_pass",
        "track",
    ),
}
DEFAULT = [
    "official_seven",
    "ours_seven",
    "ours_one_pass",
    "ours_from_query",
    "ours_batched",
    "official_online",
    "ours_online",
]


def random_checkpoint(kind: str, path: Path, seed: int) -> Path:
    torch.manual_seed(seed)
    model = build_model(kind)
    state = model.state_dict()
    g = torch.Generator().manual_seed(seed + 1)
    for head in ("flow_head", "vis_conf_head"):
        key = f"updateformer.{head}.weight"
        state[key] = torch.randn(state[key].shape, generator=g) * 0.01
    torch.save(state, path)
    return path


def make_clips(args, folder: Path) -> list[dict]:
    """Clips (frames, queries) as npz files; synthetic unless --video files are given."""
    clips = []
    if args.video:
        from tats.video import probe, read_frames, timeline

        for path in args.video:
            frames = read_frames(path, timeline(probe(path)))[: args.frames]
            clips.append((Path(path).stem, frames))
    else:
        from tats.synth import MOTIONS, SynthConfig, make_video

        width, height = (int(v) for v in args.size.split("x"))
        config = SynthConfig(frames=args.frames, width=width, height=height, seed=args.seed)
        for i in range(args.videos):
            label = list(MOTIONS)[i % len(MOTIONS)]
            clips.append((f"{label}_{i}", make_video(config, label, i)[0]))
    strategy = Q.QueryStrategy.parse(args.queries)
    out = []
    for name, frames in clips:
        t, h, w = frames.shape[:3]
        queries = Q.make_queries(strategy, args.grid, t, h, w)
        path = folder / f"clip_{len(out)}.npz"
        np.savez(path, frames=frames, queries=queries)
        out.append(
            {
                "name": name,
                "path": str(path),
                "frames": t,
                "height": h,
                "width": w,
                "points": len(queries),
            }
        )
    return out


def worker(args) -> None:
    """One procedure in this process: time it, record peak memory, save the tracks."""
    from tats.pipeline.trackers import create_tracker

    spec = json.loads(Path(args.worker).read_text())
    tracker_name, options, _, call = PROCEDURES[spec["procedure"]]
    checkpoint = (
        spec["online_checkpoint"]
        if tracker_name == "cotracker3-online"
        or (tracker_name == "official" and options.get("online"))
        else spec["checkpoint"]
    )
    extra = {"max_offline_frames": None} if tracker_name == "cotracker3" else {}
    tracker = create_tracker(
        tracker_name, checkpoint=checkpoint, device=spec["device"], **options, **extra
    )
    clips = [np.load(c["path"]) for c in spec["clips"]]
    clips = [(c["frames"], c["queries"]) for c in clips]
    # warm-up (one-off kernel setup) on a short piece of the first clip
    frames, queries = clips[0]
    tracker.track(frames[:2], queries[queries[:, 0] == 0])
    if spec["device"].startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    seconds = []
    if call == "track_batch":
        tic = time.perf_counter()
        outputs = tracker.track_batch(clips)
        _sync(spec["device"])
        seconds = [(time.perf_counter() - tic) / len(clips)] * len(clips)
    else:
        outputs = []
        for frames, queries in clips:
            tic = time.perf_counter()
            outputs.append(tracker.track(frames, queries))
            _sync(spec["device"])
            seconds.append(time.perf_counter() - tic)
    result = {
        "seconds": seconds,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "identity": tracker.identity.to_dict(),
    }
    if spec["device"].startswith("cuda"):
        result["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
    arrays = {}
    for i, (tracks, visible) in enumerate(outputs):
        arrays[f"tracks_{i}"], arrays[f"visible_{i}"] = tracks, visible
    np.savez(spec["result"] + ".npz", **arrays)
    Path(spec["result"] + ".json").write_text(json.dumps(result))


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def compare(clips, ours: dict, ref: dict, min_distance: float) -> dict:
    """Track, visibility and filter differences of `ours` against `ref`."""
    all_d, used_d, vis_same, vis_total, keep_same, keep_total = [], [], 0, 0, 0, 0
    for i, clip in enumerate(clips):
        queries = np.load(clip["path"])["queries"]
        qf = queries[:, 0].astype(int)
        a, b = ours[f"tracks_{i}"], ref[f"tracks_{i}"]
        d = np.linalg.norm(a - b, axis=-1)  # (T, N)
        used = np.arange(len(d))[:, None] >= qf[None]
        all_d.append(d.ravel())
        used_d.append(d[used])
        va = Q.hide_before_query(ours[f"visible_{i}"], qf)
        vb = Q.hide_before_query(ref[f"visible_{i}"], qf)
        vis_same += int((va == vb)[used].sum())
        vis_total += int(used.sum())
        ka = Q.filter_redundant(a, va, qf, min_distance)
        kb = Q.filter_redundant(b, vb, qf, min_distance)
        keep_same += int((ka == kb).sum())
        keep_total += len(ka)
    all_d, used_d = np.concatenate(all_d), np.concatenate(used_d)
    return {
        "track_diff_px_mean": float(all_d.mean()),
        "track_diff_px_max": float(all_d.max()),
        "track_diff_px_mean_from_query": float(used_d.mean()),
        "track_diff_px_max_from_query": float(used_d.max()),
        "visibility_agreement_from_query": vis_same / vis_total,
        "filter_agreement": keep_same / keep_total,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--videos", type=int, default=2, help="synthetic clips")
    parser.add_argument("--frames", type=int, default=24, help="frames per clip (10 fps)")
    parser.add_argument("--size", default="320x240", help="synthetic clip size WxH")
    parser.add_argument("--video", nargs="*", help="real video files instead of synthetic clips")
    parser.add_argument("--grid", type=int, default=16)
    parser.add_argument("--queries", default="uniform:8")
    parser.add_argument("--min-distance", type=float, default=16.0)
    parser.add_argument("--procedures", nargs="+", default=DEFAULT, choices=list(PROCEDURES))
    parser.add_argument("--skip-official", action="store_true")
    parser.add_argument("--checkpoint", type=Path, help="offline weights [random]")
    parser.add_argument("--online-checkpoint", type=Path, help="online weights [random]")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/cotracker.json"))
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)

    try:
        import cotracker  # noqa: F401

        official = not args.skip_official
    except ImportError:
        official = False
        print("official `cotracker` package not importable: official procedures skipped")
    procedures = [p for p in args.procedures if official or PROCEDURES[p][0] != "official"]
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        clips = make_clips(args, folder)
        checkpoint = args.checkpoint or random_checkpoint("offline", folder / "w.pth", args.seed)
        online = args.online_checkpoint or random_checkpoint(
            "online", folder / "w_online.pth", args.seed + 10
        )
        runs, arrays = {}, {}
        for name in procedures:
            spec = {
                "procedure": name,
                "clips": clips,
                "device": args.device,
                "checkpoint": str(checkpoint),
                "online_checkpoint": str(online),
                "result": str(folder / name),
            }
            spec_path = folder / f"{name}.spec.json"
            spec_path.write_text(json.dumps(spec))
            print(f"running {name} ...", flush=True)
            done = subprocess.run([sys.executable, __file__, "--worker", str(spec_path)])
            if done.returncode != 0:
                raise SystemExit(f"{name} failed with exit code {done.returncode}")
            runs[name] = json.loads((folder / f"{name}.json").read_text())
            arrays[name] = dict(np.load(folder / f"{name}.npz"))
        rows = []
        for name in procedures:
            run = runs[name]
            row = {
                "procedure": name,
                "tracker": PROCEDURES[name][0],
                "options": PROCEDURES[name][1],
                "call": PROCEDURES[name][3],
                "seconds_per_clip": float(np.mean(run["seconds"])),
                "seconds": run["seconds"],
                "peak_rss_mb": round(run["peak_rss_mb"], 1),
                "identity": run["identity"],
            }
            if "peak_gpu_mb" in run:
                row["peak_gpu_mb"] = round(run["peak_gpu_mb"], 1)
            ref = PROCEDURES[name][2]
            if ref == "official_seven" and ref not in arrays and name != "ours_seven":
                ref = "ours_seven"  # equals the official procedure within float error
            if ref in arrays:
                row["reference"] = ref
                ref_seconds = float(np.mean(runs[ref]["seconds"]))
                row["speedup_vs_reference"] = ref_seconds / row["seconds_per_clip"]
                row.update(compare(clips, arrays[name], arrays[ref], args.min_distance))
            rows.append(row)
    report = {
        "benchmark": "TATs tracks with CoTracker3: official procedure vs tats",
        "clips": [
            {k: c[k] for k in ("name", "frames", "height", "width", "points")} for c in clips
        ],
        "grid": args.grid,
        "queries": args.queries,
        "weights": "given" if args.checkpoint else "random (heads std 0.01)",
        "device": args.device,
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} "
        "threads",
        "command": " ".join(sys.argv),
        "results": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(table(rows))
    print(f"written {args.out}")


def table(rows: list[dict]) -> str:
    lines = [
        "| procedure | s/clip | speed-up | peak RSS MB | mean / max px vs ref (from query) "
        "| visibility agree | filter agree |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        diff = vis = keep = speed = "-"
        if "reference" in r:
            diff = (
                f"{r['track_diff_px_mean_from_query']:.2e} / "
                f"{r['track_diff_px_max_from_query']:.2e} ({r['reference']})"
            )
            vis = f"{r['visibility_agreement_from_query']:.4f}"
            keep = f"{r['filter_agreement']:.4f}"
            speed = f"{r['speedup_vs_reference']:.2f}x"
        lines.append(
            f"| {r['procedure']} | {r['seconds_per_clip']:.2f} | {speed} | "
            f"{r['peak_rss_mb']:.0f} | {diff} | {vis} | {keep} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
