"""`tats run`: tracks, features and training in one command, each resuming where it stopped."""

from __future__ import annotations

from pathlib import Path

import typer

from tats.cli.common import OK, SOME_FAILED, input_errors


def run(
    manifest: Path = typer.Option(..., "--manifest", "-m", help="Dataset manifest CSV."),
    out: Path = typer.Option(
        ..., "--out", "-o", help="Run folder: tracks.zarr, features.zarr and train/ go here."
    ),
    video_root: Path | None = typer.Option(
        None, help="Folder that relative video paths start from [default: the manifest's folder]."
    ),
    tracker: str = typer.Option("cotracker3", help="Point tracker: cotracker3, lk, ..."),
    checkpoint: Path | None = typer.Option(None, help="Tracker weights [default: hub cache]."),
    grid: int = typer.Option(16, help="Grid size G of the query grids."),
    backbone: str = typer.Option("dinov2_vitb14", help="Feature backbone: dinov2_*, pixels."),
    weights: Path | None = typer.Option(None, help="Backbone weights [default: caches]."),
    views: int = typer.Option(1, help="Feature views per video (1 plain + augmented ones)."),
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
    progress: bool = typer.Option(True, help="Show progress bars."),
) -> None:
    """Run the whole chain on a manifest; rerun the same command to resume it.

    Extraction failures (unreadable videos) are listed and left out of training; the exit code
    is then 1.
    """
    from tats.manifest import read_manifest
    from tats.pipeline.features import FeaturesConfig, extract_features
    from tats.pipeline.tracks import TracksConfig, extract_tracks
    from tats.train import config_from_dict, read_config_file, train

    with input_errors():
        rows = read_manifest(manifest, video_root)
        tracks_out, features_out = out / "tracks.zarr", out / "features.zarr"
        extraction = dict(device=device, workers=workers, progress=progress)
        summaries = [
            extract_tracks(
                rows, tracks_out, TracksConfig(tracker=tracker, grid=grid),
                checkpoint=checkpoint, **extraction,
            ),
            extract_features(
                rows, features_out, FeaturesConfig(backbone=backbone, views=views),
                weights=weights, **extraction,
            ),
        ]  # fmt: skip
        for stage, summary in zip(("tracks", "features"), summaries, strict=True):
            typer.echo(
                f"{stage}: {summary.videos_done} videos done, {len(summary.failures)} failed, "
                f"{summary.units_skipped} units already done"
            )
            for f in summary.failures:
                typer.echo(f"  failed row {f.row} ({f.video_id}): {f.error}", err=True)
        options = read_config_file(train_config) if train_config else {}
        overrides = dict(
            epochs=epochs, episodes=episodes, shot=shot,
            val_episodes=val_episodes, test_episodes=test_episodes,
        )  # fmt: skip
        options |= {k: v for k, v in overrides.items() if v is not None}
        options |= dict(
            tracks=str(tracks_out), features=str(features_out), out=str(out / "train"),
            manifest=str(manifest), resume=True,
        )  # fmt: skip
        result = train(config_from_dict(options, str(train_config or "tats run")))
    if result.test is not None:
        typer.echo(
            f"test: {result.test.accuracy:.2f} +- {result.test.ci95:.2f} % "
            f"({result.test.episodes} episodes); results in {out / 'train'}"
        )
    failed = any(summary.failures for summary in summaries)
    raise typer.Exit(SOME_FAILED if failed else OK)
