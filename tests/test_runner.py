"""The runner on its own: whatever a loader or compute does to one video, the rest is done.

The loader is a test decoder (tests/fault_stages.py) that raises, hangs or crashes its process
on chosen videos; everything else is real: a Zarr store, forked decoding processes, the ledger
and the leases.
"""

import json
import os
import time
from dataclasses import asdict
from pathlib import Path

import pytest
from fault_stages import CountingRecipe, CountingStage, fake_videos
from stage_helpers import live_children

from tats.pipeline.leases import LeaseHolder, UnitLeases, read_log
from tats.pipeline.ledger import Ledger
from tats.pipeline.runner import RunOptions, run_stage


def _store(tmp_path: Path, ids: list[str], shard_size: int = 3):
    manifest = fake_videos(tmp_path, ids)
    store = CountingRecipe(shard_size).open_store(tmp_path / "s.zarr", manifest, None)
    return manifest, store


def _done_rows(store) -> list[int]:
    return sorted(r for rec in Ledger(store.ledger_dir).records().values() for r in rec.done)


@pytest.mark.parametrize("workers", [0, 2])
def test_a_failing_loader_or_compute_costs_only_its_video(tmp_path, workers):
    manifest, store = _store(tmp_path, ["a", "bad-load", "b", "bad-compute", "c"])

    options = RunOptions(workers=workers, progress=False)
    summary = run_stage(CountingStage(), store, manifest, [0, 1], options)

    assert summary.videos_done == 3
    errors = {f.video_id: f.error for f in summary.failures}
    assert errors == {
        "bad-load": f"{manifest.rows[1].path}: ValueError: odd pixel format",
        "bad-compute": "RuntimeError: out of range",
    }
    assert _done_rows(store) == [0, 2, 4]
    written = store.read_rows(range(5))
    assert written["num_frames"].tolist() == [2, 0, 2, 0, 2]
    assert written["features"][4].min() == 4


def test_a_hanging_video_times_out_and_the_rest_finish(tmp_path):
    manifest, store = _store(tmp_path, ["a", "b", "hang", "c", "d", "e", "f"])
    # Helpers of earlier tests (a resource tracker, say) are not ours.
    before = live_children(os.getpid())
    tic = time.monotonic()
    options = RunOptions(workers=2, video_timeout=3, progress=False)
    summary = run_stage(CountingStage(), store, manifest, [0, 1, 2], options)
    assert time.monotonic() - tic < 60
    assert [(f.video_id, f.error) for f in summary.failures] == [
        ("hang", f"{manifest.rows[2].path}: decoding timed out after 3 s (its process was killed)")
    ]
    assert _done_rows(store) == [0, 1, 3, 4, 5, 6]
    deadline = time.monotonic() + 5  # the killed process may take a moment to go
    while live_children(os.getpid()) - before and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not live_children(os.getpid()) - before, "a decoding process outlived the run"


def test_a_video_that_crashes_its_decoder_twice_is_failed_alone(tmp_path):
    manifest, store = _store(tmp_path, ["a", "crash", "b", "crash-once", "c", "d"])
    summary = run_stage(
        CountingStage(), store, manifest, [0, 1], RunOptions(workers=2, progress=False)
    )
    assert [f.video_id for f in summary.failures] == ["crash"]
    assert "crashed its process 2 times (signal SIGSEGV)" in summary.failures[0].error
    # The video whose process was killed once (as by the out-of-memory killer) was redone.
    assert _done_rows(store) == [0, 2, 3, 4, 5]
    assert (tmp_path / "crash-once.crashed").exists()


def _lease_of_a_node_that_died(store, unit: int) -> str:
    """A fresh lease of `unit` whose holder ran on another node (its death cannot be seen
    from here: only its lease going stale tells)."""
    holder = LeaseHolder("node-17-4242-0badc0de", "node-17", "pid:[1]", 4242, 1)
    store.lease_dir.mkdir(parents=True, exist_ok=True)
    content = {"holder": asdict(holder), "unit": unit, "claimed": time.time()}
    (store.lease_dir / f"unit-{unit:06d}.lease").write_text(json.dumps(content))
    return holder.id


def test_a_unit_held_by_a_dead_node_is_taken_over_once_its_lease_goes_stale(tmp_path):
    # A task resubmitted while its killed predecessor's lease is fresh: it must not end
    # "done" without that unit.
    manifest, store = _store(tmp_path, ["a", "b", "c", "d", "e", "f"])
    dead = _lease_of_a_node_that_died(store, 1)
    tic = time.monotonic()
    options = RunOptions(workers=0, lease_timeout=2, progress=False)
    summary = run_stage(CountingStage(), store, manifest, [0, 1], options)
    assert summary.units_elsewhere == [] and summary.units == 2
    assert _done_rows(store) == [0, 1, 2, 3, 4, 5]
    assert time.monotonic() - tic >= 2  # taken over only once stale
    takeovers = [e for e in read_log(store.lease_dir) if e["event"] == "takeover"]
    assert [(e["unit"], e["previous"]) for e in takeovers] == [(1, dead)]


def test_a_unit_held_by_a_live_worker_is_left_to_it_after_a_heartbeat(tmp_path):
    manifest, store = _store(tmp_path, ["a", "b", "c", "d", "e", "f"])
    with UnitLeases(store.lease_dir, timeout=60) as other:  # heartbeats every 10 s
        assert other.claim(1)
        tic = time.monotonic()
        options = RunOptions(workers=0, lease_timeout=60, progress=False)
        summary = run_stage(CountingStage(), store, manifest, [0, 1], options)
        waited = time.monotonic() - tic
        assert other.holds(1)
    assert summary.units_elsewhere == [f"unit 1 ({other.holder})"]
    assert _done_rows(store) == [0, 1, 2]
    assert waited < 15  # one heartbeat, not the lease timeout
