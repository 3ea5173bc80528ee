"""Stage one under the faults clusters produce: overlapping workers, kills inside shard writes,
a full disk, replaced videos, lost Dask workers, crashing decoders, orphaned processes.

Each test is a row of the fault table in docs/clusters.md. Processes, stores, files, signals,
Dask clusters and file systems are real; the only test doubles are the decoders of
tests/fault_stages.py, which raise, hang or crash on chosen videos.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from fault_stages import CountingRecipe, fake_videos
from stage_helpers import (
    EXTRACT,
    LK_OPTIONS,
    arrays,
    assert_each_unit_held_once_at_a_time,
    assert_same,
    finish,
    live_children,
    records,
    start,
)

from tats.manifest import read_manifest
from tats.pipeline.executors import extract
from tats.pipeline.ledger import Ledger
from tats.pipeline.status import store_status, verify_store
from tats.stores import tracks_fields


def _alive(pids: set[int]) -> set[int]:
    alive = set()
    for pid in pids:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z":
            alive.add(pid)
    return alive


def test_two_workers_on_the_same_share_compute_each_unit_once(
    tracks_dataset, tracks_reference, tmp_path
):
    out = tmp_path / "tracks.zarr"
    same = ["--shard-index", "0", "--num-shards", "1", "--workers", "1"]
    runs = [start("tracks", tracks_dataset, out, *LK_OPTIONS, *same) for _ in range(2)]
    for run in runs:
        code, _, stderr = finish(run)
        assert code == 0, stderr
    assert_same(arrays(out), tracks_reference)
    held = assert_each_unit_held_once_at_a_time(out)
    assert sorted(held) == list(range(6)) and all(len(spans) == 1 for spans in held.values())
    assert all(json.loads(text)["attempt"] == 1 for text in records(out).values())
    assert len({json.loads(text)["pid"] for text in records(out).values()}) == 2


PAUSE_IN_WRITE = """
import os, pathlib, sys, time
import zarr
calls, after = 0, int(os.environ["PAUSE_AFTER"])
original = zarr.Array.__setitem__
def setitem(self, selection, value):
    global calls
    original(self, selection, value)
    calls += 1
    if calls == after:  # inside a shard write: some of the unit's arrays are written
        pathlib.Path(os.environ["PAUSE_MARKER"]).touch()
        time.sleep(600)
zarr.Array.__setitem__ = setitem
from tats.cli.extract import app
sys.argv[0] = "tats-extract"
app()
"""


def test_a_kill_inside_a_shard_write_resumes_to_the_uninterrupted_result(
    tracks_dataset, tracks_reference, tmp_path
):
    out, marker = tmp_path / "tracks.zarr", tmp_path / "paused"
    per_shard = len(tracks_fields(8, 10, 256))  # array writes per shard
    # The first run is killed in its 2nd shard write (unit 1), the second in its 2nd (unit 2,
    # after redoing unit 1), each after 3 of the shard's arrays were written.
    for kill in range(2):
        env = {**os.environ, "PAUSE_AFTER": str(per_shard + 3), "PAUSE_MARKER": str(marker)}
        run = subprocess.Popen(
            [sys.executable, "-c", PAUSE_IN_WRITE, "tracks", "--manifest", str(tracks_dataset),
             "--out", str(out), *LK_OPTIONS, "--workers", "1"],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        deadline = time.time() + 120
        while not marker.exists():
            assert run.poll() is None, run.communicate()
            assert time.time() < deadline, "the write was never reached"
            time.sleep(0.01)
        run.send_signal(signal.SIGKILL)
        run.wait()
        marker.unlink()
        # Killed inside the write: a shard with some arrays new and no ledger record.
        problems = verify_store(out, progress=False)
        assert problems and all("is not done" in p for p in problems), problems
        assert len(records(out)) == kill + 1
    code, _, stderr = finish(start("tracks", tracks_dataset, out, *LK_OPTIONS, "--workers", "1"))
    assert code == 0, stderr
    assert_same(arrays(out), tracks_reference)
    assert verify_store(out, progress=False) == []
    held = assert_each_unit_held_once_at_a_time(out)
    assert any(len(spans) > 1 for spans in held.values()), "no lease of a killed run was taken"


def test_debris_of_killed_writers_is_removed(tracks_dataset, tracks_reference, tmp_path):
    out = tmp_path / "tracks.zarr"
    assert finish(start("tracks", tracks_dataset, out, *LK_OPTIONS, "--workers", "0"))[0] == 0
    old = time.time() - 3600
    debris = [
        out / "positions" / "c" / "1" / "0" / "0" / "0.3f2a.partial",
        out / "ledger" / ".unit-000002.ab12cd34.tmp",
        out / "leases" / ".unit-000003.lease.host-1-ab12cd34.taken",
        tmp_path / ".tracks.zarr.creating-0123456789ab",
    ]
    fresh = out / "visible" / "c" / "2" / "0" / "0.9e9e.partial"  # a live writer's
    for path in [*debris, fresh]:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"half a shard")
    for path in debris:
        os.utime(path, (old, old))
    run = start("tracks", tracks_dataset, out, *LK_OPTIONS, "--workers", "0")
    code, stdout, stderr = finish(run)
    assert code == 0, stderr
    assert "6 units already done" in stdout
    assert not any(path.exists() for path in debris) and fresh.exists()
    assert_same(arrays(out), tracks_reference)


FULL_DISK = """
set -u
mount -t tmpfs -o size=160k tmpfs "$DISK" || exit 90
"$EXTRACT" tracks --manifest "$MANIFEST" --out "$DISK/tracks.zarr" $LK_OPTIONS --workers 0 \
    > "$LOGS/first.out" 2> "$LOGS/first.err"
echo $? > "$LOGS/first.code"
cp -r "$DISK/tracks.zarr/ledger" "$LOGS/ledger-after-first"
mount -o remount,size=64m "$DISK"
"$EXTRACT" tracks --manifest "$MANIFEST" --out "$DISK/tracks.zarr" $LK_OPTIONS --workers 0 \
    > "$LOGS/second.out" 2> "$LOGS/second.err"
echo $? > "$LOGS/second.code"
"$EXTRACT" verify "$DISK/tracks.zarr" --no-progress > "$LOGS/verify.out" 2>&1
echo $? > "$LOGS/verify.code"
cp -r "$DISK/tracks.zarr" "$LOGS/store"
"""


def test_a_full_disk_stops_with_one_line_and_resumes(tracks_dataset, tracks_reference, tmp_path):
    if shutil.which("unshare") is None:
        pytest.skip("no unshare: cannot mount a small file system for the test")
    disk, logs = tmp_path / "disk", tmp_path / "logs"
    disk.mkdir()
    logs.mkdir()
    env = {**os.environ, "DISK": str(disk), "LOGS": str(logs), "EXTRACT": EXTRACT,
           "MANIFEST": str(tracks_dataset), "LK_OPTIONS": " ".join(LK_OPTIONS)}  # fmt: skip
    # A private mount namespace: a real tmpfs of 160 KiB, without touching the machine's.
    run = subprocess.run(
        ["unshare", "--mount", "--map-root-user", "sh", "-c", FULL_DISK],
        env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    if run.returncode == 90 or "unshare failed" in run.stderr:
        pytest.skip(f"cannot mount a tmpfs here: {run.stderr.strip()}")
    assert run.returncode == 0, run.stderr
    read = {name: (logs / name).read_text() for name in ("first.code", "first.err")}
    assert read["first.code"].strip() == "3", read
    lines = read["first.err"].strip().splitlines()
    assert len(lines) == 1 and "No space left on device" in lines[0], lines
    assert "rerun to resume" in lines[0]
    # What was finished before the disk filled up was kept as it was.
    kept = {p.name: p.read_text() for p in (logs / "ledger-after-first").glob("unit-*.json")}
    assert 0 < len(kept) < 6
    final = records(logs / "store")
    assert all(final[name] == text for name, text in kept.items())
    assert (logs / "second.code").read_text().strip() == "0", (logs / "second.err").read_text()
    assert (logs / "verify.code").read_text().strip() == "0", (logs / "verify.out").read_text()
    assert_same(arrays(logs / "store"), tracks_reference)


def test_a_replaced_video_is_refused_on_resume(tracks_dataset, tmp_path):
    rows = read_manifest(tracks_dataset).rows[:6]
    videos = tmp_path / "videos"
    shutil.copytree(tracks_dataset.parent / "videos", videos)
    manifest = tmp_path / "m.csv"
    manifest.write_text(
        "video_id,path,label,split\n"
        + "".join(f"{r.video_id},videos/{r.path.name},{r.label},{r.split}\n" for r in rows)
    )
    out = tmp_path / "tracks.zarr"
    assert finish(start("tracks", manifest, out, *LK_OPTIONS, "--workers", "0"))[0] == 0
    before = records(out)
    # Copying the dataset (new times, same bytes) still resumes.
    os.utime(videos / rows[1].path.name, (0, 0))
    assert finish(start("tracks", manifest, out, *LK_OPTIONS, "--workers", "0"))[0] == 0
    # A video replaced by another at the same path is refused, by name, and nothing changes.
    shutil.copy(rows[5].path, videos / rows[4].path.name)
    code, _, stderr = finish(start("tracks", manifest, out, *LK_OPTIONS, "--workers", "0"))
    assert code == 2
    assert len(stderr.strip().splitlines()) == 1
    assert f"row 4 ({rows[4].video_id}" in stderr and "videos changed" in stderr
    assert records(out) == before


def test_decoders_do_not_outlive_a_killed_run(tracks_dataset, tmp_path):
    run = start(
        "tracks", tracks_dataset, tmp_path / "tracks.zarr", "--tracker", "lk", "--grid", "16",
        "--shard-size", "3", "--no-progress", "--workers", "2",
    )  # fmt: skip
    deadline = time.time() + 120
    while len(decoders := live_children(run.pid)) < 2:
        assert run.poll() is None, run.communicate()
        assert time.time() < deadline, "the decoders never started"
        time.sleep(0.05)
    run.send_signal(signal.SIGKILL)
    run.wait()
    deadline = time.time() + 5
    while _alive(decoders) and time.time() < deadline:
        time.sleep(0.1)
    assert not _alive(decoders), "decoding processes outlived their killed parent"


def test_sigterm_finishes_the_write_and_releases_the_leases(
    tracks_dataset, tracks_reference, tmp_path
):
    out = tmp_path / "tracks.zarr"
    options = ["--tracker", "lk", "--grid", "16", "--shard-size", "3", "--no-progress"]
    run = start("tracks", tracks_dataset, out, *options, "--workers", "1")
    deadline = time.time() + 120
    while not list((out / "leases").glob("unit-*.lease")):
        assert run.poll() is None and time.time() < deadline
        time.sleep(0.05)
    run.send_signal(signal.SIGTERM)
    code, stdout, stderr = finish(run)
    assert code == 143 and "terminated" in stderr, stdout + stderr
    assert not list((out / "leases").glob("unit-*.lease")), "a lease outlived its holder"
    assert store_status(out).units_pending > 0
    assert not [p for p in verify_store(out, progress=False) if "differs" in p]


def test_a_dask_worker_killed_mid_unit_is_retried_elsewhere(
    tracks_dataset, tracks_reference, tmp_path
):
    out = tmp_path / "tracks.zarr"
    options = ["--tracker", "lk", "--grid", "16", "--shard-size", "3", "--no-progress"]
    dask = ["--executor", "dask", "--scheduler", "local:2"]
    run = start("tracks", tracks_dataset, out, *options, *dask)
    deadline, killed, interrupted = time.time() + 180, [], False
    while not interrupted:
        assert run.poll() is None, run.communicate()
        assert time.time() < deadline, "no unit was ever held"
        for lease in (out / "leases").glob("unit-*.lease") if out.exists() else []:
            try:
                pid = json.loads(lease.read_text())["holder"]["pid"]
            except (OSError, ValueError):
                continue
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)
            # The worker may have finished that unit between the look and the kill: then it
            # was killed idle, and another kill is needed to interrupt a unit.
            record = out / "ledger" / f"{lease.name.removesuffix('.lease')}.json"
            interrupted = not record.exists()
            break
        time.sleep(0.02)
    code, stdout, stderr = finish(run)
    assert code == 0, stderr
    assert "18 videos done, 0 failed" in stdout
    held = assert_each_unit_held_once_at_a_time(out)
    taken = [spans for spans in held.values() if len(spans) > 1]
    assert taken and all(any(f"-{pid}-" in spans[0][2] for pid in killed) for spans in taken)


def test_dask_records_crashing_videos_and_finishes_the_rest(tmp_path):
    ids = ["a", "crash", "b", "kill-worker", "c", "d"]
    manifest = fake_videos(tmp_path, ids)
    out = tmp_path / "s.zarr"
    summary = extract(
        CountingRecipe(3), manifest, out, executor="dask", scheduler="local:2", progress=False
    )
    errors = {f.video_id: f.error for f in summary.failures}
    assert sorted(errors) == ["crash", "kill-worker"]
    assert "the decoder crashed its process 2 times (signal SIGSEGV)" in errors["crash"]
    assert "killed its Dask worker process" in errors["kill-worker"]
    done = sorted(r for rec in Ledger(out / "ledger").records().values() for r in rec.done)
    assert done == [0, 2, 4, 5]
    assert store_status(out).units_pending == 0


def _slurm_is_up() -> bool:
    if shutil.which("sbatch") is None:
        return False
    result = subprocess.run(["sinfo", "-h", "-o", "%t"], capture_output=True, text=True)
    return result.returncode == 0 and "idle" in result.stdout


def _squeue(job: str) -> str:
    return subprocess.run(["squeue", "-h", "-j", job], capture_output=True, text=True).stdout


@pytest.mark.skipif(not _slurm_is_up(), reason="no Slurm here (.ci/slurm-up starts one)")
def test_a_cancelled_array_task_resubmitted_alone_finishes_the_store(tracks_dataset, tmp_path):
    options = ["--tracker", "lk", "--grid", "16", "--shard-size", "2", "--no-progress"]
    whole = tmp_path / "whole.zarr"
    assert finish(start("tracks", tracks_dataset, whole, *options, "--workers", "0"))[0] == 0
    out, script, logs = tmp_path / "tracks.zarr", tmp_path / "tracks.sbatch", tmp_path / "logs"
    submit = subprocess.run(
        [EXTRACT, "sbatch", "tracks", "--tasks", "3", "--cpus-per-task", "1",
         "--script", str(script), "--logs", str(logs), "--submit", "--",
         "--manifest", str(tracks_dataset), "--out", str(out), *options, "--workers", "0"],
        capture_output=True, text=True,
    )  # fmt: skip
    assert submit.returncode == 0, submit.stderr
    job = submit.stdout.split("submitted job ")[1].strip()
    # Cancel the first array task seen holding a unit, mid-run, then resubmit it alone.
    deadline, task = time.time() + 300, None
    while task is None:
        assert time.time() < deadline, "no array task ever held a unit"
        for lease in (out / "leases").glob("unit-*.lease") if out.exists() else []:
            try:
                pid = json.loads(lease.read_text())["holder"]["pid"]
                environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            except (OSError, ValueError):
                continue
            ids = [v for v in environ if v.startswith(b"SLURM_ARRAY_TASK_ID=")]
            task = ids[0].split(b"=")[1].decode()
            break
        time.sleep(0.05)
    subprocess.run(["scancel", f"{job}_{task}"], check=True)
    while f"{job}_{task} " in _squeue(job) or f"{job}_{task}\n" in _squeue(job):
        time.sleep(0.2)
    again = subprocess.run(
        ["sbatch", "--parsable", f"--array={task}", str(script)], capture_output=True, text=True
    )
    assert again.returncode == 0, again.stderr
    rerun = again.stdout.strip().split(";")[0]
    deadline = time.time() + 600
    while _squeue(job) or _squeue(rerun):
        assert time.time() < deadline, "the job array did not finish in 10 minutes"
        time.sleep(1)
    cancelled = (logs / f"tats-tracks-{job}_{task}.out").read_text()
    assert "terminated" in cancelled  # SIGTERM from scancel: it let go of its leases
    assert (logs / f"tats-tracks-{rerun}_{task}.out").exists()
    assert_same(arrays(out), arrays(whole))
    assert verify_store(out, progress=False) == [] and store_status(out).complete
    assert_each_unit_held_once_at_a_time(out)


def test_resume_is_refused_when_the_stores_gained_videos(synth_stores, tmp_path):
    from tats.train import train
    from tats.train_config import config_from_dict

    tracks = tmp_path / "tracks.zarr"
    shutil.copytree(synth_stores.tracks, tracks)
    record = tracks / "ledger" / "unit-000001.json"
    aside = tmp_path / "unit-000001.json"
    shutil.move(record, aside)  # its videos are not done yet when training starts
    options = dict(
        tracks=str(tracks), features=str(synth_stores.features),
        manifest=str(synth_stores.manifest), out=str(tmp_path / "run"), way=3, shot=1,
        train_queries=2, episodes=4, epochs=1, val_episodes=0, test_episodes=0, width=16,
        heads=2, warmup_epochs=0, workers=0,
    )  # fmt: skip
    train(config_from_dict(options))
    shutil.move(aside, record)  # ... and done now: a resumed run would draw other episodes
    with pytest.raises(ValueError, match="trained with 56 usable videos .* this run has 72"):
        train(config_from_dict({**options, "epochs": 2, "resume": True}))
