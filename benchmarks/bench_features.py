"""Throughput of `tats-extract features`: frames per second, the backbone's share of wall time
(decoding and writing hidden behind it), and bytes per video on disk.

    .venv/bin/python benchmarks/bench_features.py [--backbone dinov2_vits14] [--workers 0 2]
    .venv/bin/python benchmarks/bench_features.py --workers 2 --views 1 5 \
        --out benchmarks/results/features-views.json      # what augmented views cost
    .venv/bin/python benchmarks/bench_features.py --backbone dinov2_vitb14 --workers 2 \
        --precision fp32 bf16 --out benchmarks/results/features-bf16.json   # bf16 against fp32

Random weights of the real architecture (speed does not depend on their values), on synthetic
480x360 clips. The backbone share is the time spent in the stage's compute (backbone forward
and the float16 copy) over the wall time of the whole run. With several --precision values,
the stores of the first and each other one are compared patch by patch (`tats-extract diff`:
cosine). Run on an idle machine.
"""

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import timm
import torch
from bench_cotracker import machine

from tats.manifest import read_manifest
from tats.pipeline.backbones import DINOV2_MODELS
from tats.pipeline.diff import diff_stores
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
    precision: str = "auto",
    keep: bool = False,
) -> dict:
    out = folder / f"features-{workers}-{views}-{precision}.zarr"
    shutil.rmtree(out, ignore_errors=True)
    config = FeaturesConfig(backbone=backbone, views=views, shard_size=16)
    rows = read_manifest(manifest)
    tic = time.perf_counter()
    summary = extract_features(
        rows, out, config, weights=weights, device=device, workers=workers, batch_videos=batch,
        backbone_options={"precision": precision}, progress=False,
    )  # fmt: skip
    wall = time.perf_counter() - tic
    records = Ledger(out / "ledger").records().values()
    compute = sum(r.seconds["compute"] for r in records)
    decode = sum(r.seconds["decode"] for r in records)
    write = sum(r.seconds["write"] for r in records)
    videos = summary.videos_done
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file() and "ledger" not in p.parts)
    if not keep:
        shutil.rmtree(out)
    return {
        "workers": workers,
        "views": views,
        "precision": precision,
        "store": str(out),
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
    parser.add_argument("--precision", nargs="+", default=["auto"],
                        choices=["auto", "fp32", "bf16"], help="the backbone's arithmetic")
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
        compare = len(args.precision) > 1
        results = [
            run(manifest, weights, args.backbone, w, v, args.batch_videos, folder,
                precision=p, keep=compare)
            for w in args.workers
            for v in args.views
            for p in args.precision
        ]  # fmt: skip
        if compare:  # each later precision against the first, run for run
            first = args.precision[0]
            for r in results:
                if r["precision"] == first:
                    continue
                same = (r["workers"], r["views"], first)
                base = next(b for b in results
                            if (b["workers"], b["views"], b["precision"]) == same)  # fmt: skip
                cos = diff_stores(base["store"], r["store"], progress=False)
                r[f"speedup_vs_{first}"] = round(base["wall_s"] / r["wall_s"], 2)
                r[f"cosine_to_{first}"] = {"mean": cos.mean, "p1": cos.tail, "min": cos.extreme}
    for r in results:
        r.pop("store")
    report = {
        "benchmark": "features stage throughput",
        "backbone": args.backbone,
        "clips": f"{args.videos} synthetic clips, 60 frames of 480x360 at 10 fps, 8 stored",
        "batch_videos": args.batch_videos,
        "device": "cpu",
        "torch_threads": torch.get_num_threads(),
        "machine": machine(),
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
