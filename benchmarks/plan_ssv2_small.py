"""`tats run --plan` for SSv2-small with the published recipe (tats/ssv2_small), on this machine.

    .venv/bin/python benchmarks/plan_ssv2_small.py [--recipe tats/ssv2_small] [--clips 4]
        [--time-limit 12:00:00] [--out benchmarks/results/plan-ssv2-small.json]

The manifest is SSv2-small's 10,000 videos, imported from the shipped MoLo lists
(data_manifests/splits/molo/ssv2_small). The SSv2 videos themselves are not needed: the plan
extracts only a handful of them (`tats.forecast.plan_rows`), and those are written here as
stand-ins of SSv2's size (427x240 VP9 WebM, 12 fps, 45 frames: 3.75 s, about an SSv2 clip).
The weights are random, of the recipe's architectures (CoTracker3, DINOv2 ViT-B/14): speed
does not depend on the values. Everything else is `tats run --recipe R --plan`: the resolved
recipe, the stages built on this machine's device, the plan's projection to the 10,000.
The load average before and after is recorded: the projection of time holds for the load it
was measured under.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

from bench_cotracker import machine
from bench_stage_one import random_weights
from bench_video import make_clip

from tats.chain import resolve_run
from tats.forecast import parse_clock, plan_rows, plan_run
from tats.importers import import_splits
from tats.manifest import read_manifest, write_manifest

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="tats/ssv2_small")
    parser.add_argument("--clips", type=int, default=4)
    parser.add_argument("--time-limit", default="12:00:00")
    parser.add_argument(
        "--out", type=Path, default=ROOT / "benchmarks/results/plan-ssv2-small.json"
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        entries = import_splits("molo", ROOT / "data_manifests/splits/molo/ssv2_small",
                                folder / "videos", "ssv2")  # fmt: skip
        manifest_path = folder / "ssv2_small.csv"
        write_manifest([e.row for e in entries], manifest_path)
        manifest = read_manifest(manifest_path)
        (folder / "videos").mkdir()
        for row in plan_rows(manifest, args.clips):  # the clips the plan extracts
            make_clip(row.path, 45, 12, (240, 427), "libvpx-vp9", 0)
        tracker, weights = random_weights(folder, "dinov2_vitb14")
        config = resolve_run(manifest_path, folder / "run", recipe=args.recipe,
                             tracker_checkpoint=tracker, weights=weights, progress=False)
        load_before = os.getloadavg()
        forecast = plan_run(config, manifest, args.clips)
        load_after = os.getloadavg()
    lines = forecast.lines(parse_clock(args.time_limit))
    print("\n".join(lines))
    result = {
        "machine": machine(), "recipe": args.recipe, "clips": args.clips,
        "stand_in_clip": "427x240 VP9 WebM, 12 fps, 45 frames",
        "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in load_after],
        "time_limit": args.time_limit, "printed": lines, "forecast": forecast.to_dict(),
    }  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
