"""`tats run`: tracks, features and training in one command, each resuming where it stopped."""

from __future__ import annotations

from pathlib import Path

import typer

from tats.cli.common import OK, SOME_FAILED, graceful_termination, input_errors
from tats.cli.extract import report


def run(
    manifest: Path = typer.Option(..., "--manifest", "-m", help="Dataset manifest CSV."),
    out: Path = typer.Option(
        ..., "--out", "-o", help="Run folder: tracks.zarr, features.zarr and train/ go here."
    ),
    video_root: Path | None = typer.Option(
        None, help="Folder that relative video paths start from [default: the manifest's folder]."
    ),
    method: str | None = typer.Option(
        None,
        help="tats [default] or trokens: sets --queries and the training options that make the "
        "method (tats-train --method), where not given.",
    ),
    tracker: str = typer.Option("cotracker3", help="Point tracker: cotracker3, lk, ..."),
    queries: str | None = typer.Option(
        None,
        help="Query points of the tracks: uniform:K (TATs: uniform:8, the default), semantic "
        "(Trokens: clusters of --backbone's features), beginning, middle, interval:k.",
    ),
    checkpoint: Path | None = typer.Option(None, help="Tracker weights [default: hub cache]."),
    grid: int = typer.Option(16, help="Grid size G of the query grids."),
    subset: int = typer.Option(256, help="Points in the fixed per-video subset training reads."),
    backbone: str = typer.Option("dinov2_vitb14", help="Feature backbone: dinov2_*, pixels."),
    weights: Path | None = typer.Option(None, help="Backbone weights [default: caches]."),
    views: int = typer.Option(
        5, help="Feature views per video: 1 plain + augmented ones, drawn from in training."
    ),
    device: str = typer.Option("cpu", help="Device for extraction: cpu, cuda, ..."),
    workers: int = typer.Option(2, help="Decoding processes per extraction stage."),
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
    progress: bool = typer.Option(True, help="Show progress bars."),
) -> None:
    """Run the whole chain on a manifest; rerun the same command to resume it.

    Extraction failures (unreadable videos) are listed and left out of training; the exit code
    is then 1 (2: bad input, 3: the machine failed, 4: an error in tats itself, as for
    `tats-extract`). Each stage's wall time is added to OUT/timings.json (`tats report` shows it).
    """
    from tats.manifest import read_manifest
    from tats.methods import TRACKS_KEYS, with_method
    from tats.pipeline.features import FeaturesConfig, extract_features
    from tats.pipeline.semantic import SemanticConfig
    from tats.pipeline.tracks import SEMANTIC, TracksConfig, extract_tracks
    from tats.report import stage_clock
    from tats.train import config_from_dict, read_config_file, train

    with graceful_termination(), input_errors():
        rows = read_manifest(manifest, video_root)
        tracks_out, features_out = out / "tracks.zarr", out / "features.zarr"
        extraction = dict(device=device, workers=workers, progress=progress)
        options = read_config_file(train_config) if train_config else {}
        method = method or options.get("method")  # the command line's, else the file's
        chosen = {k: v for k, v in dict(method=method, queries=queries).items() if v is not None}
        tracks_options = with_method(chosen, TRACKS_KEYS)
        semantic = tracks_options.get("queries") == SEMANTIC  # clusters of --backbone's features
        if semantic:
            tracks_options["semantic"] = SemanticConfig(backbone=backbone)
        tracks_config = TracksConfig(tracker=tracker, grid=grid, subset=subset, **tracks_options)
        with stage_clock(out, "tracks"):
            tracks_summary = extract_tracks(
                rows, tracks_out, tracks_config, checkpoint=checkpoint,
                cluster_weights=weights if semantic else None, **extraction,
            )  # fmt: skip
        with stage_clock(out, "features"):
            features_summary = extract_features(
                rows, features_out, FeaturesConfig(backbone=backbone, views=views),
                weights=weights, **extraction,
            )  # fmt: skip
        summaries = [tracks_summary, features_summary]
        for stage, summary in zip(("tracks", "features"), summaries, strict=True):
            report(summary, stage)
        overrides = dict(
            epochs=epochs, episodes=episodes, shot=shot,
            val_episodes=val_episodes, test_episodes=test_episodes, tracks_mode=tracks_mode,
        )  # fmt: skip
        options |= {k: v for k, v in overrides.items() if v is not None}
        options |= {"method": method} if method is not None else {}
        options |= dict(
            tracks=str(tracks_out), features=str(features_out), out=str(out / train_out),
            manifest=str(manifest), resume=True,
        )  # fmt: skip
        with stage_clock(out, train_out):
            result = train(config_from_dict(options, str(train_config or "tats run")))
    if result.test is not None:
        typer.echo(
            f"test: {result.test.accuracy:.2f} +- {result.test.ci95:.2f} % "
            f"({result.test.episodes} episodes); results in {out / train_out}"
        )
    failed = any(summary.failures for summary in summaries)
    raise typer.Exit(SOME_FAILED if failed else OK)
