"""`tats predict`: classify query videos from a few labelled support videos of new classes."""

from __future__ import annotations

from pathlib import Path

import typer

from tats.cli import options as opt
from tats.cli.common import OK, SOME_FAILED, graceful_termination, input_errors

HELP = (
    "Classify the videos of --query from the labelled videos of --support with a trained "
    "checkpoint: extract tracks and features of both lists into --out as the checkpoint's "
    "training stores were made (rerun to resume), embed every clip, match each query against "
    "every support class. Writes predictions.csv (nearest class, distance and score per class), "
    "metrics.json, failed.csv, and accuracy with confusion.png where queries have labels. "
    "The checkpoint (whole), the lists and the options are checked before anything is "
    "extracted. Exit 1: some videos could not be read (listed; the rest are predicted); 2: bad "
    "input; 3: the machine failed (rerun to resume); 4: an error in tats itself (its traceback "
    "is printed)."
)


def predict(
    checkpoint: Path = typer.Option(
        ..., help="A tats-train checkpoint (e.g. run/checkpoints/best.pt)."
    ),
    support: Path = typer.Option(
        ..., help="CSV video_id,path,label: the labelled clips, any number per class."
    ),
    query: Path = typer.Option(..., help="CSV video_id,path[,label]: the clips to classify."),
    out: Path = typer.Option(..., "--out", "-o", help="Output folder (stores, predictions)."),
    video_root: Path | None = opt.VIDEO_ROOT,
    tracker_weights: Path | None = opt.TRACKER_WEIGHTS,
    tracker_option: list[str] = opt.TRACKER_OPTION,
    backbone_weights: Path | None = opt.BACKBONE_WEIGHTS,
    cluster_weights: Path | None = opt.CLUSTER_WEIGHTS,
    device: str = typer.Option(
        "auto", help="Where the tracker, the backbone and the few-shot model run: auto (CUDA "
        "where there is one, else the CPU), cpu, cuda, cuda:1, ..."
    ),
    workers: int = typer.Option(2, help="Decoding processes (and clip readers for the model)."),
    tracks_batch: int | None = opt.TRACKS_BATCH,
    features_batch: int = opt.FEATURES_BATCH,
    precision: str = opt.PRECISION,
    batch_clips: int = typer.Option(32, help="Clips per model forward."),
    video_timeout: float = opt.VIDEO_TIMEOUT,
    executor: str = opt.EXECUTOR,
    scheduler: str | None = opt.SCHEDULER,
    progress: bool = opt.PROGRESS,
) -> None:
    """Classify query videos from a few labelled support videos of new classes."""
    from tats.cli.extract import parse_options
    from tats.predict import predict as run_predict

    with graceful_termination(), input_errors():
        result = run_predict(
            checkpoint, support, query, out, video_root=video_root,
            tracker_checkpoint=tracker_weights, tracker_options=parse_options(tracker_option),
            weights=backbone_weights, cluster_weights=cluster_weights, device=device,
            tracks_batch=tracks_batch, features_batch=features_batch, precision=precision,
            workers=workers, batch_clips=batch_clips,
            progress=progress, executor=executor, scheduler=scheduler,
            video_timeout=video_timeout or None,
        )  # fmt: skip
    for stage, summary in result.extraction.items():
        typer.echo(
            f"{stage}: {summary.videos_done} videos extracted, {len(summary.failures)} failed, "
            f"{summary.units_skipped} units already done"
        )
    labelled = {c: 0 for c in result.classes}
    predicted = {c: 0 for c in result.classes}
    for p in result.predictions:
        predicted[p.predicted] += 1
        labelled[p.label] = labelled.get(p.label, 0) + bool(p.label)
    width = max(len("class"), *(len(c) for c in result.classes))
    typer.echo(f"{'class':<{width}}  support  predicted  labelled  accuracy")
    for c in result.classes:
        accuracy = f"{result.per_class[c]:7.1f}%" if c in result.per_class else "       -"
        typer.echo(
            f"{c:<{width}}  {result.support[c]:7d}  {predicted[c]:9d}  {labelled[c]:8d}  {accuracy}"
        )
    if result.accuracy is not None:
        typer.echo(
            f"accuracy {result.accuracy:.1f}% (95% interval {result.ci95[0]:.1f} to "
            f"{result.ci95[1]:.1f}) over {sum(labelled.values())} labelled queries"
        )
    typer.echo(f"{len(result.predictions)} queries predicted: {result.out / 'predictions.csv'}")
    for f in result.failed:
        typer.echo(f"failed {f.role} {f.video_id} ({f.path}): {f.error}", err=True)
    raise typer.Exit(SOME_FAILED if result.failed else OK)
