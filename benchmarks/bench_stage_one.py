"""Stage one's cost per video for every recipe: the tracks and features `tats run --recipe R` makes.

    .venv/bin/python benchmarks/bench_stage_one.py [--recipes tats/hmdb trokens/hmdb]
        [--seconds 4] [--width 320 --height 240] [--out benchmarks/results/stage-one.json]

Each recipe's two stages (tats/chain.py `resolve_run` and `extract_stages`, as `tats run` runs
them) extract the same clips: `tats synth` videos of --width x --height pixels and --seconds at
30 fps (decoded on the recipes' 10 fps time base). Weights are random, of the recipes'
architectures (CoTracker3, DINOv2 ViT-B/14): speed does not depend on the values. Recipes
whose stages are configured alike share one measurement.

Reported per stage: the seconds its units took by their ledger records (decode, compute and
write) per video, what a video costs in a long run where the models load once; and the stage's
wall seconds in this run, with the models' loading. Only meaningful on an idle machine.
"""

from __future__ import annotations

import argparse
import csv
import json
import platform
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import torch
from bench_features import random_weights as backbone_weights

from tats.chain import extract_stages, resolve_run, stage_recipes
from tats.manifest import read_manifest
from tats.pipeline.ledger import Ledger
from tats.pipeline.trackers.cotracker3 import build_model
from tats.recipes import recipe_names
from tats.synth import SynthConfig, generate

FPS = 30.0


def random_weights(folder: Path, backbone: str) -> tuple[Path, Path]:
    """A CoTracker3 checkpoint and a DINOv2 `backbone` one, random, in `folder`."""
    torch.manual_seed(0)
    tracker = folder / "cotracker3.pth"
    torch.save(build_model("offline").state_dict(), tracker)
    return tracker, backbone_weights(backbone, folder)


def clips(folder: Path, seconds: float, width: int, height: int, videos: int) -> Path:
    """A manifest of `videos` synth clips (one per class, the first classes)."""
    frames = round(seconds * FPS)
    config = SynthConfig(
        classes=max(3, videos), videos_per_class=1, frames=frames, width=width, height=height,
        fps=FPS,
    )  # fmt: skip
    manifest = generate(config, folder / "synth", progress=False)
    with open(manifest, newline="") as f:
        rows = list(csv.DictReader(f))[:videos]
    for row in rows:  # every row in one split: which one does not matter to stage one
        row["split"] = "train"
    chosen = manifest.with_name("stage-one.csv")  # beside it: paths are relative to it
    with open(chosen, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return chosen


def measure(recipe: str, manifest: Path, tracker: Path, weights: Path, out: Path) -> dict:
    config = resolve_run(
        manifest, out, recipe=recipe, tracker_checkpoint=tracker, weights=weights,
        progress=False,
    )  # fmt: skip
    rows = read_manifest(manifest)
    stages = {}
    for stage in stage_recipes(config):
        tic = time.perf_counter()
        summary = extract_stages((stage,), rows, out, workers=config.workers, progress=False)
        wall = time.perf_counter() - tic
        done = summary[stage.name]
        if done.videos_done != len(rows):
            raise SystemExit(f"{recipe}: {stage.name} failed: {done.failures}")
        records = list(Ledger(out / f"{stage.name}.zarr" / "ledger").records().values())
        stages[stage.name] = {
            "seconds_per_video": round(sum(r.seconds["total"] for r in records) / len(rows), 2),
            "parts": {k: round(sum(r.seconds[k] for r in records) / len(rows), 2)
                      for k in records[0].seconds if k != "total"},
            "wall_s": round(wall, 2),
        }  # fmt: skip
    return {
        "tracks": asdict(config.tracks),
        "features": asdict(config.features),
        "seconds_per_video": round(sum(s["seconds_per_video"] for s in stages.values()), 2),
        "stages": stages,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--recipes", nargs="+", default=recipe_names())
    parser.add_argument("--seconds", type=float, default=4.0, help="clip length")
    parser.add_argument("--width", type=int, default=320)
    parser.add_argument("--height", type=int, default=240)
    parser.add_argument("--videos", type=int, default=1, help="clips per measurement")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/stage-one.json"))
    args = parser.parse_args()

    results: dict[str, dict] = {}
    measured: dict[str, str] = {}  # the stages' configs -> the recipe measured with them
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        manifest = clips(folder, args.seconds, args.width, args.height, args.videos)
        weights_by_backbone = {}
        for recipe in args.recipes:
            probe = resolve_run(manifest, folder / "probe", recipe=recipe)
            key = json.dumps([asdict(probe.tracks), asdict(probe.features)], sort_keys=True)
            if key in measured:
                results[recipe] = {"same_as": measured[key]}
                print(f"{recipe}: stages as {measured[key]}'s", flush=True)
                continue
            backbone = probe.features.backbone
            if backbone not in weights_by_backbone:
                weights_by_backbone[backbone] = random_weights(folder, backbone)
            tracker, weights = weights_by_backbone[backbone]
            results[recipe] = measure(
                recipe, manifest, tracker, weights, folder / recipe.replace("/", "-")
            )
            measured[key] = recipe
            stages = results[recipe]["stages"]
            print(
                f"{recipe}: {results[recipe]['seconds_per_video']} s per video "
                f"(tracks {stages['tracks']['seconds_per_video']} s, "
                f"features {stages['features']['seconds_per_video']} s)",
                flush=True,
            )

    out = {
        "benchmark": "stage_one",
        "clip": {"seconds": args.seconds, "fps": FPS, "width": args.width,
                 "height": args.height, "videos": args.videos, "source": "tats synth"},
        "weights": "random, of the recipes' architectures",
        "machine": {"platform": platform.platform(), "cpus": torch.get_num_threads(),
                    "torch": torch.__version__, "device": "cpu"},
        "recipes": results,
    }  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
