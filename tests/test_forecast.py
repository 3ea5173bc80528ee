"""`tats run --plan` against a real full run of the same settings on synthetic data.

The plan extracts 6 of 48 clips and projects the whole run; the run is then made for real and
measured. Sizes, files and memory do not depend on the machine's load, so the projection is
held to them directly: store bytes within 25% (compression varies a little from clip to
clip), the stores' files (inodes) exactly, the peak memory of a process within a factor of 2.5.
Time does: the plan's clock and the run's may be minutes apart on a shared machine. So the
projection of time is checked on quantities measured by the same run: the seconds its first
unit of each stage took (its ledger record) projected to the whole stage with the plan's
own formula (load + seconds per video, or per view, x the videos or views of the manifest)
must come within a factor of 2 of the stage's measured wall time (timings.json), which
catches a wrong count of what time grows with (views of training videos against videos, units
against videos) whatever the load. The plan's own clock is printed, not held, except for the
one thing it measures that the run's stages cannot stand in for: the seconds of a training
episode, held to the run's within a factor of 2.5."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from tats.forecast import StageCost, store_inodes
from tats.manifest import SPLITS, read_manifest
from tats.pipeline.ledger import Ledger
from tats.synth import SynthConfig, generate

TATS = str(Path(sys.executable).parent / "tats")
EPISODES = 8  # training episodes an epoch
RECIPE = f"""method = "tats"
dataset = "synth"
[tracks]
tracker = "lk"
grid = 4
subset = 16
shard_size = 8
[features]
backbone = "pixels"
views = 2
shard_size = 8
[train]
way = 3
shot = 1
train_queries = 1
test_queries = 1
episodes = {EPISODES}
epochs = 2
val_episodes = 4
test_episodes = 4
width = 16
heads = 2
workers = 0
"""


def run_measured(command: list[str], cwd: Path) -> tuple[int, str, int]:
    """Run `command`; its exit code, output, and the peak memory of its largest process."""
    with open(cwd / "output.txt", "w") as out:
        process = subprocess.Popen(command, cwd=cwd, stdout=out, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    return process.returncode, (cwd / "output.txt").read_text(), usage.ru_maxrss * 1024


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("forecast")
    config = SynthConfig(classes=12, videos_per_class=4, frames=16, width=64, height=64)
    manifest = generate(config, folder / "data", progress=False)
    (folder / "synth.toml").write_text(RECIPE)
    command = [TATS, "run", "--recipe", "synth.toml", "-m", str(manifest), "-o", "run",
               "--workers", "1", "--no-progress"]  # fmt: skip
    plan = subprocess.run(
        [*command, "--plan", "--plan-clips", "6", "--plan-json", "plan.json", "--time-limit",
         "0:10:00"], cwd=folder, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert plan.returncode == 0, plan.stdout + plan.stderr
    assert not (folder / "run").exists(), "the plan wrote into the run folder"
    code, output, peak = run_measured(command, folder)
    assert code == 0, output
    return {
        "folder": folder, "plan": json.loads((folder / "plan.json").read_text()),
        "printed": plan.stdout, "manifest": read_manifest(manifest), "peak": peak,
    }  # fmt: skip


def stages(runs) -> dict[str, StageCost]:
    return {s["name"]: StageCost(**s) for s in runs["plan"]["stages"]}


def test_the_plan_prints_every_stage_and_the_array_sizes(runs):
    printed = runs["printed"]
    assert "plan for 48 videos (6 units), from 6 of its clips extracted:" in printed
    for line in ("  tracks ", "  features ", "  train ", "slurm tracks: --tasks ",
                 "slurm features: --tasks "):  # fmt: skip
        assert line in printed, line
    print(printed)


def test_store_sizes_and_files_as_projected(runs):
    run = runs["folder"] / "run"
    for name, stage in stages(runs).items():
        store = run / f"{name}.zarr"
        real = sum(p.stat().st_size for p in store.rglob("*") if p.is_file())
        assert 0.75 < stage.bytes / real < 1.25, (name, stage.bytes, real)
        assert stage.files == len(store_inodes(store)), name


def test_peak_memory_as_projected(runs):
    """Within a factor of 2.5: the real run's peak varies with the load it runs under (seen at
    1.3 GB alone and 2.4 GB beside the rest of the suite and a benchmark, against a projected
    1.1 GB; why it grew under load is not pinned down), while a projection off by 3x fails."""
    plan = runs["plan"]
    projected = max([s["peak_rss"] for s in plan["stages"]] + [plan["train"]["peak_rss"]])
    assert 0.4 < projected / runs["peak"] < 2.5, (projected, runs["peak"])


def test_what_time_grows_with_is_counted_as_the_run_counts_it(runs):
    rows = runs["manifest"].rows
    train = int((rows.splits == SPLITS.index("train")).sum())
    costs = stages(runs)
    assert costs["tracks"].items == len(rows) == 48
    assert costs["features"].items == train * 2 + len(rows) - train
    plan_train = runs["plan"]["train"]
    assert plan_train["episodes"] == EPISODES * 2
    # A recipe runs the releases' protocol: validation on the test split every 5 epochs and
    # after the last (epoch 2 here), then the best and the last checkpoints tested.
    test = int((rows.splits == SPLITS.index("test")).sum())
    assert plan_train["clips_embedded"] == test + 2 * test
    assert plan_train["episodes_matched"] == 4 + 2 * 4


def test_the_projection_of_time_holds_on_the_same_runs_measurements(runs):
    """The first unit of each stage of the real run, projected by the plan's formula, against
    that stage's wall time in the same run."""
    run = runs["folder"] / "run"
    timings = {t["stage"]: t["seconds"] for t in json.loads((run / "timings.json").read_text())}
    rows = runs["manifest"].rows
    for name, stage in stages(runs).items():
        with Ledger(run / f"{name}.zarr" / "ledger") as ledger:
            first = ledger.records()[0]
        start, stop = first.rows
        unit = rows.select(range(start, stop))
        if name == "tracks":
            items = len(unit)
        else:
            train = int((unit.splits == SPLITS.index("train")).sum())
            items = train * 2 + len(unit) - train
        same_run = replace(stage, seconds_per_item=first.seconds["total"] / items)
        ratio = same_run.seconds / timings[name]
        print(f"{name}: projected from its first unit {same_run.seconds:.1f} s, measured "
              f"{timings[name]:.1f} s; the plan's own clock said {stage.seconds:.1f} s")
        assert 0.5 < ratio < 2, (name, same_run.seconds, timings[name])


def test_training_is_timed_as_the_trainer_runs_it(runs):
    """The plan's seconds per training episode (the trainer's own epoch on the sample) against
    the real run's, each after its first epoch (whose workers start). Two processes' clocks a
    minute apart: within a factor of 2.5, which a plan that times the model's step alone (4.5x
    too fast here: reads and augmentation left out) does not meet."""
    history = json.loads((runs["folder"] / "run" / "train" / "metrics.json").read_text())
    measured = history["history"][-1]["seconds"] / EPISODES
    projected = runs["plan"]["train"]["seconds_per_episode"]
    print(f"seconds per training episode: projected {projected:.3f}, measured {measured:.3f}")
    assert 0.4 < projected / measured < 2.5, (projected, measured)


def test_a_release_trokens_run_is_planned_with_its_evaluation_episode_by_episode(runs):
    """Trokens' release draws each clip's points anew in every evaluation episode (the fix
    "eval-subset" off): evaluation embeds each episode's clips with it, and the plan counts
    (and times) it so."""
    folder = runs["folder"]
    small = {"way": 3, "train_queries": 1, "test_queries": 1, "episodes": 2, "epochs": 1,
             "val_episodes": 2, "test_episodes": 3, "width": 16, "heads": 2, "workers": 0}
    (folder / "small.json").write_text(json.dumps(small))
    plan = subprocess.run(
        [TATS, "run", "--recipe", "trokens/hmdb", "-m", str(runs["manifest"].path), "-o",
         "trokens", "--tracker", "lk", "--backbone", "pixels", "--views", "1", "--train-config",
         "small.json", "--plan", "--plan-clips", "4", "--plan-json", "trokens.json",
         "--no-progress"], cwd=folder, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert plan.returncode == 0, plan.stdout + plan.stderr
    train = json.loads((folder / "trokens.json").read_text())["train"]
    # The release protocol validates on test at the last epoch, then tests best and last.
    assert train["episodes_matched"] == 2 + 2 * 3
    assert train["clips_embedded"] == (2 + 2 * 3) * 3 * 2
