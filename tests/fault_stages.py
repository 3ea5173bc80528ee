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
    if row.video_id.startswith("fixable") and row.path.with_suffix(".broken").exists():
        raise ValueError("damaged until its .broken file is removed")
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


# ------------------------------------------------------------------ a worker process, killable
# `python tests/fault_stages.py FOLDER OUT ID,ID,... [OPTION=VALUE ...]` runs the counting
# stage over the videos FOLDER/<id>.mp4 (made by `fake_videos`) into the store OUT through
# `extract`, as a stage command would, and prints its summary as JSON; exit 1 when videos
# failed, as the commands do. Options: shard_size, workers, lease_timeout, max_attempts,
# shard_index, num_shards, executor, scheduler. The environment adds:
#   FAULT_DELAY=S        compute sleeps S seconds per row (so that kills land mid-unit);
#   FAULT_GO=PATH        wait for the file PATH before starting (processes started at once);
#   FAULT_KILL=POINT:N[:TERM]  the process kills itself (SIGKILL, or SIGTERM) at the N-th time
#     it reaches POINT: claim (a unit claimed, before its record is read), write (inside a
#     shard write, after its first array), synced (the shard on disk, before the record),
#     recorded (the record renamed into place, before its units-map byte), marked (the map
#     byte written, before the lease's release).

FAULT_POINTS = ("claim", "write", "synced", "recorded", "marked")


def _install_kill(spec: str) -> None:
    import zarr

    from tats.pipeline.leases import UnitLeases
    from tats.pipeline.ledger import Ledger
    from tats.stores import RowStore

    point, count, *how = spec.split(":")
    if point not in FAULT_POINTS:
        raise SystemExit(f"FAULT_KILL: unknown point {point!r}")
    sig = signal.SIGTERM if how == ["TERM"] else signal.SIGKILL
    reached = {"n": 0}

    def maybe_kill(at: str) -> None:
        if at == point:
            reached["n"] += 1
            if reached["n"] == int(count):
                os.kill(os.getpid(), sig)
                if sig == signal.SIGTERM:
                    time.sleep(0.5)  # let the handler run in the main thread

    def wrap(cls, name: str, at: str, before: bool = False):
        original = getattr(cls, name)

        def wrapped(*args, **kwargs):
            if before:
                maybe_kill(at)
            result = original(*args, **kwargs)
            if not before and (at != "claim" or result):
                maybe_kill(at)
            return result

        setattr(cls, name, wrapped)

    wrap(UnitLeases, "claim", "claim")
    wrap(zarr.Array, "__setitem__", "write")
    wrap(RowStore, "sync_rows", "synced")
    wrap(Ledger, "mark", "recorded", before=True)
    original_write = Ledger.write

    def write(self, record):
        original_write(self, record)
        maybe_kill("marked")

    Ledger.write = write


class SlowStage(CountingStage):
    def __init__(self, delay: float):
        self.delay = delay

    def compute(self, rows, inputs):
        time.sleep(self.delay * len(rows))
        return super().compute(rows, inputs)


@dataclass(frozen=True)
class SlowRecipe(CountingRecipe):
    delay: float = 0.0

    def build(self) -> CountingStage:
        return SlowStage(self.delay) if self.delay else CountingStage()


def read_videos(folder: Path, ids: list[str]) -> Manifest:
    """The manifest `fake_videos` made for `ids` in `folder`, without writing the files."""
    rows = tuple(VideoRow(i, v, folder / f"{v}.mp4", "x", "train") for i, v in enumerate(ids))
    return Manifest(folder / "m.csv", rows, "0" * 64)


def main(argv: list[str]) -> int:
    import json

    from tats.pipeline.executors import extract

    folder, out, ids, *rest = argv
    options = dict(item.split("=", 1) for item in rest)
    numbers = {k: float(v) if k == "lease_timeout" else int(v) for k, v in options.items()
               if k not in ("executor", "scheduler")}  # fmt: skip
    text = {k: v for k, v in options.items() if k in ("executor", "scheduler")}
    shard_size = numbers.pop("shard_size", 3)
    if os.environ.get("FAULT_KILL"):
        _install_kill(os.environ["FAULT_KILL"])
    recipe = SlowRecipe(shard_size, delay=float(os.environ.get("FAULT_DELAY", 0)))
    while os.environ.get("FAULT_GO") and not Path(os.environ["FAULT_GO"]).exists():
        time.sleep(0.01)
    summary = extract(recipe, read_videos(Path(folder), ids.split(",")), out, progress=False,
                      **numbers, **text)  # fmt: skip
    print(json.dumps({
        "videos_done": summary.videos_done, "units": summary.units,
        "units_skipped": summary.units_skipped, "units_lost": summary.units_lost,
        "failures": [[f.row, f.video_id, f.error] for f in summary.failures],
    }))  # fmt: skip
    return 1 if summary.failures else 0


if __name__ == "__main__":
    import sys

    import typer

    from tats.cli.common import graceful_termination, input_errors

    try:
        with graceful_termination(), input_errors():
            code = main(sys.argv[1:])
    except typer.Exit as exit:
        code = exit.exit_code
    sys.exit(code)
