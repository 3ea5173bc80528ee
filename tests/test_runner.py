"""The runner on its own: whatever a loader or compute raises for one video, the rest is done."""

import numpy as np
import pytest

from tats.manifest import Manifest, VideoRow
from tats.pipeline.ledger import Ledger
from tats.pipeline.runner import run_stage
from tats.stores import FEATURES, RowStore, features_fields

FIELDS = features_fields(views=1, frames=2, grid=1, dim=3)


def load(row: VideoRow) -> int:
    """Module level, so that worker processes can unpickle it."""
    if row.video_id == "bad-load":
        raise ValueError("odd pixel format")
    return row.row


class CountingStage:
    """Writes each row's index into its features; compute fails on one video."""

    loader = staticmethod(load)
    batch_size = 2

    def compute(self, rows, inputs):
        if any(r.video_id == "bad-compute" for r in rows):
            raise RuntimeError("out of range")
        return [
            {
                "features": np.full(FIELDS["features"].shape, i, np.float16),
                "frames": np.array([0, 1], np.int32),
                "num_frames": np.int32(2),
                "view_seed": np.array([0]),
            }
            for i in inputs
        ]


@pytest.mark.parametrize("workers", [0, 2])
def test_a_failing_loader_or_compute_costs_only_its_video(tmp_path, workers):
    ids = ["a", "bad-load", "b", "bad-compute", "c"]
    rows = tuple(VideoRow(i, v, tmp_path / f"{v}.mp4", "x", "train") for i, v in enumerate(ids))
    manifest = Manifest(tmp_path / "m.csv", rows, "0" * 64)
    store = RowStore.create_or_open(tmp_path / "s.zarr", FEATURES, FIELDS, 5, 3, {"test": 1})

    summary = run_stage(CountingStage(), store, manifest, [0, 1], workers=workers, progress=False)

    assert summary.videos_done == 3
    errors = {f.video_id: f.error for f in summary.failures}
    assert errors == {
        "bad-load": f"{rows[1].path}: ValueError: odd pixel format",
        "bad-compute": "RuntimeError: out of range",
    }
    records = Ledger(store.ledger_dir).records()
    assert sorted(r for rec in records.values() for r in rec.done) == [0, 2, 4]
    written = store.read_rows(range(5))
    assert written["num_frames"].tolist() == [2, 0, 2, 0, 2]
    assert written["features"][4].min() == 4
