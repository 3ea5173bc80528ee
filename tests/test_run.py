"""`tats run`: the whole chain in one command (a recipe's), a rerun that resumes instead of
redoing, and a run folder that `tats report` reads from anywhere, moved or copied."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import zarr

TATS = str(Path(sys.executable).parent / "tats")
SMALL_MODEL = {
    "width": 16, "heads": 2, "lr": 1e-3, "warmup_epochs": 0, "lr_steps": [],
    "train_queries": 2, "episodes": 6, "epochs": 2, "val_episodes": 6, "test_episodes": 20,
    "workers": 0,
}  # fmt: skip


@pytest.fixture(scope="module")
def project(synth_dataset, tmp_path_factory):
    """`tats run --recipe tats/k100` (16 stored frames) on a copy of the synthetic dataset, with
    the weight-free tracker and backbone and a tiny model, as a user runs it: from the project
    folder (`--manifest data/manifest.csv`, relative) into an absolute `--out`. The project is
    then moved elsewhere: where the run was made no longer exists."""
    made = tmp_path_factory.mktemp("made") / "project"
    shutil.copytree(synth_dataset.parent, made / "data")
    (made / "train.json").write_text(json.dumps({**SMALL_MODEL, "way": 3}))
    command = [
        TATS, "run", "--recipe", "tats/k100", "--manifest", "data/manifest.csv", "--out",
        str(made / "run"), "--tracker", "lk", "--grid", "6", "--backbone", "pixels", "--views",
        "2", "--workers", "0", "--train-config", "train.json", "--no-progress",
    ]  # fmt: skip
    first = subprocess.run(command, capture_output=True, text=True, timeout=900, cwd=made)
    assert first.returncode == 0, first.stderr
    moved = tmp_path_factory.mktemp("moved") / "project"
    shutil.move(made, moved)
    return {"path": moved, "made": made, "command": command, "first": first}


def test_a_recipe_runs_the_chain_and_a_rerun_resumes(project, tmp_path):
    run = project["path"] / "run"
    stdout = project["first"].stdout
    assert "tracks: 72 videos done" in stdout and "features: 72 videos done" in stdout
    # The recipe's values where the command line and the file give none; theirs where they do.
    record = json.loads((run / "run.json").read_text())
    assert record["recipe"] == "tats/k100" and record["method"] == "tats"
    tracks, features = record["stages"]["tracks"], record["stages"]["features"]
    assert tracks["frames"] == features["frames"] == 16  # k100_longer_steps.yaml NUM_FRAMES
    assert tracks["queries"] == "uniform:8" and tracks["grid"] == 6 and features["views"] == 2
    train = record["trainings"]["train"]
    assert (train["episodes"], train["epochs"], train["way"]) == (6, 2, 3)  # the file's
    assert zarr.open_group(run / "tracks.zarr", mode="r")["positions"].shape[1] == 16
    assert zarr.open_group(run / "features.zarr", mode="r")["features"].shape[2] == 16
    # A recipe runs the release: its protocol (the last epoch tested), no fix; run.json says
    # so, and which options came from the command line.
    assert record["protocol"] == "release" and record["fixes"]["on"] == []
    assert train["seed"] == 0 and train["fixes"] == []  # TATs' RNG_SEED 0
    given = record["command_line"]
    assert given["recipe"] == "tats/k100" and given["tracker"] == "lk" and given["views"] == 2
    assert "fixes" not in given and "epochs" not in given  # a default, and the file's
    metrics = json.loads((run / "train" / "metrics.json").read_text())
    assert metrics["test"]["episodes"] == 20 and len(metrics["history"]) == 2
    assert metrics["test"]["checkpoint"] == "last"
    assert (run / "train" / "plots" / "confusion.png").is_file()
    weights = (run / "train" / "checkpoints" / "best.pt").read_bytes()

    # The same command in a copy of the project resumes every stage: nothing is redone.
    copy = tmp_path / "project"
    shutil.copytree(project["path"], copy)
    command = [str(copy / "run") if a == str(project["made"] / "run") else a
               for a in project["command"]]  # fmt: skip
    again = subprocess.run(command, capture_output=True, text=True, timeout=900, cwd=copy)
    assert again.returncode == 0, again.stderr
    assert "tracks: 0 videos done, 0 failed in 0 units, 2 units already done" in again.stdout
    assert "features: 0 videos done, 0 failed in 0 units, 2 units already done" in again.stdout
    assert "resuming" in again.stdout
    assert (copy / "run" / "train" / "checkpoints" / "best.pt").read_bytes() == weights


def report(run_dir: Path, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([TATS, "report", str(run_dir)], capture_output=True, text=True,
                          timeout=600, cwd=cwd)  # fmt: skip


def test_report_works_from_another_directory(project, tmp_path):
    run = project["path"] / "run"
    result = report(run, cwd=tmp_path)  # the manifest was given relative to the project
    assert result.returncode == 0, result.stderr
    text = (run / "report.md").read_text()
    assert "72 videos of" in text and "![tracks of" in text
    protocol = "release: validated on the test split every 5 epochs, the last epoch tested"
    assert f"| {protocol} | none |" in text
    assert "Given on the command line" in text and "`tracker=lk`" in text


def test_report_works_on_a_moved_run_folder(project):
    # The project was moved after its run: the stores are not where they were made.
    assert not project["made"].exists()
    result = report(project["path"] / "run", cwd=project["path"])
    assert result.returncode == 0, result.stderr
    assert (project["path"] / "run" / "report" / "tracks.png").is_file()


def test_report_on_a_copy_reads_the_copys_stores(project, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(project["path"], copy)
    # The original back where it was made, with its tracks store damaged: a report that read
    # the original's stores would fail (or draw the original's tracks).
    shutil.copytree(project["path"], project["made"])
    try:
        shutil.rmtree(project["made"] / "run" / "tracks.zarr")
        result = report(copy / "run", cwd=tmp_path)
    finally:
        shutil.rmtree(project["made"])
    assert result.returncode == 0, result.stderr
    assert (copy / "run" / "report" / "tracks.png").is_file()


def test_report_finds_the_manifest_of_a_run_folder_moved_alone(project, tmp_path):
    alone = tmp_path / "alone"
    shutil.copytree(project["path"] / "run", alone)  # without the project's data beside it
    shutil.copytree(project["path"] / "data", project["made"] / "data")  # where it was
    try:
        result = report(alone, cwd=tmp_path)  # the manifest: at its absolute path
    finally:
        shutil.rmtree(project["made"])
    assert result.returncode == 0, result.stderr
    # Without the manifest anywhere: one line naming where it was looked for, exit 2.
    result = report(alone, cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.startswith(f"error: {alone / 'run.json'}: the run's manifest is not at")
    assert f"{project['made'] / 'data' / 'manifest.csv'} (not found)" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_run_method_presets_reach_the_tracks_and_the_trainer(synth_dataset, tmp_path):
    from tats.manifest import read_manifest, write_manifest
    from tats.stores import TRACKS, RowStore

    manifest = tmp_path / "few.csv"  # one video per class: enough to extract, not to train
    write_manifest([r for r in read_manifest(synth_dataset).rows if r.row % 6 == 0], manifest)
    command = [
        TATS, "run", "--manifest", str(manifest), "--tracker", "lk", "--backbone", "pixels",
        "--views", "1", "--workers", "0", "--no-progress", "--method", "trokens",
    ]  # fmt: skip
    trokens = subprocess.run([*command, "--out", str(tmp_path / "trokens")], capture_output=True,
                             text=True, timeout=600)  # fmt: skip
    # checked before any work: nothing extracted for a run that cannot train
    assert trokens.returncode == 2 and "5-way episodes need 5" in trokens.stderr
    assert not (tmp_path / "trokens").exists()
    config = tmp_path / "train.json"
    config.write_text(json.dumps({**SMALL_MODEL, "way": 3}))
    command[command.index(str(manifest))] = str(synth_dataset)
    shown = subprocess.run([*command, "--out", str(tmp_path / "shown"), "--train-config",
                            str(config), "--print-config"],
                           capture_output=True, text=True, timeout=600)  # fmt: skip
    assert shown.returncode == 0, shown.stderr
    shown = json.loads(shown.stdout[shown.stdout.index("{"):])
    tracks = shown["stages"]["tracks"]
    assert tracks["queries"] == "semantic" and tracks["semantic"]["backbone"] == "pixels"
    assert shown["trainings"]["train"]["cluster_sampling"] is True
    # --queries overrides the preset's, whose cluster sampling then has no clusters to read:
    # refused before any work.
    grid = subprocess.run([*command, "--queries", "uniform:8", "--grid", "6", "--out",
                           str(tmp_path / "grid"), "--train-config", str(config)],
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    assert grid.returncode == 2, grid.stderr
    assert grid.stderr.startswith("error: --method trokens: cluster sampling reads each "
                                  "point's cluster"), grid.stderr  # fmt: skip
    assert not (tmp_path / "grid").exists()
    # With the file turning it off, the rest of the preset stands over grid tracks.
    config.write_text(json.dumps({**SMALL_MODEL, "way": 3, "cluster_sampling": False}))
    grid = subprocess.run([*command, "--queries", "uniform:8", "--grid", "6", "--out",
                           str(tmp_path / "grid"), "--train-config", str(config)],
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    assert grid.returncode == 0, grid.stderr
    tracks = RowStore.open(tmp_path / "grid" / "tracks.zarr", TRACKS).provenance["config"]
    assert tracks["queries"] == "uniform:8"
    trained = json.loads((tmp_path / "grid" / "train" / "config.json").read_text())
    assert (trained["mask"], trained["motion"]) == ("visible", "both")  # the preset's


def test_the_chain_is_a_library_call(synth_dataset, tmp_path):
    """`resolve_run` + `run_chain`: what the command does, without the command: the checks
    first (a manifest too small to train stops before any work), then both stages and
    training."""
    from tats.chain import resolve_run, run_chain
    from tats.manifest import read_manifest, write_manifest

    rows = read_manifest(synth_dataset).rows
    stages = {"frames": 4, "tracks": {"tracker": "lk", "grid": 4},
              "features": {"backbone": "pixels", "views": 1}, "workers": 0,
              "progress": False}  # fmt: skip
    manifest = tmp_path / "few.csv"
    write_manifest([r for r in rows if r.row % 12 == 0], manifest)
    config = resolve_run(manifest, tmp_path / "few", recipe="tats/ssv2_small",
                         train={"way": 3}, **stages)  # fmt: skip
    assert config.train.episodes == 2000 and config.tracks.frames == config.features.frames == 4
    seen = []

    def report(stage, summary):
        seen.append((stage, summary.videos_done))

    with pytest.raises(ValueError, match="3-way episodes need 3"):
        run_chain(config, report=report)
    assert seen == [] and not (tmp_path / "few").exists()
    manifest = tmp_path / "all.csv"
    write_manifest(list(rows), manifest)
    config = resolve_run(manifest, tmp_path / "run", train={**SMALL_MODEL, "way": 3}, **stages)
    result = run_chain(config, report=report)
    assert seen == [("tracks", len(rows)), ("features", len(rows))]
    assert result.train.test is not None
    record = json.loads((tmp_path / "run" / "run.json").read_text())
    assert record["manifest"] == "../all.csv" and record["tracks"] == "tracks.zarr"
    positions = zarr.open_group(tmp_path / "run" / "tracks.zarr", mode="r")["positions"]
    assert positions.shape[1] == 4 and np.isfinite(positions[:]).all()
