"""`tats-extract tracks` end to end: resume after SIGKILL, concurrent shares, bad videos."""

import os
import subprocess
from pathlib import Path

import pytest
from stage_helpers import (
    EXTRACT,
    LK_CONFIG,
    LK_OPTIONS,
    arrays,
    assert_each_unit_held_once_at_a_time,
    assert_same,
    break_two_videos,
    finish,
    kill_repeatedly,
    records,
    start,
)

from tats.manifest import read_manifest
from tats.pipeline.leases import read_log
from tats.pipeline.status import store_status, verify_store
from tats.pipeline.tracks import extract_tracks


def _extract(manifest, out, *extra, **kwargs):
    return start("tracks", manifest, out, *LK_OPTIONS, *extra, **kwargs)


def test_killed_runs_resume_to_the_uninterrupted_result(tracks_dataset, tracks_reference, tmp_path):
    options = [*LK_OPTIONS, "--workers", "1"]
    out = tmp_path / "tracks.zarr"
    kills = kill_repeatedly("tracks", tracks_dataset, out, options, seed=7)
    assert kills == 5, "a run finished before the point it was to be killed at"
    before = records(out)
    code, _, stderr = finish(start("tracks", tracks_dataset, out, *options))
    assert code == 0, stderr
    after = records(out)
    assert all(after[name] == text for name, text in before.items()), "a unit was redone"
    assert_same(arrays(out), tracks_reference)
    assert verify_store(out, progress=False) == []
    assert store_status(out).complete


def test_three_shares_started_at_once_build_the_same_store(
    tracks_dataset, tracks_reference, tmp_path
):
    out = tmp_path / "tracks.zarr"
    runs = [
        _extract(tracks_dataset, out, "--shard-index", str(i), "--num-shards", "3",
                 "--workers", "0")  # fmt: skip
        for i in range(3)
    ]
    for run in runs:
        code, _, stderr = finish(run)
        assert code == 0, stderr
    assert_same(arrays(out), tracks_reference)
    assert verify_store(out, progress=False) == []
    # Every unit computed once, by one process at a time.
    held = assert_each_unit_held_once_at_a_time(out)
    assert all(len(spans) == 1 for spans in held.values()) and len(held) == 6


def test_a_slurm_task_id_alone_picks_its_share_of_the_fixed_count(
    tracks_dataset, tracks_reference, tmp_path
):
    out = tmp_path / "tracks.zarr"
    env = {**os.environ, "SLURM_ARRAY_TASK_ID": "2"}  # resubmitted alone: --array=2
    run = _extract(tracks_dataset, out, "--workers", "0", "--num-shards", "3", env=env)
    code, _, stderr = finish(run)
    assert code == 0, stderr
    claims = [e["unit"] for e in read_log(out / "leases") if e["event"] == "claim"]
    assert claims == [4, 5, 1, 0, 3, 2]  # its share, then the others' from their ends
    assert_same(arrays(out), tracks_reference)


def test_corrupt_and_missing_videos_fail_alone(tracks_dataset, tracks_reference, tmp_path):
    manifest = break_two_videos(tracks_dataset, tmp_path, corrupt_row=4, missing_row=9)
    out = tmp_path / "tracks.zarr"
    code, _, stderr = finish(_extract(manifest, out, "--workers", "1"))
    assert code == 1, stderr
    assert "failed row 4" in stderr and "failed row 9" in stderr
    status = subprocess.run([EXTRACT, "status", str(out)], capture_output=True, text=True)
    assert status.returncode == 0
    assert "16 done, 2 failed, 0 pending" in status.stdout
    assert "corrupt.mp4" in status.stdout and "gone.mp4" in status.stdout
    assert verify_store(out, progress=False) == []
    good = [r for r in range(18) if r not in (4, 9)]
    assert_same(arrays(out), tracks_reference, rows=good)
    assert (arrays(out)["num_frames"][[4, 9]] == 0).all()
    # Once the files are repaired, a rerun retries the two failed rows and only them.
    done_before = records(out)
    originals = read_manifest(tracks_dataset).rows
    (tmp_path / "corrupt.mp4").write_bytes(originals[4].path.read_bytes())
    (tmp_path / "gone.mp4").write_bytes(originals[9].path.read_bytes())
    code, stdout, stderr = finish(_extract(manifest, out, "--workers", "0"))
    assert code == 0, stderr
    assert "2 videos done, 0 failed in 2 units, 4 units already done" in stdout
    after = records(out)
    changed = sorted(n for n in after if after[n] != done_before[n])
    assert changed == ["unit-000001.json", "unit-000003.json"]
    assert_same(arrays(out), tracks_reference)
    assert verify_store(out, progress=False) == []


def test_a_store_refuses_another_config(tracks_dataset, tracks_reference, tmp_path):
    out = tmp_path / "tracks.zarr"
    assert finish(_extract(tracks_dataset, out, "--workers", "0"))[0] == 0
    code, _, stderr = finish(_extract(tracks_dataset, out, "--workers", "0", "--frames", "6"))
    assert code == 2
    assert "config.frames: store has 8, this run has 6" in stderr
    assert len(stderr.strip().splitlines()) == 1
    assert_same(arrays(out), tracks_reference)


def test_a_bad_manifest_stops_before_any_work(tmp_path):
    manifest = tmp_path / "manifest.csv"
    manifest.write_text("video_id,path,label,split\na,a.mp4,x,train\na,b.mp4,x,train\n")
    out = tmp_path / "tracks.zarr"
    code, _, stderr = finish(_extract(manifest, out))
    assert code == 2
    assert "manifest.csv:3" in stderr and "duplicate" in stderr
    assert not out.exists()


def test_a_dask_local_cluster_builds_the_same_store(tracks_dataset, tracks_reference, tmp_path):
    out = tmp_path / "tracks.zarr"
    summary = extract_tracks(
        read_manifest(tracks_dataset), out, LK_CONFIG, executor="dask", scheduler="local:2",
        progress=False,
    )
    assert summary.units == 6 and summary.videos_done == 18 and not summary.failures
    assert_same(arrays(out), tracks_reference)
    again = extract_tracks(
        read_manifest(tracks_dataset), out, LK_CONFIG, executor="dask", scheduler="local:2",
        progress=False,
    )
    assert again.units == 0 and again.units_skipped == 6


def test_sbatch_checks_the_stage_options_first(tracks_dataset, tmp_path):
    run = subprocess.run(
        [EXTRACT, "sbatch", "tracks", "--tasks", "2", "--script", str(tmp_path / "s"), "--",
         "--manifest", str(tracks_dataset), "--out", str(tmp_path / "o"), "--grid", "many"],
        capture_output=True, text=True,
    )  # fmt: skip
    assert run.returncode == 2 and "--grid" in run.stderr
    assert not (tmp_path / "s").exists()
    for given in (["--shard-index=0"], ["--num-shards", "4"]):
        run = subprocess.run(
            [EXTRACT, "sbatch", "tracks", "--tasks", "2", "--script", str(tmp_path / "s"), "--",
             "--manifest", str(tracks_dataset), "--out", str(tmp_path / "o"), *given],
            capture_output=True, text=True,
        )  # fmt: skip
        assert run.returncode == 2 and "the array task picks its share" in run.stderr
    assert not (tmp_path / "s").exists()


def test_an_sbatch_script_runs_the_same_from_any_folder(
    tracks_dataset, tracks_reference, tmp_path
):
    """Relative paths on the command line (and an old option name) become absolute paths (and
    the new name) in the script, which changes to the folder it was written from: run from
    another folder, as a resubmitted task may be, it builds the store it was written for."""
    project = tmp_path / "project"
    project.mkdir()
    (project / "videos").symlink_to(tracks_dataset.parent)
    written = subprocess.run(
        [EXTRACT, "sbatch", "tracks", "--tasks", "1", "--script", "tracks.sbatch", "--",
         "--manifest", f"videos/{tracks_dataset.name}", "--out", "tracks.zarr",
         "--checkpoint=none.pth", *LK_OPTIONS, "--workers", "0"],
        cwd=project, capture_output=True, text=True,
    )  # fmt: skip
    assert written.returncode == 0, written.stderr
    script = (project / "tracks.sbatch").read_text()
    command = script.splitlines()[-1]
    assert f"cd {project}" in script.splitlines()
    assert command.startswith(f"exec {Path(EXTRACT).absolute()} tracks ")
    assert f"--manifest {project / 'videos' / tracks_dataset.name} " in command
    assert f"--out {project / 'tracks.zarr'} " in command
    weights = f" --tracker-weights={project / 'none.pth'}"
    assert weights in command and "--checkpoint" not in command
    # the lk tracker takes no weights: drop them, then run the script from elsewhere
    (project / "tracks.sbatch").write_text(script.replace(weights, ""))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    ran = subprocess.run(["bash", str(project / "tracks.sbatch")], cwd=elsewhere,
                         capture_output=True, text=True)  # fmt: skip
    assert ran.returncode == 0, ran.stderr
    assert_same(arrays(project / "tracks.zarr"), tracks_reference)
    assert not any(elsewhere.iterdir())


@pytest.mark.parametrize(
    "stage, missing, weightless",
    [("tracks", "no CoTracker3 offline weights", "--tracker lk needs no weights"),
     ("features", "no weights for backbone 'dinov2_vitb14'", "--backbone pixels needs no weights")],
)  # fmt: skip
def test_the_paper_defaults_without_weights_say_where_to_put_them(
    tracks_dataset, tmp_path, stage, missing, weightless
):
    env = {**os.environ, "TORCH_HOME": str(tmp_path / "torch"), "HF_HOME": str(tmp_path / "hf")}
    out = tmp_path / f"{stage}.zarr"
    code, _, stderr = finish(start(stage, tracks_dataset, out, "--no-progress", env=env))
    assert code == 2
    assert len(stderr.strip().splitlines()) == 1
    assert missing in stderr and weightless in stderr
    assert not out.exists()
