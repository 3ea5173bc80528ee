"""`tats run`: the whole chain in one command, and a rerun that resumes instead of redoing."""

import json
import subprocess
import sys
from pathlib import Path

TATS = str(Path(sys.executable).parent / "tats")
SMALL_MODEL = {
    "width": 16, "heads": 2, "lr": 1e-3, "warmup_epochs": 0, "lr_steps": [],
    "train_queries": 2, "episodes": 6, "epochs": 2, "val_episodes": 6, "test_episodes": 20,
    "workers": 0,
}  # fmt: skip


def test_run_chains_the_stages_and_resumes(synth_dataset, tmp_path):
    config = tmp_path / "train.json"
    config.write_text(json.dumps({**SMALL_MODEL, "way": 3}))
    command = [
        TATS, "run", "--manifest", str(synth_dataset), "--out", str(tmp_path / "run"),
        "--tracker", "lk", "--grid", "6", "--backbone", "pixels", "--views", "2",
        "--workers", "0", "--train-config", str(config), "--no-progress",
    ]  # fmt: skip
    first = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr
    assert "tracks: 72 videos done" in first.stdout
    assert "features: 72 videos done" in first.stdout
    metrics = json.loads((tmp_path / "run" / "train" / "metrics.json").read_text())
    assert metrics["test"]["episodes"] == 20 and len(metrics["history"]) == 2
    assert (tmp_path / "run" / "train" / "plots" / "confusion.png").is_file()
    weights = (tmp_path / "run" / "train" / "checkpoints" / "best.pt").read_bytes()

    again = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr
    assert "tracks: 0 videos done, 0 failed in 0 units, 2 units already done" in again.stdout
    assert "features: 0 videos done, 0 failed in 0 units, 2 units already done" in again.stdout
    assert "resuming" in again.stdout
    assert (tmp_path / "run" / "train" / "checkpoints" / "best.pt").read_bytes() == weights


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
    assert trokens.returncode == 2 and "classes with at least 7 usable" in trokens.stderr
    config = RowStore.open(tmp_path / "trokens" / "tracks.zarr", TRACKS).provenance["config"]
    assert config["queries"] == "semantic" and config["semantic"]["backbone"] == "pixels"
    # --queries overrides the preset's; training still gets the rest of it (cluster sampling).
    config = tmp_path / "train.json"
    config.write_text(json.dumps({**SMALL_MODEL, "way": 3}))
    command[command.index(str(manifest))] = str(synth_dataset)
    grid = subprocess.run([*command, "--queries", "uniform:8", "--grid", "6", "--out",
                           str(tmp_path / "grid"), "--train-config", str(config)],
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    assert grid.returncode == 2, grid.stderr
    assert "cluster sampling needs each point's cluster" in grid.stderr
    config = RowStore.open(tmp_path / "grid" / "tracks.zarr", TRACKS).provenance["config"]
    assert config["queries"] == "uniform:8"
