"""Throughput of `tats-extract features`: frames per second, the backbone's share of wall time
(decoding and writing hidden behind it), and bytes per video on disk.

    .venv/bin/python benchmarks/bench_features.py [--backbone dinov2_vits14] [--workers 0 2]
    .venv/bin/python benchmarks/bench_features.py --workers 2 --views 1 5 \
        --out benchmarks/results/features-views.json      # what augmented views cost

Random weights of the real architecture (speed does not depend on their values), on synthetic
480x360 clips. The backbone share is the time spent in the stage's compute (backbone forward
and the float16 copy) over the wall time of the whole run. Run on an idle machine.
"""

import argparse
import json
import platform
import shutil
import tempfile
import time
from pathlib import Path

import timm
import torch

from tats.manifest import read_manifest
from tats.pipeline.backbones import DINOV2_MODELS
from tats.pipeline.features import FeaturesConfig, extract_features
from tats.pipeline.ledger import Ledger
from tats.synth import SynthConfig, generate


def random_weights(name: str, folder: Path) -> Path | None:
    if name == "pixels":
        return None
    model = timm.create_model(DINOV2_MODELS[name][0], pretrained=False, img_size=224)
    path = folder / f"{name}.pth"
    torch.save(model.state_dict(), path)
    return path


def run(
    manifest,
    weights,
    backbone: str,
    workers: int,
    views: int,
    batch: int,
    folder: Path,
    device: str = "cpu",
) -> dict:
    out = folder / f"features-{workers}-{views}.zarr"
    shutil.rmtree(out, ignore_errors=True)
    config = FeaturesConfig(backbone=backbone, views=views, shard_size=16)
    rows = read_manifest(manifest)
    tic = time.perf_counter()
    summary = extract_features(
        rows, out, config, weights=weights, device=device, workers=workers, batch_videos=batch,
        progress=False,
    )  # fmt: skip
    wall = time.perf_counter() - tic
    records = Ledger(out / "ledger").records().values()
    compute = sum(r.seconds["compute"] for r in records)
    decode = sum(r.seconds["decode"] for r in records)
    write = sum(r.seconds["write"] for r in records)
    videos = summary.videos_done
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file() and "ledger" not in p.parts)
    shutil.rmtree(out)
    return {
        "workers": workers,
        "views": views,
        "videos": videos,
        "wall_s": round(wall, 2),
        "seconds_per_video": round(wall / videos, 3),
        "frames_per_s": round(videos * views * config.frames / wall, 2),  # frames encoded
        "backbone_share": round(compute / wall, 3),
        "decode_s_in_workers": round(decode, 2),
        "write_s_in_background": round(write, 2),
        "bytes_per_video": int(size / videos),
        "bytes_per_video_and_view": int(size / videos / views),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="dinov2_vits14")
    parser.add_argument("--videos", type=int, default=32)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--views", type=int, nargs="+", default=[1], help="views per video")
    parser.add_argument("--batch-videos", type=int, default=4)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/features.json"))
    args = parser.parse_args()
    torch.set_num_threads(torch.get_num_threads())
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        synth = SynthConfig(
            classes=4, videos_per_class=args.videos // 4, frames=60, width=480, height=360
        )
        manifest = generate(synth, folder / "synth", progress=False)
        weights = random_weights(args.backbone, folder)
        results = [
            run(manifest, weights, args.backbone, w, v, args.batch_videos, folder)
            for w in args.workers
            for v in args.views
        ]
    report = {
        "benchmark": "features stage throughput",
        "backbone": args.backbone,
        "clips": f"{args.videos} synthetic clips, 60 frames of 480x360 at 10 fps, 8 stored",
        "batch_videos": args.batch_videos,
        "device": "cpu",
        "torch_threads": torch.get_num_threads(),
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} "
        f"threads",
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
