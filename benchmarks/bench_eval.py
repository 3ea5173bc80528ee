"""Evaluation time: a 10,000-episode test evaluation, episode by episode and each clip once.

    .venv/bin/python benchmarks/bench_eval.py [--quick] [--episodes N] [--shot 1] [--device cpu]

The demo's data and model: `tats synth` (24 motion classes, 10 videos each, 48 frames of
128 px; the 8 test classes hold 80 clips), LK tracks (8 x 8 grids, 256-point subsets), `pixels`
features (16 x 16 x 64 at 224 px) and the TATs model of configs/demo.json (width 32, 4 heads,
depth 1, 30k parameters), trained for one epoch (speed does not depend on the weights).

Both paths evaluate the same checkpoint on the same stores and the same 5-way episodes (1 query
per class), one after the other in one process: `per_episode` embeds the clips of every episode
together, as evaluation did before (10 clips per 1-shot episode); `embed_once` embeds each test
clip once, then matches each episode. Reported: seconds, episodes per second, the speed-up,
and how far the two agree (predictions, scores). The dataset and checkpoint are built once
under --work. Writes benchmarks/results/eval.json (--quick: 300 episodes, eval-quick.json).
Time it on an idle machine: on 2 busy CPU cores the per-episode path ran at 3 to 8 episodes/s,
so 10,000 episodes take 20 to 55 minutes there; the other path takes seconds.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch

from tats.checkpoints import load_checkpoint
from tats.episodes import EpisodeData, EpisodeSpec
from tats.evaluate import episode_predictions, eval_result, evaluation_options, load_model
from tats.manifest import read_manifest
from tats.pipeline.features import FeaturesConfig, extract_features
from tats.pipeline.tracks import TracksConfig, extract_tracks
from tats.runtime import Runtime
from tats.synth import SynthConfig, generate
from tats.train import train
from tats.train_config import config_from_dict

REPO = Path(__file__).resolve().parents[1]
SYNTH = SynthConfig(videos_per_class=10)  # the demo's dataset (Makefile)
TRACKS = TracksConfig(tracker="lk", grid=8)
FEATURES = FeaturesConfig(backbone="pixels", views=2)


def build(work: Path, workers: int, device: str) -> tuple[Path, Path, Path, Path]:
    """The dataset, its stores and a checkpoint under `work`, each skipped where present."""
    manifest_path = work / "synth" / "manifest.csv"
    if not manifest_path.is_file():
        generate(SYNTH, work / "synth")
    manifest = read_manifest(manifest_path)
    for summary in (
        extract_tracks(manifest, work / "tracks.zarr", TRACKS, workers=workers),
        extract_features(manifest, work / "features.zarr", FEATURES, workers=workers),
    ):
        if summary.failures:
            raise RuntimeError(f"extraction failed: {summary.failures[:3]}")
    checkpoint = work / "run" / "checkpoints" / "best.pt"
    if not checkpoint.is_file():
        demo = json.loads((REPO / "configs" / "demo.json").read_text())
        train(config_from_dict({
            **demo, "epochs": 1, "val_episodes": 0, "test_episodes": 0, "workers": workers,
            "device": device, "tracks": str(work / "tracks.zarr"),
            "features": str(work / "features.zarr"), "manifest": str(manifest_path),
            "out": str(work / "run"),
        }))  # fmt: skip
    return manifest_path, work / "tracks.zarr", work / "features.zarr", checkpoint


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="300 episodes")
    parser.add_argument("--episodes", type=int, default=None, help="[10000; --quick: 300]")
    parser.add_argument("--shot", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers")
    parser.add_argument("--work", type=Path, default=Path("benchmarks/work/eval"))
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    episodes = args.episodes or (300 if args.quick else 10000)
    out = args.out or Path("benchmarks/results") / f"eval{'-quick' if args.quick else ''}.json"
    manifest, tracks, features, checkpoint = build(args.work, args.workers, args.device)

    state = load_checkpoint(checkpoint)
    saved = state["config"]
    rt = Runtime.setup(args.device, saved["amp"], args.workers, saved["prefetch"])
    data = EpisodeData.open(tracks, features, manifest)
    model = load_model(state, rt.device)
    spec = EpisodeSpec(5, args.shot, 1)
    classes = data.classes("test", spec.per_class, spec.way)
    options = evaluation_options(saved)
    runs, predictions = {}, {}
    for path, once in (("per_episode", False), ("embed_once", True)):
        if rt.device.type == "cuda":
            torch.cuda.synchronize()
        tic = time.perf_counter()
        predictions[path] = episode_predictions(
            model, data, classes, spec, options, episodes, 0, rt, embed_once=once
        )
        if rt.device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - tic
        result = eval_result(classes, spec, predictions[path])
        runs[path] = {
            "seconds": round(seconds, 2), "episodes_per_second": episodes / seconds,
            "accuracy": result.accuracy, "ci95": result.ci95,
        }  # fmt: skip
        print(f"{path}: {seconds:.1f} s, {episodes / seconds:.1f} episodes/s, accuracy "
              f"{result.accuracy:.2f} +- {result.ci95:.2f}%", flush=True)  # fmt: skip
    a, b = predictions["per_episode"], predictions["embed_once"]
    clips = sum(len(classes.rows[c]) for c in classes.drawable)
    report = {
        "benchmark": "eval",
        "episodes": episodes,
        "episode": {"way": spec.way, "shot": spec.shot, "queries": spec.queries,
                    "clips": spec.way * spec.per_class},
        "test_clips": clips,
        "clip_embeddings": {"per_episode": episodes * spec.way * spec.per_class,
                            "embed_once": clips},
        "model": {"config": state["model_config"],
                  "parameters": sum(p.numel() for p in model.parameters()),
                  "trained_epochs": state["epoch"], "points": data.points},
        "data": {"synth": {"classes": SYNTH.classes, "videos_per_class": SYNTH.videos_per_class,
                           "frames": SYNTH.frames, "size": SYNTH.width},
                 "tracks": {"tracker": TRACKS.tracker, "grid": TRACKS.grid},
                 "features": {"backbone": FEATURES.backbone, "grid": list(data.grid)}},
        "device": args.device, "workers": args.workers,
        **runs,
        "speedup": runs["embed_once"]["episodes_per_second"]
        / runs["per_episode"]["episodes_per_second"],
        "agreement": {
            "same_episodes": bool(np.array_equal(a.true, b.true)),
            "same_predictions": float((a.predicted == b.predicted).mean()),
            "max_score_difference": float(np.abs(a.scores - b.scores).max()),
        },
        "machine": {"platform": platform.platform(), "torch": torch.__version__,
                    "threads": torch.get_num_threads(),
                    "gpu": torch.cuda.get_device_name() if rt.device.type == "cuda" else None},
    }  # fmt: skip
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
    agree = report["agreement"]
    print(f"speed-up {report['speedup']:.1f}x; {100 * agree['same_predictions']:.2f}% of "
          f"predictions the same, scores within {agree['max_score_difference']:.1e}; "
          f"wrote {out}")  # fmt: skip


if __name__ == "__main__":
    main()
