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
        False, "--print-config", help="Print the resolved config (JSON) and exit; no work."
    ),
    video_root: Path | None = opt.VIDEO_ROOT,
    method: str | None = typer.Option(
        None,
        help="tats [default] or trokens: sets --queries and the training options that make the "
        "method (tats-train --method), where not given.",
    ),
    tracker: str | None = typer.Option(None, help="Point tracker: cotracker3 [default], lk, ..."),
    queries: str | None = typer.Option(
        None,
        help="Query points of the tracks: uniform:K (TATs: uniform:8, the default), semantic "
        "(Trokens: clusters of --backbone's features), beginning, middle, interval:k.",
    ),
    checkpoint: Path | None = opt.TRACKER_CHECKPOINT,
    tracker_option: list[str] = opt.TRACKER_OPTION,
    paper_tracker: bool = typer.Option(
        False,
        "--paper-tracker",
        help="Track with the tracker of the paper's numbers where the recipe tracks with "
        "another (TATs: CoTracker2 through the official cotracker package).",
    ),
    grid: int | None = typer.Option(None, help="Grid size G of the query grids [16]."),
    subset: int | None = typer.Option(
        None, help="Points in the fixed per-video subset training reads [256]."
    ),
    frames: int | None = typer.Option(None, help="Stored frames S of both stages [8]."),
    fps: float | None = typer.Option(
        None,
        help="Time base of both stages in frames per second; 0: every native frame "
        "[default: 10, or the recipe's].",
        show_default=False,
    ),
    backbone: str | None = typer.Option(
        None, help="Feature backbone: dinov2_vitb14 [default], dinov2_*, pixels."
    ),
    weights: Path | None = opt.BACKBONE_WEIGHTS,
    views: int | None = typer.Option(
        None, help="Feature views per video: 1 plain + augmented ones, drawn from in training [5]."
    ),
    device: str = opt.DEVICE,
    workers: int = opt.WORKERS,
    train_config: Path | None = typer.Option(
        None, help="Training options (JSON or TOML, as for tats-train --config)."
    ),
    epochs: int | None = typer.Option(None, help="Training epochs [50]."),
    episodes: int | None = typer.Option(None, help="Episodes per epoch [400]."),
    shot: int | None = typer.Option(None, help="Support clips per class [1]."),
    val_episodes: int | None = typer.Option(None, help="Val episodes per epoch [1000]."),
    test_episodes: int | None = typer.Option(None, help="Test episodes [10000]."),
    tracks_mode: str | None = typer.Option(
        None, help="tracks [default], or frozen: the appearance-only baseline (tats-train)."
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
    from tats.chain import resolve_run, run_chain

    def given(**values) -> dict:
        return {k: v for k, v in values.items() if v is not None}

    time = {} if fps is None else {"fps": fps or None}  # 0: every native frame
    with graceful_termination(), input_errors():
        config = resolve_run(
            manifest, out, recipe=recipe, train_file=train_config, method=method,
            tracks=given(tracker=tracker, queries=queries, grid=grid, subset=subset, **time),
            features=given(backbone=backbone, views=views, **time),
            train=given(epochs=epochs, episodes=episodes, shot=shot, val_episodes=val_episodes,
                        test_episodes=test_episodes, tracks_mode=tracks_mode),
            frames=frames, paper_tracker=paper_tracker,
            tracker_options=parse_options(tracker_option), video_root=video_root,
            tracker_checkpoint=checkpoint,
            weights=weights, device=device, workers=workers, progress=progress,
            train_out=train_out, fixes=fixes, protocol=protocol,
            command_line=opt.command_line(ctx),
        )  # fmt: skip
        if print_config:
            typer.echo(json.dumps(config.to_dict(), indent=1))
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
