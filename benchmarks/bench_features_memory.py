"""Peak memory of the features stage on a 3840x2160 clip, with frames decoded at full size
(--max-side 0, as before the bound) and at the default bound (--max-side 512), and how far
the features of the two runs are apart.

    .venv/bin/python benchmarks/bench_features_memory.py \
        --out benchmarks/results/features-memory.json

Each run is a fresh process running the stage in-process (workers 0: decoding, augmentation
and the backbone in one process, the worst case); its peak resident set size (ru_maxrss) is
reported next to its resident size after imports and the backbone were loaded, so that the
difference is what one clip costs. The clip is a training row (all --views decoded and
augmented). Random weights of the real architecture (memory does not depend on their values).
"""

import argparse
import json
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

import av
import numpy as np

from tats.manifest import VideoRow, write_manifest
from tats.stores import RowStore

# Runs in a fresh process: argv = manifest, out, weights or "", backbone, views, max_side.
STAGE = """
import json, resource, sys
from tats.manifest import read_manifest
from tats.pipeline.features import FeaturesConfig, FeaturesRecipe, extract_features
manifest, out, weights, backbone, views, max_side = sys.argv[1:]
config = FeaturesConfig(backbone=backbone, views=int(views), max_side=int(max_side) or None)
FeaturesRecipe(config, weights or None).build()  # imports and weights, as the run loads them
baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
summary = extract_features(read_manifest(manifest), out, config, weights=weights or None,
                           workers=0, progress=False)
assert summary.videos_done == 1 and not summary.failures, summary
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"baseline_mb": round(baseline / 1024), "peak_mb": round(peak / 1024)}))
"""


def make_clip(path: Path, size: tuple[int, int], frames: int, fps: int) -> Path:
    """A textured moving clip (the encoder and the augmentations do real work)."""
    width, height = size
    texture = np.random.default_rng(0).integers(0, 256, (height // 8, width // 4, 3), np.uint8)
    texture = texture.repeat(8, 0).repeat(8, 1)
    container = av.open(str(path), "w")
    stream = container.add_stream("libx264", rate=fps)
    stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
    stream.options = {"preset": "ultrafast"}
    for i in range(frames):
        image = np.ascontiguousarray(np.roll(texture, 16 * i, axis=1)[:, :width])
        for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
            container.mux(packet)
    for packet in stream.encode():
        container.mux(packet)
    container.close()
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="dinov2_vits14")
    parser.add_argument("--views", type=int, default=5)
    parser.add_argument("--max-side", type=int, nargs="+", default=[0, 512])
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    sys.path.insert(0, str(Path(__file__).parent))
    from bench_features import random_weights

    size = (3840, 2160)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        clip = make_clip(folder / "uhd.mp4", size, frames=20, fps=10)
        manifest = folder / "manifest.csv"
        write_manifest([VideoRow(0, "uhd", clip, "x", "train")], manifest)
        weights = random_weights(args.backbone, folder)
        runs, features = [], {}
        for max_side in args.max_side:
            out = folder / f"features-{max_side}.zarr"
            command = [sys.executable, "-c", STAGE, str(manifest), str(out), str(weights or ""),
                       args.backbone, str(args.views), str(max_side)]  # fmt: skip
            done = subprocess.run(command, capture_output=True, text=True, check=True)
            memory = json.loads(done.stdout.strip().splitlines()[-1])
            features[max_side] = RowStore.open(out).read_row(0)["features"].astype(np.float32)
            runs.append({"max_side": max_side or None, **memory,
                         "clip_mb": memory["peak_mb"] - memory["baseline_mb"]})  # fmt: skip
            print(runs[-1], flush=True)
    result = {
        "benchmark": "features stage peak memory on one 3840x2160 clip",
        "clip": "20 frames of 3840x2160 H.264 at 10 fps (8 stored), a training row",
        "backbone": f"{args.backbone} (random weights)",
        "views": args.views,
        "workers": 0,
        "machine": f"{platform.machine()}, {platform.python_version()}",
        "runs": runs,
    }
    if 0 in features and 512 in features:
        full, bounded = features[0][0], features[512][0]  # view 0: the plain clip
        cosine = (full * bounded).sum(-1) / (
            np.linalg.norm(full, axis=-1) * np.linalg.norm(bounded, axis=-1)
        )
        result["view0_full_vs_bounded"] = {
            "patch_cosine_mean": round(float(cosine.mean()), 4),
            "patch_cosine_min": round(float(cosine.min()), 4),
            "max_abs_difference": round(float(np.abs(full - bounded).max()), 4),
            "max_abs_value": round(float(np.abs(full).max()), 4),
        }
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
