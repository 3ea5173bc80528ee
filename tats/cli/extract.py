"""`tats-extract`: stage one, point tracks and patch features into Zarr stores."""

from __future__ import annotations

import json
from pathlib import Path

import click
import typer

from tats.cli.common import OK, SOME_FAILED, fail, input_errors

# Literal copies keep `--help` fast: importing the backbones module pulls in torch.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

app = typer.Typer(
    help="Stage one: extract point tracks (tracks) and patch features (features) of every "
    "video in a dataset manifest into resumable, sharded Zarr stores. Rerun the same command "
    "to resume; `status` and `verify` inspect a store.",
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode=None,
)

MANIFEST = typer.Option(..., "--manifest", "-m", help="Dataset manifest CSV.", show_default=False)
VIDEO_ROOT = typer.Option(
    None, help="Folder that relative video paths start from [default: the manifest's folder]."
)
SHARD_INDEX = typer.Option(
    None,
    help="Which share of the work this process takes, 0-based [default: $SLURM_ARRAY_TASK_ID, "
    "else $RANK, else 0].",
)
NUM_SHARDS = typer.Option(
    None,
    help="Into how many even, contiguous shares the work is split [default: "
    "$SLURM_ARRAY_TASK_COUNT, else $WORLD_SIZE, else 1].",
)
WORKERS = typer.Option(2, help="Decoding processes running ahead of compute (0: decode inline).")
FRAMES = typer.Option(8, help="Frames stored per video (the frames training uses).")
FPS = typer.Option(10.0, help="Track time base in frames per second; 0 keeps the native rate.")
WEBM_NATIVE = typer.Option(
    True, help="Keep .webm videos (Something-Something v2) at their native frame rate."
)
SHARD_SIZE = typer.Option(64, help="Videos per store shard (one file per array and shard).")
PROGRESS = typer.Option(True, help="Show a progress bar.")
EXECUTOR = typer.Option(
    "local", help="local: this process and its decoders; dask: one task per unit on --scheduler."
)
SCHEDULER = typer.Option(
    None,
    help="Dask scheduler: tcp://host:8786, a scheduler file (.json), or local:N for a "
    "LocalCluster of N workers [default: local:2].",
)


def parse_options(items: list[str]) -> dict:
    """KEY=VALUE strings -> keyword arguments; values read as JSON where they parse."""
    options = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.isidentifier():
            raise ValueError(f"--tracker-option {item!r}: expected KEY=VALUE")
        try:
            options[key] = json.loads(value)
        except json.JSONDecodeError:
            options[key] = {"true": True, "false": False}.get(value.lower(), value)
    return options


def _finish(summary, what: str) -> None:
    skipped = f", {summary.units_skipped} units already done" if summary.units_skipped else ""
    typer.echo(
        f"{what}: {summary.videos_done} videos done, {len(summary.failures)} failed "
        f"in {summary.units} units{skipped}"
    )
    for f in summary.failures:
        typer.echo(f"  failed row {f.row} ({f.video_id}): {f.error}", err=True)
    raise typer.Exit(SOME_FAILED if summary.failures else OK)


@app.command()
def tracks(
    manifest: Path = MANIFEST,
    out: Path = typer.Option(..., "--out", "-o", help="The tracks store (a .zarr folder)."),
    video_root: Path | None = VIDEO_ROOT,
    tracker: str = typer.Option("lk", help="Point tracker: lk, cotracker3, cotracker3-online."),
    checkpoint: Path | None = typer.Option(
        None, help="Tracker weights (.pth) [default: the torch hub cache, where it has them]."
    ),
    tracker_option: list[str] = typer.Option(
        [],
        help="A tracker setting KEY=VALUE, repeatable; cotracker3: from_query_frame=false "
        "(track whole clips, as the official code), passes=per_query_frame, "
        "max_offline_frames=N, online_checkpoint=PATH, precision=fp32.",
    ),
    grid: int = typer.Option(16, help="Grid size G: G x G points at every query frame."),
    queries: str = typer.Option(
        "uniform:8", help="Query frames: uniform:K (K-1 frames), beginning, middle, interval:k."
    ),
    frames: int = FRAMES,
    fps: float = FPS,
    webm_native: bool = WEBM_NATIVE,
    min_distance: float = typer.Option(
        16.0, help="Redundancy filter: a later point is kept if it stays this many px away."
    ),
    subset: int = typer.Option(256, help="Points in the fixed per-video subset training reads."),
    max_points: int | None = typer.Option(
        None, help="Room for kept points [default: G^2 x query frames; needed for interval:k]."
    ),
    shard_size: int = SHARD_SIZE,
    shard_index: int | None = SHARD_INDEX,
    num_shards: int | None = NUM_SHARDS,
    workers: int = WORKERS,
    batch_videos: int = typer.Option(1, help="Videos per tracker call."),
    device: str = typer.Option("cpu", help="Where the tracker runs: cpu, cuda, cuda:1, ..."),
    executor: str = EXECUTOR,
    scheduler: str | None = SCHEDULER,
    progress: bool = PROGRESS,
) -> None:
    """Track a grid of points from every query frame through every video into OUT."""
    from tats.manifest import read_manifest
    from tats.pipeline.tracks import TracksConfig, extract_tracks

    with input_errors():
        config = TracksConfig(
            tracker=tracker,
            grid=grid,
            queries=queries,
            frames=frames,
            fps=fps or None,
            native_suffixes=(".webm",) if webm_native else (),
            min_distance=min_distance,
            subset=subset,
            max_points=max_points,
            shard_size=shard_size,
        )
        rows = read_manifest(manifest, video_root)
        summary = extract_tracks(
            rows,
            out,
            config,
            checkpoint=checkpoint,
            tracker_options=parse_options(tracker_option),
            device=device,
            workers=workers,
            batch_videos=batch_videos,
            shard_index=shard_index,
            num_shards=num_shards,
            executor=executor,
            scheduler=scheduler,
            progress=progress,
        )
    _finish(summary, "tracks")


@app.command()
def features(
    manifest: Path = MANIFEST,
    out: Path = typer.Option(..., "--out", "-o", help="The features store (a .zarr folder)."),
    video_root: Path | None = VIDEO_ROOT,
    backbone: str = typer.Option(
        "dinov2_vitb14",
        help="dinov2_vit{s,b,l}14[_reg] (DINOv2 through timm) or pixels (weight-free).",
    ),
    weights: Path | None = typer.Option(
        None,
        help="Backbone weights: an official dinov2_*_pretrain.pth or a timm / Hugging Face "
        "checkpoint [default: the Hugging Face and torch hub caches].",
    ),
    frames: int = FRAMES,
    fps: float = FPS,
    webm_native: bool = WEBM_NATIVE,
    views: int = typer.Option(
        1, help="Views per video: view 0 plain, the others photometrically augmented."
    ),
    augment_ops: int = typer.Option(2, help="RandAugment ops per augmented view."),
    augment_magnitude: float = typer.Option(10.0, help="RandAugment magnitude (0..10)."),
    image_size: int = typer.Option(224, help="Frames are squashed to this size."),
    mean: tuple[float, float, float] = typer.Option(CLIP_MEAN, help="Normalisation mean (RGB)."),
    std: tuple[float, float, float] = typer.Option(CLIP_STD, help="Normalisation std (RGB)."),
    shard_size: int = SHARD_SIZE,
    shard_index: int | None = SHARD_INDEX,
    num_shards: int | None = NUM_SHARDS,
    workers: int = WORKERS,
    batch_videos: int = typer.Option(4, help="Videos per backbone forward."),
    device: str = typer.Option("cpu", help="Where the backbone runs: cpu, cuda, cuda:1, ..."),
    executor: str = EXECUTOR,
    scheduler: str | None = SCHEDULER,
    progress: bool = PROGRESS,
) -> None:
    """Encode the stored frames of every video (and its augmented views) into OUT."""
    from tats.manifest import read_manifest
    from tats.pipeline.augment import AugmentConfig
    from tats.pipeline.backbones import Preprocess
    from tats.pipeline.features import FeaturesConfig, extract_features

    with input_errors():
        config = FeaturesConfig(
            backbone=backbone,
            frames=frames,
            fps=fps or None,
            native_suffixes=(".webm",) if webm_native else (),
            views=views,
            augment=AugmentConfig(num_ops=augment_ops, magnitude=augment_magnitude),
            preprocess=Preprocess(image_size, tuple(mean), tuple(std)),
            shard_size=shard_size,
        )
        rows = read_manifest(manifest, video_root)
        summary = extract_features(
            rows,
            out,
            config,
            weights=weights,
            device=device,
            workers=workers,
            batch_videos=batch_videos,
            shard_index=shard_index,
            num_shards=num_shards,
            executor=executor,
            scheduler=scheduler,
            progress=progress,
        )
    _finish(summary, "features")


@app.command()
def status(store: Path = typer.Argument(..., help="A tracks or features store.")) -> None:
    """Print done / failed / pending units and videos of a store, with the errors."""
    from tats.pipeline.status import store_status

    with input_errors():
        s = store_status(store)
    typer.echo(f"{s.path} ({s.schema}, {s.rows} videos in {s.units} units)")
    typer.echo(
        f"units:  {s.units_done} done, {s.units_failed} with failures, {s.units_pending} pending"
    )
    typer.echo(
        f"videos: {s.videos_done} done, {len(s.failures)} failed, {s.videos_pending} pending"
    )
    for f in s.failures:
        typer.echo(f"  failed row {f.row} ({f.video_id}): {f.error}")


@app.command()
def verify(
    store: Path = typer.Argument(..., help="A tracks or features store."),
    progress: bool = PROGRESS,
) -> None:
    """Check every row the ledger calls done, and that no other row holds data."""
    from tats.pipeline.status import verify_store

    with input_errors():
        problems = verify_store(store, progress)
    for problem in problems:
        typer.echo(problem, err=True)
    if problems:
        typer.echo(f"{store}: {len(problems)} problems", err=True)
        raise typer.Exit(SOME_FAILED)
    typer.echo(f"{store}: sound")


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def sbatch(
    ctx: typer.Context,
    stage: str = typer.Argument(..., help="The stage to run: tracks or features."),
    tasks: int = typer.Option(..., help="Array tasks; each takes an even share of the units."),
    script: Path | None = typer.Option(
        None, help="Where to write the script [default: tats-STAGE.sbatch here]."
    ),
    partition: str | None = typer.Option(None, help="Slurm partition."),
    time: str | None = typer.Option(None, help="Time limit per task, e.g. 12:00:00."),
    cpus_per_task: int | None = typer.Option(None, help="CPUs per task (decoders + 1)."),
    gpus_per_task: int | None = typer.Option(None, help="GPUs per task."),
    mem: str | None = typer.Option(None, help="Memory per task, e.g. 32G."),
    max_parallel: int | None = typer.Option(None, help="At most this many tasks at once."),
    logs: Path = typer.Option(Path("slurm-logs"), help="Folder for the tasks' output."),
    submit: bool = typer.Option(False, help="Submit the script with sbatch."),
) -> None:
    """Write a Slurm job-array script running STAGE; options after `--` go to the stage.

    Example: tats-extract sbatch tracks --tasks 32 --gpus-per-task 1 --submit --
    --manifest m.csv --out tracks.zarr --tracker cotracker3 --device cuda
    """
    from tats.pipeline import slurm

    args = list(ctx.args)
    if stage not in ("tracks", "features"):
        raise fail(f"unknown stage {stage!r}; use tracks or features")
    if {"--shard-index", "--num-shards"} & set(args):
        raise fail("the array task picks the share: leave out --shard-index and --num-shards")
    command = typer.main.get_command(app).get_command(ctx, stage)
    try:  # check the stage's options now, not in every task of the array
        command.make_context(stage, list(args))
    except click.exceptions.ClickException as error:
        raise fail(f"{stage} options: {error.format_message()}") from None
    with input_errors():
        options = slurm.SlurmOptions(
            tasks=tasks,
            job_name=f"tats-{stage}",
            partition=partition,
            time=time,
            cpus_per_task=cpus_per_task,
            gpus_per_task=gpus_per_task,
            mem=mem,
            logs=logs,
            max_parallel=max_parallel,
        )
        script = script or Path(f"tats-{stage}.sbatch")
        logs.mkdir(parents=True, exist_ok=True)
        script.write_text(slurm.sbatch_script(slurm.stage_command(stage, args), options))
        typer.echo(f"wrote {script} ({tasks} array tasks, logs in {logs}/)")
        if submit:
            typer.echo(f"submitted job {slurm.submit(script)}")
