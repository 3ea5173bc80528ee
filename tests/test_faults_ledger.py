"""Stage one's bookkeeping under faults (issue 28): the units map, retries, leases that end,
and one line naming the file for every damaged one.

Each test is a row of the fault table in docs/clusters.md. Stores, ledgers, leases, processes,
signals, Dask clusters and files are real; the stage is the counting stage of
tests/fault_stages.py, whose worker script (`python tests/fault_stages.py ...`) kills itself
at a chosen commit point.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
from dataclasses import asdict
from pathlib import Path

import pytest
import zarr
from fault_stages import CountingRecipe, CountingStage, fake_videos
from typer.testing import CliRunner

from tats.cli.extract import app
from tats.episodes import EpisodeData
from tats.interop import export_h5
from tats.manifest import VideoRow, read_manifest, write_manifest
from tats.pipeline.backbones import Preprocess
from tats.pipeline.executors import extract
from tats.pipeline.features import FeaturesConfig, extract_features
from tats.pipeline.leases import LeaseHolder
from tats.pipeline.runner import RunOptions, run_stage
from tats.pipeline.status import store_status, verify_store
from tats.pipeline.tracks import TracksConfig, extract_tracks
from tats.stores import RowStore

WORKER = str(Path(__file__).parent / "fault_stages.py")
QUIET = RunOptions(workers=0, progress=False)
LK_SMALL = TracksConfig(tracker="lk", grid=8, shard_size=2)


def invoke(*args) -> tuple[int, str]:
    result = CliRunner().invoke(app, [str(a) for a in args])
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.stdout + result.stderr


def worker(folder: Path, out: Path, ids: list[str], *options: str, env: dict | None = None,
           **popen) -> subprocess.Popen:  # fmt: skip
    """The counting stage over `ids` in its own process (see tests/fault_stages.py)."""
    return subprocess.Popen(
        [sys.executable, WORKER, str(folder), str(out), ",".join(ids), *options],
        env={**os.environ, **(env or {})}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True, **popen,
    )  # fmt: skip


def finish(run: subprocess.Popen) -> tuple[int, dict | None, str]:
    stdout, stderr = run.communicate(timeout=300)
    lines = stdout.strip().splitlines()
    return run.returncode, json.loads(lines[-1]) if lines else None, stderr


def _store(tmp_path: Path, ids: list[str], shard_size: int = 3):
    manifest = fake_videos(tmp_path, ids)
    store = CountingRecipe(shard_size).open_store(tmp_path / "s.zarr", manifest, None)
    return manifest, store


def _record(store: RowStore, unit: int) -> dict:
    return json.loads((store.ledger_dir / f"unit-{unit:06d}.json").read_text())


# ------------------------------------------------------------------ the units map and retries


def test_a_units_map_byte_that_says_finished_never_hides_failed_rows(tmp_path):
    ids = ["a", "b", "c", "d", "fixable", "e"]
    manifest, store = _store(tmp_path, ids)
    (tmp_path / "fixable.broken").touch()
    assert [f.row for f in run_stage(CountingStage(), store, manifest, [0, 1], QUIET).failures] \
        == [4]  # fmt: skip
    # The byte of unit 1 says "finished, nothing failed" (a damaged byte, or the failed record
    # restored from a backup over a finished one): the record, which has the failed row, wins.
    with open(store.ledger_dir / "units.map", "r+b") as f:
        f.seek(1)
        f.write(b"\x01")
    summary = run_stage(CountingStage(), store, manifest, [0, 1], QUIET)
    assert [f.row for f in summary.failures] == [4]  # still failing: reported, not hidden
    (tmp_path / "fixable.broken").unlink()
    with open(store.ledger_dir / "units.map", "r+b") as f:
        f.seek(1)
        f.write(b"\x01")
    summary = run_stage(CountingStage(), store, manifest, [0, 1], QUIET)
    assert summary.failures == [] and summary.videos_done == 1
    assert store_status(store.path).complete and verify_store(store.path, progress=False) == []


def test_a_retried_row_never_keeps_a_killed_attempts_data(tmp_path):
    ids = ["a", "fixable", "b"]
    manifest, store = _store(tmp_path, ids)
    broken = tmp_path / "fixable.broken"
    broken.touch()
    run_stage(CountingStage(), store, manifest, [0], QUIET)  # row 1 fails
    broken.unlink()
    # The retry computes row 1 and is killed after its shard write, before its record ...
    run = worker(tmp_path, store.path, ids, "workers=0", env={"FAULT_KILL": "synced:1"})
    assert finish(run)[0] == -9
    assert store.read_field("num_frames").tolist() == [2, 2, 2]
    # ... and the video breaks again: the next retry fails it, and its row holds nothing.
    broken.touch()
    code, summary, stderr = finish(worker(tmp_path, store.path, ids, "workers=0"))
    assert code == 1 and summary["failures"][0][:2] == [1, "fixable"], stderr
    assert store.read_field("num_frames").tolist() == [2, 0, 2]
    assert verify_store(store.path, progress=False) == []
    assert _record(store, 0)["attempt"] == 2


def test_concurrent_tasks_retry_a_failed_video_once_per_run(tmp_path):
    ids = ["a", "bad-compute", "b"] + [f"v{i}" for i in range(9)]  # 4 units of 3
    manifest, store = _store(tmp_path, ids)
    run_stage(CountingStage(), store, manifest, [0], QUIET)  # unit 0: row 1 failed
    # Four array tasks of one Slurm job resume the store at once.
    env = {"SLURM_ARRAY_JOB_ID": "4242", "FAULT_DELAY": "0.3"}
    runs = [worker(tmp_path, store.path, ids, "workers=0", f"shard_index={i}", "num_shards=4",
                   env=env) for i in range(4)]  # fmt: skip
    results = [finish(run) for run in runs]
    assert store_status(store.path).units_pending == 0
    assert _record(store, 0)["attempt"] == 2  # one retry, by one of them
    reported = [r for r in results if r[1] and r[1]["failures"]]
    assert len(reported) == 1 and reported[0][0] == 1, results
    assert sorted(r[0] for r in results) == [0, 0, 0, 1]


def test_processes_started_together_by_hand_try_a_failing_video_once(tmp_path):
    ids = ["a", "bad-compute", "b"] + [f"v{i}" for i in range(9)]  # 4 units of 3
    store = _store(tmp_path, ids)[1]
    go = tmp_path / "go"
    env = {"FAULT_DELAY": "1.0", "FAULT_GO": str(go)}  # no run id: told apart by the time
    runs = [worker(tmp_path, store.path, ids, "workers=0", f"shard_index={i}", "num_shards=4",
                   env=env) for i in range(4)]  # fmt: skip
    go.touch()
    results = [finish(run) for run in runs]
    assert store_status(store.path).units_pending == 0
    assert _record(store, 0)["attempt"] == 1, results  # the others found it failed in this run
    assert sorted(r[0] for r in results) == [0, 0, 0, 1]


def test_a_video_that_failed_max_attempts_times_is_reported_and_left(tmp_path):
    ids = ["a", "bad-compute", "b"]
    manifest, store = _store(tmp_path, ids)
    for attempt in (1, 2):
        summary = run_stage(CountingStage(), store, manifest, [0], QUIET)
        assert [f.row for f in summary.failures] == [1] and _record(store, 0)["attempt"] == attempt
    before = _record(store, 0)
    left = run_stage(CountingStage(), store, manifest, [0], RunOptions(0, max_attempts=2,
                                                                        progress=False))
    assert left.units == 0 and [f.row for f in left.failures] == [1]
    assert "after 2 attempts" in left.failures[0].error
    assert _record(store, 0) == before  # not computed again
    code, output = invoke("status", store.path)
    assert code == 0 and "1 failed" in output


# ------------------------------------------------------------------ leases


def _write_lease(store: RowStore, unit: int, content, age: float = 0.0) -> Path:
    path = store.lease_dir / f"unit-{unit:06d}.lease"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    if age:
        then = time.time() - age
        os.utime(path, (then, then))
    return path


def _remote_holder(unit: int) -> dict:
    holder = LeaseHolder("node-9-77-0badc0de", "node-9", "pid:[1]", 77, 1)
    return {"holder": asdict(holder), "unit": unit, "claimed": time.time() - 4000}


@pytest.mark.parametrize("shape", ["{}", "no pid_namespace", "extra field", "not JSON"])
def test_lease_files_of_unexpected_shape_neither_crash_a_run_nor_status(tmp_path, shape):
    manifest, store = _store(tmp_path, ["a", "b", "c", "d", "e", "f"])
    content = _remote_holder(1)
    if shape == "{}":
        content = {}
    elif shape == "no pid_namespace":
        del content["holder"]["pid_namespace"]
    elif shape == "extra field":
        content["holder"]["gpu"] = 3
        content["lease_format"] = 2
    else:
        content = '{"holder": {"id": "x", "ho'
    _write_lease(store, 1, content, age=3600)
    status = store_status(store.path)
    assert len(status.in_progress) + len(status.abandoned) == 1
    summary = run_stage(CountingStage(), store, manifest, [0, 1],
                        RunOptions(workers=0, lease_timeout=60, progress=False))  # fmt: skip
    assert summary.units == 2 and store_status(store.path).complete
    assert not list(store.lease_dir.glob("unit-*.lease"))


def test_a_kill_between_record_and_release_leaves_no_lease_for_ever(tmp_path):
    ids = ["a", "b", "c", "d", "e", "f"]
    manifest, store = _store(tmp_path, ids)
    run = worker(tmp_path, store.path, ids, "workers=0", env={"FAULT_KILL": "marked:2"})
    assert finish(run)[0] == -9
    assert store_status(store.path).complete  # both units recorded; unit 1's lease is left
    [left] = store_status(store.path).abandoned
    assert left.startswith("unit 1: ") and "the next run removes it" in left
    code, summary, stderr = finish(worker(tmp_path, store.path, ids, "workers=0"))
    assert code == 0 and summary["units_skipped"] == 2, stderr
    assert not list(store.lease_dir.glob("unit-*.lease"))
    status = store_status(store.path)
    assert status.abandoned == [] and status.in_progress == []


def test_status_tells_a_remote_holder_without_heartbeat_from_one_in_progress(tmp_path):
    _, store = _store(tmp_path, ["a", "b", "c", "d", "e", "f"])
    _write_lease(store, 0, _remote_holder(0), age=3600)
    _write_lease(store, 1, {**_remote_holder(1), "claimed": time.time() - 30}, age=5)
    status = store_status(store.path)
    assert [s.split(":")[0] for s in status.in_progress] == ["unit 1"]
    assert [s.split(":")[0] for s in status.abandoned] == ["unit 0"]
    assert "no heartbeat for 3600 s" in status.abandoned[0]
    code, output = invoke("status", store.path)
    assert code == 0 and "in progress: unit 1" in output
    assert "dead holder: unit 0" in output and "any run takes the unit over" in output


def test_the_dask_summary_counts_units_other_processes_finished(tmp_path):
    from dask.distributed import Client, LocalCluster

    ids = [f"v{i}" for i in range(12)]
    manifest = fake_videos(tmp_path, ids)
    out = tmp_path / "s.zarr"
    gate = tmp_path / "gate"

    def blocker(path):  # holds the only worker until the gate file appears
        while not Path(path).exists():
            time.sleep(0.02)

    with LocalCluster(n_workers=1, threads_per_worker=1, dashboard_address=None) as cluster, \
            Client(cluster) as client:  # fmt: skip
        held = client.submit(blocker, str(gate), pure=False)
        found = {}

        def client_run():
            found["summary"] = extract(CountingRecipe(3), manifest, out, executor="dask",
                                       scheduler=cluster.scheduler_address, progress=False)

        thread = threading.Thread(target=client_run)
        thread.start()
        deadline = time.time() + 120
        while sum(str(k).startswith("UnitTask") for k in cluster.scheduler.tasks) < 4:
            assert time.time() < deadline and thread.is_alive()
            time.sleep(0.05)
        # Submitted, waiting for the worker: another process finishes units 1..3 meanwhile.
        store = RowStore.open(out, writable=True)
        run_stage(CountingStage(), store, manifest, [1, 2, 3], QUIET)
        gate.touch()
        thread.join(120)
        held.result()
    summary = found["summary"]
    assert summary.units == 1 and summary.videos_done == 3
    assert summary.units_skipped == 3  # finished by the other process during the run


# ------------------------------------------------------------------ damaged files: one line each


def _finished(tmp_path: Path, ids=("a", "b", "c", "d", "e", "f")):
    manifest, store = _store(tmp_path, list(ids))
    run_stage(CountingStage(), store, manifest, range(len(store.shards())), QUIET)
    return manifest, store


def _one_error_line(output: str) -> str:
    lines = output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), output
    return lines[0]


@pytest.mark.parametrize("damaged", ["ledger/unit-000001.json", "zarr.json",
                                     "num_frames/zarr.json"])  # fmt: skip
def test_a_damaged_record_or_zarr_json_is_named_in_one_line(tmp_path, damaged):
    manifest, store = _finished(tmp_path)
    path = store.path / damaged
    path.write_text(path.read_text()[:40])
    copy = tmp_path / "copy.zarr"
    # status, verify, diff and a resumed run each name the file, exit 2
    for args in (["status", store.path], ["verify", store.path, "--no-progress"],
                 ["diff", store.path, store.path, "--no-progress"]):  # fmt: skip
        code, output = invoke(*args)
        line = _one_error_line(output)
        assert code == 2 and str(path) in line, (args, output)
    with pytest.raises(ValueError, match=str(path)):
        extract(CountingRecipe(3), manifest, store.path, workers=0, progress=False)
    assert not copy.exists()


def test_a_units_map_that_is_a_folder_is_named_with_what_to_do(tmp_path):
    manifest, store = _finished(tmp_path)
    (store.ledger_dir / "units.map").unlink()
    (store.ledger_dir / "units.map").mkdir()
    with pytest.raises(ValueError, match="units.map: not a file") as error:
        extract(CountingRecipe(3), manifest, store.path, workers=0, progress=False)
    assert "remove it" in str(error.value)


def test_verify_after_an_interrupted_commit_says_that_a_plain_rerun_mends_it(tmp_path):
    ids = ["a", "b", "c", "d", "e", "f"]
    _, store = _store(tmp_path, ids)
    assert finish(worker(tmp_path, store.path, ids, "workers=0",
                         env={"FAULT_KILL": "synced:1"}))[0] == -9  # fmt: skip
    code, output = invoke("verify", store.path, "--no-progress")
    assert code == 3
    last = output.strip().splitlines()[-1]
    assert "rerun the extraction" in last and "delete" not in last, output
    assert finish(worker(tmp_path, store.path, ids, "workers=0"))[0] == 0
    assert invoke("verify", store.path, "--no-progress")[0] == 0


def test_a_store_written_mid_way_never_shows_num_frames_before_the_rest(tmp_path, monkeypatch):
    """A plain Zarr reader, looking after every array write of a shard: a row whose num_frames
    is set has its other per-row fields (view_seed here, frame_size in tracks) set too."""
    ids = ["a", "fixable", "c", "d"]
    manifest, store = _store(tmp_path, ids, shard_size=2)
    seen = []
    original = zarr.Array.__setitem__

    def setitem(self, selection, value):
        original(self, selection, value)
        group = zarr.open_group(str(store.path), mode="r")
        written = group["num_frames"][:] > 0
        seen.append(written.sum())
        assert (group["view_seed"][:][written] >= 0).all(), "num_frames set before view_seed"
        assert (group["frames"][:][written] >= 0).all(), "num_frames set before frames"

    monkeypatch.setattr(zarr.Array, "__setitem__", setitem)
    run_stage(CountingStage(), store, manifest, [0, 1], QUIET)
    assert max(seen) == 4


@pytest.fixture(scope="module")
def small_tracks(tracks_dataset, tmp_path_factory):
    """A manifest of 4 of the stage tests' videos and its LK tracks store (2 units)."""
    folder = tmp_path_factory.mktemp("small_tracks")
    manifest = folder / "m.csv"
    write_manifest(list(read_manifest(tracks_dataset).rows)[:4], manifest)
    extract_tracks(read_manifest(manifest), folder / "tracks.zarr", LK_SMALL, workers=0,
                   progress=False)  # fmt: skip
    pixels = FeaturesConfig(backbone="pixels", views=1, preprocess=Preprocess(size=56),
                            shard_size=2)  # fmt: skip
    extract_features(read_manifest(manifest), folder / "features.zarr", pixels, workers=0,
                     progress=False)  # fmt: skip
    return manifest, folder / "tracks.zarr"


@pytest.mark.parametrize("tree", [0, 1])  # the root group's B-tree, a dataset's
def test_import_h5_of_a_file_damaged_inside_says_so_exit_2(small_tracks, tmp_path, tree):
    manifest, store = small_tracks
    export = export_h5(store, read_manifest(manifest), tmp_path / "t.h5")
    data = bytearray(export.read_bytes())
    at = [m.start() for m in re.finditer(b"TREE", data)][tree]
    data[at : at + 4] = b"XXXX"  # the header stays valid
    export.write_bytes(data)
    code, output = invoke("import-h5", export, "--out", tmp_path / "back.zarr")
    line = _one_error_line(output)
    assert code == 2 and str(export) in line and "damaged" in line, output
    assert "rerun" not in line
    assert not (tmp_path / "back.zarr").exists() and not list(tmp_path.glob(".back.zarr*"))


def test_a_changed_manifest_is_refused_naming_its_first_changed_row(small_tracks, tmp_path):
    manifest, store = small_tracks
    rows = list(read_manifest(manifest).rows)
    changed = tmp_path / "m.csv"
    rows[2] = VideoRow(2, rows[2].video_id, rows[3].path, rows[2].label, rows[2].split, {})
    write_manifest(rows, changed)
    code, output = invoke("tracks", "--manifest", changed, "--out", store, "--tracker", "lk",
                          "--grid", "8", "--shard-size", "2", "--no-progress")  # fmt: skip
    line = _one_error_line(output)
    assert code == 2 and "row 2" in line and rows[2].video_id in line, output
    assert rows[3].path.name in line
    # training and diff name it alike
    with pytest.raises(ValueError, match=f"row 2 .*{rows[3].path.name}"):
        EpisodeData.open(store, store.parent / "features.zarr", changed)
    code, output = invoke("diff", store, store, "--manifest", changed, "--no-progress")
    assert code == 2 and "row 2" in _one_error_line(output)
    shorter = tmp_path / "short.csv"
    write_manifest(list(read_manifest(manifest).rows)[:3], shorter)
    with pytest.raises(ValueError, match="3 rows, the store's manifest has 4"):
        extract_tracks(read_manifest(shorter), store, LK_SMALL, workers=0, progress=False)
