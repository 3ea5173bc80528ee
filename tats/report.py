"""A run folder's report (report.md).

    write_report("runs/demo")                     # runs/demo/report.md

The report reads what a `tats run` folder holds: every training folder in it (a `metrics.json`
with test results: `train/`, and e.g. an appearance-only `baseline/`), their plots, and
`timings.json`; it draws the stored tracks of one test clip (`tats.viz.render_tracks`) into
`report/`. Links are relative, so the folder reads the same on any Git host. The manifest and
stores are found from the folder's run.json (`tats.chain.run_inputs`): the report works from
any directory, on a moved folder, and on a copy (whose own stores it reads).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

from tats.timings import read_timings

REPORT = "report.md"
MODEL_NAMES = {
    "tracks": "trajectory tokens (TATs)",
    "frozen": "appearance only (`--tracks-mode frozen`: a fixed grid of points)",
}


def stage_seconds(entries: list[dict]) -> dict[str, float]:
    """Seconds per stage, summed over its runs, in the order the stages first ran."""
    total: dict[str, float] = {}
    for entry in sorted(entries, key=lambda e: e["started"]):
        total[entry["stage"]] = total.get(entry["stage"], 0.0) + entry["seconds"]
    return total


# ---------------------------------------------------------------------------------------------
# The report


@dataclass(frozen=True)
class TrainedModel:
    """One training folder of a run: its config and test result (metrics.json)."""

    folder: Path
    metrics: dict

    @property
    def config(self) -> dict:
        return self.metrics["config"]

    @property
    def test(self) -> dict:
        return self.metrics["test"]

    @property
    def name(self) -> str:
        method = self.config.get("method")
        base = MODEL_NAMES.get(self.config["tracks_mode"], self.config["tracks_mode"])
        if method not in (None, "tats"):
            base = base.replace("TATs", str(method))
        return base


def trained_models(run_dir: Path) -> list[TrainedModel]:
    """The training folders directly in `run_dir` whose metrics.json holds test results,
    trajectory models first, then by folder name."""
    models = []
    for path in sorted(run_dir.glob("*/metrics.json")):
        metrics = json.loads(path.read_text())
        if metrics.get("test"):
            models.append(TrainedModel(path.parent, metrics))
    return sorted(models, key=lambda m: (m.config["tracks_mode"] != "tracks", m.folder.name))


def _minutes(seconds: float) -> str:
    minutes, rest = divmod(round(seconds), 60)
    return f"{minutes} min {rest:02d} s" if minutes else f"{rest} s"


def write_report(
    run_dir: str | Path, started: float | None = None, video_id: str | None = None
) -> Path:
    """Write `run_dir/report.md`: the test accuracy of every trained model (mean +- 95% CI,
    chance level), the stored tracks of a test clip (`video_id`, default: the first test
    video), each model's curves and confusion matrix, and the time of each stage. `started`
    (a Unix time): also the wall time from then to now, and what no stage clock timed."""
    from tats.chain import run_inputs
    from tats.manifest import read_manifest
    from tats.pipeline.status import done_rows
    from tats.stores import TRACKS, RowStore
    from tats.viz import render_tracks

    run_dir = Path(run_dir)
    if (run_dir / REPORT).is_dir():
        raise ValueError(f"{run_dir / REPORT}: a folder; the report is written as this file")
    models = trained_models(run_dir)
    if not models:
        raise FileNotFoundError(f"{run_dir}: no training folder with test results (metrics.json)")
    first = models[0]
    inputs = run_inputs(run_dir)  # a `tats run` folder: paths resolved from the folder
    if inputs is None:  # a tats-train folder: its config's paths
        manifest = read_manifest(first.config["manifest"])
        store = Path(first.config["tracks"])
    else:
        manifest, store = inputs.manifest, inputs.tracks
    test = first.test
    way, shot = test["way"], test["shot"]
    lines = [
        f"# Report: {run_dir.as_posix()}",
        "",
        f"{len(manifest.rows)} videos of `{manifest.path}`: "
        + ", ".join(f"{len(manifest.classes(s))} {s}" for s in ("train", "val", "test"))
        + " classes; the test classes are never trained on.",
        "",
    ]
    lines += _how_run(run_dir, models)
    lines += [
        "## Test accuracy",
        "",
        f"{way}-way {shot}-shot episodes, mean +- 95% confidence interval over the episodes "
        f"(1.96 std / sqrt(episodes)); chance is {100 / way:.1f}%. The checkpoint the "
        "protocol tests comes first; the other one (best or last epoch) where it is of another "
        "epoch.",
        "",
        "| model | folder | test accuracy (checkpoint) | episodes | best epoch (val accuracy) "
        "| the other checkpoint |",
        "|---|---|---|---|---|---|",
    ]
    best = max(m.test["accuracy"] for m in models)
    for model in models:
        t, m = model.test, model.metrics
        val = m.get("best_val_accuracy")
        val_text = "" if val is None else f" ({val:.1f}%)"
        accuracy = f"{t['accuracy']:.1f} +- {t['ci95']:.1f}%"
        accuracy = f"**{accuracy}**" if t["accuracy"] == best else accuracy
        other = m.get("other_test")
        other_text = "the same epoch" if other is None else (
            f"{other['accuracy']:.1f} +- {other['ci95']:.1f}% ({other['checkpoint']})"
        )  # fmt: skip
        lines.append(
            f"| {model.name} | `{model.folder.name}/` | {accuracy} ({t.get('checkpoint', 'best')}) "
            f"| {t['episodes']} {t['way']}-way {t['shot']}-shot | {m['best_epoch']}{val_text} "
            f"| {other_text} |"
        )
    lines.append("")
    lines += _comparison(models)

    if video_id is None:  # the first test video the tracks store holds
        done = set(done_rows(RowStore.open(store, TRACKS)).tolist())
        video_id = next((r.video_id for r in manifest.split_rows("test") if r.row in done), None)
        if video_id is None:
            raise ValueError(f"{store}: holds no finished test video to draw")
    picture = render_tracks(store, manifest, video_id, run_dir / "report" / "tracks.png",
                            side=192)  # fmt: skip
    lines += [
        "## What the tracker stored for a test clip",
        "",
        f"`{video_id}`: the points of `{store.name}` over the stored frames; colour = query "
        "frame, filled = visible, hollow = not visible, trails over the last 3 stored frames "
        f"(`tats viz tracks --video-id {video_id}`).",
        "",
        f"![tracks of {video_id}]({picture.relative_to(run_dir).as_posix()})",
        "",
        "## Training",
        "",
    ]
    for model in models:
        plots = model.folder / "plots"
        lines += [f"### {model.name} (`{model.folder.name}/`)", ""]
        for name, what in (("loss", "loss"), ("accuracy", "accuracy"), ("confusion", "confusion")):
            if (plots / f"{name}.png").is_file():
                lines.append(
                    f"![{what}]({(plots / f'{name}.png').relative_to(run_dir).as_posix()})"
                )
        lines.append("")
    lines += _times(run_dir, started)
    path = run_dir / REPORT
    tmp = run_dir / f".{REPORT}.tmp"
    tmp.write_text("\n".join(lines).rstrip() + "\n")
    os.replace(tmp, path)
    return path


def _how_run(run_dir: Path, models: list[TrainedModel]) -> list[str]:
    """Each model's protocol and fixes of the releases, and the options given on the command
    line (run.json)."""
    from tats.fixes import FIX_NAMES, describe_fixes

    lines = ["## How it was run", ""]
    record_path = run_dir / "run.json"
    record = json.loads(record_path.read_text()) if record_path.is_file() else {}
    if record.get("recipe"):
        lines += [f"Recipe `{record['recipe']}`.", ""]
    lines += ["| model | protocol | fixes of the releases on | off |", "|---|---|---|---|"]
    for model in models:
        protocol = model.config.get("protocol", "clean")
        what = ("validated on the test split every 5 epochs, the last epoch tested"
                if protocol == "release" else "selected on val, the best epoch tested")  # fmt: skip
        on = model.config.get("fixes", list(FIX_NAMES))
        off = [f for f in FIX_NAMES if f not in on]
        lines.append(
            f"| {model.name} | {protocol}: {what} | {describe_fixes(on)} | "
            f"{describe_fixes(off) if off else 'none'} |"
        )
    given = record.get("command_line")
    if given:
        shown = ", ".join(f"`{k}={v}`" for k, v in given.items())
        lines += ["", f"Given on the command line (the latest `tats run`): {shown}."]
    return lines + [""]


def _comparison(models: list[TrainedModel]) -> list[str]:
    tracks = [m for m in models if m.config["tracks_mode"] == "tracks"]
    frozen = [m for m in models if m.config["tracks_mode"] == "frozen"]
    if not (tracks and frozen):
        return []
    a, b = tracks[0].test, frozen[0].test
    gap = a["accuracy"] - b["accuracy"]
    separated = a["accuracy"] - a["ci95"] > b["accuracy"] + b["ci95"]
    verdict = "the intervals do not overlap" if separated else "the intervals overlap"
    return [
        f"The trajectory model is {gap:+.1f} points from the appearance-only baseline; {verdict}.",
        "",
    ]


def _times(run_dir: Path, started: float | None) -> list[str]:
    entries = read_timings(run_dir)
    if not entries and started is None:
        return []
    seconds = stage_seconds(entries)
    lines = ["## Time", "", "| stage | wall time |", "|---|---|"]
    if started is not None and entries:
        before = min(e["started"] for e in entries) - started
        lines.append(f"| before the first timed stage (`tats synth`) | {_minutes(before)} |")
    lines += [f"| {stage} | {_minutes(s)} |" for stage, s in seconds.items()]
    note = "Each stage's time is summed over its runs (a resumed stage runs again)"
    if started is not None:
        total = time.time() - started
        if entries:
            other = total - before - sum(seconds.values())
            lines.append(f"| other (starting processes, this report) | {_minutes(other)} |")
        lines.append(f"| **all, from the start to this report** | **{_minutes(total)}** |")
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started))
        note += f"; the run started at {when}"
    lines += ["", note + ".", ""]
    return lines
