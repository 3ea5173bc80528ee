"""Decoding speed of tats.video on synthetic clips: probe, dense and sparse reads, seek vs not.

    .venv/bin/python benchmarks/bench_video.py [--out benchmarks/results/video.json]

Run on an idle machine; every figure is the best of --repeat runs, in seconds.
"""

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import av
import numpy as np

import tats.video as video


def make_clip(path: Path, num_frames: int, fps: int, size: tuple[int, int], codec: str, gop: int):
    """A textured clip with motion, so the encoder does real work."""
    height, width = size
    rng = np.random.default_rng(0)
    texture = rng.integers(0, 256, (height, 2 * width, 3), dtype=np.uint8)
    container = av.open(str(path), "w")
    stream = container.add_stream(codec, rate=fps)
    stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
    stream.options = {"g": str(gop)} if codec == "libx264" else {}
    for i in range(num_frames):
        image = np.ascontiguousarray(np.roll(texture, 4 * i, axis=1)[:, :width])
        for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
            container.mux(packet)
    for packet in stream.encode():
        container.mux(packet)
    container.close()
    return path


def best_of(repeat: int, fn) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return round(min(times), 4)


def read_without_seeking(path, indices):
    saved, video.SEEK_MIN_SKIP = video.SEEK_MIN_SKIP, 10**9
    try:
        return video.read_frames(path, indices)
    finally:
        video.SEEK_MIN_SKIP = saved


def bench_h264(folder: Path, gop: int, repeat: int) -> dict:
    path = make_clip(folder / f"h264_g{gop}.mp4", 300, 30, (360, 480), "libx264", gop)
    info = video.probe(path)
    dense = video.timeline(info)  # 10 fps: every third frame
    sparse = dense[video.stored_frames(len(dense))]
    everything = np.arange(info.num_frames)
    one_frame = best_of(repeat, lambda: video.read_frames(path, [0]))
    through = best_of(repeat, lambda: video.read_frames(path, everything))
    results = {
        "clip": f"{info.num_frames} frames {info.width}x{info.height} H.264, keyframe every {gop}",
        "probe": best_of(repeat, lambda: video.probe(path)),
        "read_first_frame": one_frame,
        "read_all_frames": through,
        "read_10fps_timeline": best_of(repeat, lambda: video.read_frames(path, dense)),
        "read_8_stored_frames": best_of(repeat, lambda: video.read_frames(path, sparse)),
        "read_8_stored_frames_no_seek": best_of(repeat, lambda: read_without_seeking(path, sparse)),
        "decord_read_all_frames": best_of(
            repeat, lambda: video.read_frames(path, everything, backend="decord")
        ),
        "decord_read_8_stored_frames": best_of(
            repeat, lambda: video.read_frames(path, sparse, backend="decord")
        ),
        "read_per_frame": round((through - one_frame) / (info.num_frames - 1), 5),
    }
    if gop < info.num_frames // 2:
        # A keyframe half-way: reached by one seek, or by decoding every frame before it.
        middle = info.num_frames // 2 // gop * gop
        by_seek = best_of(repeat, lambda: video.read_frames(path, [middle]))
        no_seek = best_of(repeat, lambda: read_without_seeking(path, [middle]))
        results[f"read_frame_{middle}_by_seek"] = by_seek
        results[f"read_frame_{middle}_no_seek"] = no_seek
    return results


def bench_short_seeks(folder: Path, repeat: int) -> dict:
    """The shortest skips tats seeks over (SEEK_MIN_SKIP + 1 frames): does seeking still pay?"""
    gap = video.SEEK_MIN_SKIP + 2
    path = make_clip(folder / f"h264_g{gap}.mp4", 300, 30, (360, 480), "libx264", gap)
    targets = np.arange(0, 300, gap)  # every keyframe
    by_seek = best_of(repeat, lambda: video.read_frames(path, targets))
    through = best_of(repeat, lambda: read_without_seeking(path, targets))
    return {
        "clip": f"300 frames 480x360 H.264, keyframe every {gap}; every keyframe read",
        "read_by_seeking": by_seek,
        "read_decoding_through": through,
        "seeking_over_decoding": round(by_seek / through, 2),
    }


def bench_webm(folder: Path, repeat: int) -> dict:
    path = make_clip(folder / "ssv2_like.webm", 45, 12, (240, 427), "libvpx-vp9", 0)
    info = video.probe(path)
    return {
        "clip": f"{info.num_frames} frames {info.width}x{info.height} VP9 WebM (SSv2-like)",
        "probe_decodes_all": best_of(repeat, lambda: video.probe(path)),
        "read_all_frames": best_of(repeat, lambda: video.read_frames(path, video.timeline(info))),
        "decord_probe": best_of(repeat, lambda: video.probe(path, backend="decord")),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/video.json"))
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        results = {
            "machine": f"{platform.machine()}, {platform.processor() or 'cpu'}",
            "seek_min_skip": video.SEEK_MIN_SKIP,
            "h264_gop250": bench_h264(folder, 250, args.repeat),
            "h264_gop30": bench_h264(folder, 30, args.repeat),
            "short_seeks": bench_short_seeks(folder, args.repeat),
            "webm": bench_webm(folder, args.repeat),
        }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
