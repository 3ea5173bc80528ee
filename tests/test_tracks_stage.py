"""`tats-extract tracks` end to end: resume after SIGKILL, concurrent shares, bad videos."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from tats.manifest import VideoRow, read_manifest, write_manifest
from tats.pipeline.status import store_status, verify_store
from tats.pipeline.tracks import TracksConfig, extract_tracks
from tats.stores import RowStore
from tats.synth import SynthConfig, generate

EXTRACT = str(Path(sys.executable).parent / "tats-extract")
# Small shards so that a run has several units to be killed between and in.
OPTIONS = ["--tracker", "lk", "--grid", "8", "--shard-size", "3", "--no-progress"]
CONFIG = TracksConfig(tracker="lk", grid=8, shard_size=3)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tracks_stage")
    return generate(SynthConfig(classes=6, videos_per_class=3), out / "synth", progress=False)


@pytest.fixture(scope="module")
def reference(dataset, tmp_path_factory) -> dict[str, np.ndarray]:
    """The arrays of one uninterrupted run (in this process, decoding inline)."""
    out = tmp_path_factory.mktemp("reference") / "tracks.zarr"
    summary = extract_tracks(read_manifest(dataset), out, CONFIG, workers=0, progress=False)
    assert not summary.failures and summary.videos_done == 18
    return _arrays(out)


def _arrays(path) -> dict[str, np.ndarray]:
    store = RowStore.open(path)
    return store.read_rows(range(store.num_rows))


def _assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)


def _extract(manifest, out, *extra, **kwargs) -> subprocess.Popen:
    args = [EXTRACT, "tracks", "--manifest", str(manifest), "--out", str(out), *OPTIONS, *extra]
    return subprocess.Popen(
        args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs
    )


def _records(out: Path) -> dict[str, str]:
    return {p.name: p.read_text() for p in (out / "ledger").glob("unit-*.json")}


def test_killed_runs_resume_to_the_uninterrupted_result(dataset, reference, tmp_path):
    out = tmp_path / "tracks.zarr"
    rng = np.random.default_rng(7)
    finished_before: dict[str, str] = {}
    kills = 0
    while kills < 5:
        run = _extract(dataset, out, "--workers", "1")
        time.sleep(rng.uniform(1.5, 6.0))
        if run.poll() is not None:
            break  # finished before the kill
        run.send_signal(signal.SIGKILL)
        run.wait()
        kills += 1
        records = _records(out) if out.exists() else {}
        # A unit recorded as finished is never extracted again.
        for name, text in finished_before.items():
            assert records[name] == text, f"{name} was redone"
        finished_before = records
    assert kills >= 3, "the runs finished too fast to be killed several times"
    final = _extract(dataset, out, "--workers", "1")
    stdout, stderr = final.communicate(timeout=600)
    assert final.returncode == 0, stderr
    for name, text in finished_before.items():
        assert _records(out)[name] == text, f"{name} was redone"
    _assert_same(_arrays(out), reference)
    assert verify_store(out, progress=False) == []
    assert store_status(out).complete


def test_three_shares_started_at_once_build_the_same_store(dataset, reference, tmp_path):
    out = tmp_path / "tracks.zarr"
    runs = [
        _extract(dataset, out, "--shard-index", str(i), "--num-shards", "3", "--workers", "0")
        for i in range(3)
    ]
    for run in runs:
        _, stderr = run.communicate(timeout=600)
        assert run.returncode == 0, stderr
    _assert_same(_arrays(out), reference)
    assert verify_store(out, progress=False) == []
    # Six units over three processes: two each, in contiguous shares.
    pids = {u: json.loads(t)["pid"] for u, t in _records(out).items()}
    assert len(set(pids.values())) == 3
    assert pids["unit-000000.json"] == pids["unit-000001.json"]


def test_slurm_array_variables_pick_the_share(dataset, reference, tmp_path):
    out = tmp_path / "tracks.zarr"
    for task in (4, 5):  # an array --array=4-5: tasks 4 and 5 of 2
        env = {
            **os.environ,
            "SLURM_ARRAY_TASK_ID": str(task),
            "SLURM_ARRAY_TASK_COUNT": "2",
            "SLURM_ARRAY_TASK_MIN": "4",
        }
        run = _extract(dataset, out, "--workers", "0", env=env)
        _, stderr = run.communicate(timeout=600)
        assert run.returncode == 0, stderr
        assert len(_records(out)) == (3 if task == 4 else 6)
    _assert_same(_arrays(out), reference)


def test_corrupt_and_missing_videos_fail_alone(dataset, reference, tmp_path):
    rows = list(read_manifest(dataset).rows)
    corrupt = tmp_path / "corrupt.mp4"
    corrupt.write_bytes(rows[0].path.read_bytes()[:3000])  # cut off after the header
    rows[4] = VideoRow(4, rows[4].video_id, corrupt, rows[4].label, rows[4].split, {})
    rows[9] = VideoRow(9, rows[9].video_id, tmp_path / "gone.mp4", rows[9].label, rows[9].split, {})
    manifest = tmp_path / "manifest.csv"
    write_manifest(rows, manifest)
    out = tmp_path / "tracks.zarr"
    run = _extract(manifest, out, "--workers", "1")
    stdout, stderr = run.communicate(timeout=600)
    assert run.returncode == 1, stderr
    assert "failed row 4" in stderr and "failed row 9" in stderr
    status = subprocess.run([EXTRACT, "status", str(out)], capture_output=True, text=True)
    assert status.returncode == 0
    assert "16 done, 2 failed, 0 pending" in status.stdout
    assert "corrupt.mp4" in status.stdout and "gone.mp4" in status.stdout
    assert verify_store(out, progress=False) == []
    arrays, expected = _arrays(out), reference
    good = [r for r in range(18) if r not in (4, 9)]
    for name in arrays:
        np.testing.assert_array_equal(arrays[name][good], expected[name][good], err_msg=name)
    assert (arrays["num_frames"][[4, 9]] == 0).all()
    # Once the files are repaired, a rerun retries the two failed rows and only them.
    done_before = _records(out)
    originals = read_manifest(dataset).rows
    corrupt.write_bytes(originals[4].path.read_bytes())
    (tmp_path / "gone.mp4").write_bytes(originals[9].path.read_bytes())
    rerun = _extract(manifest, out, "--workers", "0")
    stdout, stderr = rerun.communicate(timeout=600)
    assert rerun.returncode == 0, stderr
    assert "2 videos done, 0 failed in 2 units, 4 units already done" in stdout
    after = _records(out)
    changed = sorted(n for n in after if after[n] != done_before[n])
    assert changed == ["unit-000001.json", "unit-000003.json"]
    _assert_same(_arrays(out), reference)
    assert verify_store(out, progress=False) == []


def test_a_store_refuses_another_config(dataset, reference, tmp_path):
    out = tmp_path / "tracks.zarr"
    first = _extract(dataset, out, "--workers", "0")
    assert first.wait(timeout=600) == 0
    again = _extract(dataset, out, "--workers", "0", "--frames", "6")
    _, stderr = again.communicate(timeout=600)
    assert again.returncode == 2
    assert "config.frames: store has 8, this run has 6" in stderr
    assert len(stderr.strip().splitlines()) == 1
    _assert_same(_arrays(out), reference)


def test_a_bad_manifest_stops_before_any_work(tmp_path):
    manifest = tmp_path / "manifest.csv"
    manifest.write_text("video_id,path,label,split\na,a.mp4,x,train\na,b.mp4,x,train\n")
    out = tmp_path / "tracks.zarr"
    run = _extract(manifest, out)
    _, stderr = run.communicate(timeout=600)
    assert run.returncode == 2
    assert "manifest.csv:3" in stderr and "duplicate" in stderr
    assert not out.exists()
