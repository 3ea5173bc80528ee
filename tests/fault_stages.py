"""A tiny stage with test decoders that raise, hang or crash on chosen videos, as a recipe
that Dask workers can import (the tests folder is on their path). Everything around it is
real: Zarr stores, decoding processes, leases, the ledger, Dask workers."""

import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tats.manifest import Manifest, VideoRow
from tats.stores import FEATURES, RowStore, features_fields

FIELDS = features_fields(views=1, frames=2, grid=1, dim=3)


def load(row: VideoRow) -> int:
    if row.video_id == "bad-load":
        raise ValueError("odd pixel format")
    if row.video_id == "hang":
        time.sleep(600)  # a stalled network file system read
    if row.video_id == "crash":
        os.kill(os.getpid(), signal.SIGSEGV)
    if row.video_id == "crash-once":
        marker = row.path.with_suffix(".crashed")
        if not marker.exists():
            marker.touch()
            os.kill(os.getpid(), signal.SIGKILL)  # as the out-of-memory killer would
    return row.row


class CountingStage:
    """Writes each row's index into its features; compute fails on `bad-compute` and kills
    its whole process (a Dask worker, say) on `kill-worker`."""

    loader = staticmethod(load)
    batch_size = 2

    def compute(self, rows, inputs):
        if any(r.video_id == "bad-compute" for r in rows):
            raise RuntimeError("out of range")
        if any(r.video_id == "kill-worker" for r in rows):
            os.kill(os.getpid(), signal.SIGKILL)
        return [
            {
                "features": np.full(FIELDS["features"].shape, i, np.float16),
                "frames": np.array([0, 1], np.int32),
                "num_frames": np.int32(2),
                "view_seed": np.array([0]),
            }
            for i in inputs
        ]


@dataclass(frozen=True)
class CountingRecipe:
    """The counting stage as an executor recipe."""

    shard_size: int = 3
    name: str = "counting"

    def build(self) -> CountingStage:
        return CountingStage()

    def open_store(self, out, manifest: Manifest, stage) -> RowStore:
        return RowStore.create_or_open(
            out, FEATURES, FIELDS, len(manifest.rows), self.shard_size, {"test": manifest.sha256}
        )


def fake_videos(folder: Path, ids: list[str]) -> Manifest:
    """A manifest of `ids` whose files exist (the test decoder does not read them)."""
    rows = tuple(VideoRow(i, v, folder / f"{v}.mp4", "x", "train") for i, v in enumerate(ids))
    for row in rows:
        row.path.write_bytes(f"not a video: {row.video_id}".encode())
    return Manifest(folder / "m.csv", rows, "0" * 64)
