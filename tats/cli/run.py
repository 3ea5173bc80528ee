"""`tats run`: tracks, features and training in one command, each resuming where it stopped;
`tats recipes`: the published configurations it can run (tats/chain.py, tats/recipes.py)."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from tats.cli import options as opt
from tats.cli.common import OK, SOME_FAILED, graceful_termination, input_errors
from tats.cli.extract import parse_options, report


def run(
    ctx: typer.Context,
    manifest: Path = opt.MANIFEST,
    out: Path = typer.Option(
        ..., "--out", "-o", help="Run folder: tracks.zarr, features.zarr and train/ go here."
    ),
    recipe: str | None = typer.Option(
        None,
        help="A published configuration (`tats recipes` lists them, e.g. trokens/hmdb) or a "
        "recipe TOML file: its values where no option below is given.",
    ),
    print_config: bool = typer.Option(
        False, "--print-config", help="Check the run as a run would (values, names, weights, "
        "splits, videos, disk), print its resolved config (JSON) and exit; no work."
    ),
    plan: bool = typer.Option(
        False, "--plan", help="Extract a handful of the manifest's clips with the resolved "
        "settings on this device, time training and evaluation on them, and print what the "
        "whole run will cost: time per stage, store sizes and files, peak memory, Slurm array "
        "sizes; no work in OUT."
    ),
    plan_clips: int = typer.Option(8, help="--plan: clips extracted to measure."),
    time_limit: str | None = typer.Option(
        None, help="--plan: a Slurm wall-time limit per task (e.g. 12:00:00 for 12 hours): "
        "the array size each stage needs under it."
    ),
    plan_json: Path | None = typer.Option(
        None, help="--plan: also write the plan, with what it was measured from, as JSON."
    ),
    video_root: Path | None = opt.VIDEO_ROOT,
    method: str | None = typer.Option(
        None,
        help="tats or trokens: sets --queries and the training options that make the method "
        "(tats-train --method), where not given.",
        show_default="tats",
    ),
    tracker: str | None = typer.Option(
        None, help="Point tracker: cotracker3, cotracker3-online, lk, official.",
        show_default="cotracker3",
    ),
    queries: str | None = typer.Option(
        None,
        help="Query points of the tracks: uniform:K (TATs), semantic (Trokens: clusters of "
        "--backbone's features), beginning, middle, interval:k.",
        show_default="uniform:8",
    ),
    tracker_weights: Path | None = opt.TRACKER_WEIGHTS,
    tracker_option: list[str] = opt.TRACKER_OPTION,
    paper_tracker: bool = typer.Option(
        False,
        "--paper-tracker",
        help="Track with the tracker of the paper's numbers where the recipe tracks with "
        "another (TATs: CoTracker2 through the official cotracker package).",
    ),
    grid: int | None = typer.Option(
        None, help="Grid size G of the query grids.", show_default="16"
    ),
    subset: int | None = typer.Option(
        None, help="Points in the fixed per-video subset training reads.", show_default="256"
    ),
    frames: int | None = typer.Option(
        None, help="Stored frames S of both stages.", show_default="8"
    ),
    fps: float | None = typer.Option(
        None,
        help="Time base of both stages in frames per second; 0: every native frame.",
        show_default="10",
    ),
    backbone: str | None = typer.Option(
        None, help="Feature backbone: dinov2_vit{s,b,l}14[_reg], pixels (weight-free).",
        show_default="dinov2_vitb14",
    ),
    backbone_weights: Path | None = opt.BACKBONE_WEIGHTS,
    views: int | None = typer.Option(
        None, help="Feature views per video: 1 plain + augmented ones, drawn from in training.",
        show_default="5",
    ),
    device: str | None = typer.Option(
        None, help="Where the tracker, the backbone and training run: auto (CUDA where there "
        "is one, else the CPU; each stage prints what it picked), cpu, cuda, cuda:1, ...",
        show_default="auto",
    ),
    workers: int = opt.WORKERS,
    tracks_batch: int | None = opt.TRACKS_BATCH,
    features_batch: int = opt.FEATURES_BATCH,
    precision: str = opt.PRECISION,
    train_config: Path | None = typer.Option(
        None, help="Training options (JSON or TOML, as for tats-train --train-config)."
    ),
    epochs: int | None = typer.Option(None, help="Training epochs.", show_default="50"),
    episodes: int | None = typer.Option(None, help="Episodes per epoch.", show_default="400"),
    shot: int | None = typer.Option(None, help="Support clips per class.", show_default="1"),
    val_episodes: int | None = typer.Option(
        None, help="Val episodes per epoch.", show_default="1000"
    ),
    test_episodes: int | None = typer.Option(None, help="Test episodes.", show_default="10000"),
    tracks_mode: str | None = typer.Option(
        None, help="tracks, or frozen: the appearance-only baseline (tats-train).",
        show_default="tracks",
    ),
    train_out: str = typer.Option(
        "train", help="Folder in --out that training writes (e.g. baseline for a second model)."
    ),
    fixes: str | None = opt.FIXES,
    protocol: str | None = opt.PROTOCOL,
    progress: bool = opt.PROGRESS,
) -> None:
    """Run the whole chain on a manifest; rerun the same command to resume it.

    Settings: the defaults, then --recipe, then --train-config, then the options given here
    (each later one wins); OUT/run.json records them (--print-config shows them). Extraction
    failures (unreadable videos) are listed and left out of training; the exit code is then 1
    (2: bad input, 3: the machine failed, 4: an error in tats itself, as for `tats-extract`).
    Each stage's wall time is added to OUT/timings.json (`tats report` shows it).
    """
    from tats.chain import run_chain

    with graceful_termination(), input_errors():
        config = run_config(locals(), opt.command_line(ctx))
        if print_config or plan:  # after the same checks as a run
            from tats.chain import planned_devices
            from tats.manifest import read_manifest
            from tats.preflight import check_run

            rows = read_manifest(config.manifest, config.video_root)
            check_run(config, rows)
        if print_config:
            shown = {**config.to_dict(), "devices": planned_devices(config)}
            typer.echo(json.dumps(shown, indent=1))
            raise typer.Exit(OK)
        if plan:
            from tats.forecast import parse_clock, plan_run, write_json

            limit = parse_clock(time_limit) if time_limit is not None else None
            forecast = plan_run(config, rows, plan_clips)
            for line in forecast.lines(limit):
                typer.echo(line)
            if plan_json is not None:
                write_json(forecast, plan_json)
            raise typer.Exit(OK)
        for line in config.unhonoured:
            typer.echo(f"recipe {config.recipe}: not followed: {line}")
        result = run_chain(config, report=lambda stage, summary: report(summary, stage))
    test = result.train.test
    if test is not None:
        typer.echo(
            f"test: {test.accuracy:.2f} +- {test.ci95:.2f} % ({test.episodes} episodes); "
            f"results in {config.out / train_out}"
        )
    raise typer.Exit(SOME_FAILED if result.failed else OK)


def run_config(options: dict, command_line: dict | None = None):
    """The RunConfig that `tats run` with these parsed options runs (tats.chain.resolve_run):
    the options given (not None) over the recipe's, the file's and the defaults;
    `command_line`: what was typed, recorded in run.json."""
    from tats.chain import resolve_run

    o = options

    def given(*names: str) -> dict:
        return {name: o[name] for name in names if o[name] is not None}

    time = {} if o["fps"] is None else {"fps": o["fps"] or None}  # 0: every native frame
    return resolve_run(
        o["manifest"], o["out"], recipe=o["recipe"], train_file=o["train_config"],
        method=o["method"], tracks={**given("tracker", "queries", "grid", "subset"), **time},
        features={**given("backbone", "views"), **time},
        train=given("epochs", "episodes", "shot", "val_episodes", "test_episodes",
                    "tracks_mode"),
        frames=o["frames"], paper_tracker=o["paper_tracker"],
        tracker_options=parse_options(o["tracker_option"]), video_root=o["video_root"],
        tracker_checkpoint=o["tracker_weights"], weights=o["backbone_weights"],
        device=o["device"], workers=o["workers"], tracks_batch=o["tracks_batch"],
        features_batch=o["features_batch"], precision=o["precision"], progress=o["progress"],
        train_out=o["train_out"],
        fixes=o["fixes"], protocol=o["protocol"], command_line=command_line,
    )  # fmt: skip


def recipes() -> None:
    """List the recipes: the published configurations of TATs and Trokens (`tats run --recipe
    NAME`), with the release file each comes from and the 5-way accuracy its paper reports."""
    from tats.recipes import list_recipes

    with input_errors():
        found = list_recipes()
    width = max(len(r.name) for r in found)
    typer.echo(f"{'recipe':<{width}}  1-shot   5-shot   source")
    papers: dict[str, str] = {}
    notes: dict[str, list[str]] = {}
    for r in found:
        shots = [r.paper.accuracy(s) for s in (1, 5)]
        accuracy = "  ".join(f"{a:7.1f}" if a is not None else f"{'missing':>7}" for a in shots)
        derived = " (derived: no release config for it)" if r.source.get("derived") else ""
        typer.echo(f"{r.name:<{width}}  {accuracy}  {r.release_file}{derived}")
        if None not in shots or r.paper.where not in papers:
            papers[r.paper.where.split(" (quoted")[0]] = r.paper.where
        for note in r.notes:
            notes.setdefault(note, []).append(r.name)
    typer.echo("\naccuracy: 5-way, %, as the papers report it (the releases state none):")
    for where in papers.values():
        typer.echo(f"  {where}")
    typer.echo("  missing: the paper reports the dataset, tats has no figure for it yet")
    typer.echo("\na recipe runs the release protocol with every fix off (what the authors ran); "
               "--fixes all --protocol clean: tats' defaults")
    for note, names in notes.items():
        typer.echo(f"\n{', '.join(names)}: {note}")
