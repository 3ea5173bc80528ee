"""`tats-extract`: stage one, point tracks and patch features into Zarr stores."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from tats.cli import options as opt
from tats.cli.common import (
    INFRASTRUCTURE,
    OK,
    SOME_FAILED,
    Command,
    fail,
    graceful_termination,
    input_errors,
    is_click_exception,
    rename_options,
    renamed,
    value_name,
)

# Literal copies keep `--help` fast: importing the backbones module pulls in torch.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

app = typer.Typer(
    help="Stage one: extract point tracks (tracks) and patch features (features) of every "
    "video in a dataset manifest into resumable, sharded Zarr stores. Rerun the same command "
    "to resume; `status` and `verify` inspect a store. Exit codes: 0 all done, 1 some videos "
    "failed (listed; a rerun retries them, once per run, --max-attempts tries in all), 2 bad "
    "input or a damaged file of the store (named, with what to do), 3 the machine or cluster "
    "failed (a full disk, a permission, lost workers; a rerun resumes), 4 an error in tats "
    "itself (its traceback is printed).",
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode=None,
)


def parse_options(items: list[str]) -> dict:
    """KEY=VALUE strings -> keyword arguments; values read as JSON where they parse (lists
    become tuples: options are part of a stage's identity, so they must be hashable)."""
    options = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.isidentifier():
            raise ValueError(f"--tracker-option {item!r}: expected KEY=VALUE")
        try:
            parsed = json.loads(value)
        except json.JSONDecodeError:
            parsed = {"true": True, "false": False}.get(value.lower(), value)
        if isinstance(parsed, list):
            parsed = tuple(parsed)
        if isinstance(parsed, dict):
            raise ValueError(f"--tracker-option {item!r}: a value is a number, word or list")
        options[key] = parsed
    return options


def report(summary, what: str) -> None:
    """Print what a stage did: counts, then each failed video and each unit left to others."""
    skipped = f", {summary.units_skipped} units already done" if summary.units_skipped else ""
    typer.echo(
        f"{what}: {summary.videos_done} videos done, {len(summary.failures)} failed "
        f"in {summary.units} units{skipped}"
    )
    for f in summary.failures:
        typer.echo(f"  failed row {f.row} ({f.video_id}): {f.error}", err=True)
    if summary.units_elsewhere:
        held = ", ".join(summary.units_elsewhere)
        typer.echo(f"  in progress in other workers: {held}", err=True)
    if summary.units_lost:
        typer.echo(f"  {summary.units_lost} units were taken over by other workers", err=True)


def _finish(summary, what: str) -> None:
    report(summary, what)
    raise typer.Exit(SOME_FAILED if summary.failures else OK)


@app.command(cls=renamed(**opt.RENAMED["tracks"]))
def tracks(
    manifest: Path = opt.MANIFEST,
    out: Path = typer.Option(..., "--out", "-o", help="The tracks store (a .zarr folder)."),
    video_root: Path | None = opt.VIDEO_ROOT,
    tracker: str = typer.Option(
        "cotracker3",
        help="Point tracker: cotracker3 (needs its weights), cotracker3-online, lk "
        "(OpenCV Lucas-Kanade, no weights), or official (the official cotracker package: "
        "CoTracker3, or the TATs paper's CoTracker2 with --tracker-option model=cotracker2).",
    ),
    tracker_weights: Path | None = opt.TRACKER_WEIGHTS,
    tracker_option: list[str] = opt.TRACKER_OPTION,
    grid: int = typer.Option(16, help="Grid size G: G x G points at every query frame."),
    queries: str = typer.Option(
        "uniform:8",
        help="Query frames of the grid: uniform:K (K-1 frames), beginning, middle, interval:k; "
        "or semantic (Trokens: points on clusters of patch features, tracked both ways; the "
        "options below).",
    ),
    cluster_method: str | None = typer.Option(
        None, help="Semantic queries: bipartite (token merging) or kmeans.",
        show_default="bipartite",
    ),
    cluster_frames: int | None = typer.Option(
        None, help="Semantic queries: frames clustered, uniformly spread.", show_default="32"
    ),
    merge_threshold: float | None = typer.Option(
        None, help="Semantic queries, bipartite: a later frame's centroid is a new cluster when "
        "its best cosine similarity to the clusters so far is below this.", show_default="0.2"
    ),
    kmeans_clusters: int | None = typer.Option(
        None, help="Semantic queries, kmeans: the number of clusters.", show_default="32"
    ),
    points_per_cluster: int | None = typer.Option(
        None, help="Semantic queries: query points per cluster.", show_default="16"
    ),
    max_clusters: int | None = typer.Option(
        None, help="Semantic queries: clusters kept, the largest (the store has room for "
        "max-clusters x points-per-cluster points).", show_default="32"
    ),
    cluster_backbone: str | None = typer.Option(
        None, help="Semantic queries: the features clustered, a --backbone of the features "
        "stage (pixels: weight-free).", show_default="dinov2_vitb14"
    ),
    cluster_weights: Path | None = opt.CLUSTER_WEIGHTS,
    frames: int = opt.FRAMES,
    fps: float = opt.FPS,
    webm_native: bool = opt.WEBM_NATIVE,
    min_distance: float = typer.Option(
        16.0, help="Redundancy filter: a later point is kept if it stays this many px away."
    ),
    subset: int = typer.Option(256, help="Points in the fixed per-video subset training reads."),
    max_points: int | None = typer.Option(
        None, help="Room for kept points (needed for interval:k).",
        show_default="G^2 x query frames",
    ),
    max_side: int = typer.Option(
        512, help="Decode frames with their longer side at most this many px (0: native size); "
        "positions are stored in pixels of the displayed video either way."
    ),
    shard_size: int = opt.SHARD_SIZE,
    shard_index: int | None = opt.SHARD_INDEX,
    num_shards: int | None = opt.NUM_SHARDS,
    workers: int = opt.WORKERS,
    tracks_batch: int | None = opt.TRACKS_BATCH,
    device: str = opt.DEVICE,
    precision: str = opt.PRECISION,
    executor: str = opt.EXECUTOR,
    scheduler: str | None = opt.SCHEDULER,
    video_timeout: float = opt.VIDEO_TIMEOUT,
    lease_timeout: float = opt.LEASE_TIMEOUT,
    max_attempts: int = opt.MAX_ATTEMPTS,
    progress: bool = opt.PROGRESS,
) -> None:
    """Track query points through every video into OUT: a grid at every query frame, or
    semantic points (--queries semantic) tracked both ways."""
    from tats.manifest import read_manifest
    from tats.pipeline.semantic import SemanticConfig
    from tats.pipeline.tracks import SEMANTIC, TracksConfig, extract_tracks

    with graceful_termination(), input_errors():
        semantic_options = {
            "--cluster-method": ("method", cluster_method),
            "--cluster-frames": ("frames", cluster_frames),
            "--merge-threshold": ("threshold", merge_threshold),
            "--kmeans-clusters": ("kmeans_clusters", kmeans_clusters),
            "--points-per-cluster": ("points_per_cluster", points_per_cluster),
            "--max-clusters": ("max_clusters", max_clusters),
            "--cluster-backbone": ("backbone", cluster_backbone),
            "--cluster-weights": (None, cluster_weights),
        }
        given = {flag: item for flag, item in semantic_options.items() if item[1] is not None}
        if queries != SEMANTIC and given:
            raise ValueError(f"{', '.join(given)}: only with --queries semantic")
        semantic = {name: value for name, value in given.values() if name is not None}
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
            max_side=max_side or None,
            shard_size=shard_size,
            semantic=SemanticConfig(**semantic) if queries == SEMANTIC else None,
        )
        rows = read_manifest(manifest, video_root)
        summary = extract_tracks(
            rows,
            out,
            config,
            checkpoint=tracker_weights,
            tracker_options=parse_options(tracker_option),
            device=device,
            precision=precision,
            workers=workers,
            batch_videos=tracks_batch,
            cluster_weights=cluster_weights,
            shard_index=shard_index,
            num_shards=num_shards,
            executor=executor,
            scheduler=scheduler,
            video_timeout=video_timeout or None,
            lease_timeout=lease_timeout,
            max_attempts=max_attempts,
            progress=progress,
        )
    _finish(summary, "tracks")


@app.command(cls=renamed(**opt.RENAMED["features"]))
def features(
    manifest: Path = opt.MANIFEST,
    out: Path = typer.Option(..., "--out", "-o", help="The features store (a .zarr folder)."),
    video_root: Path | None = opt.VIDEO_ROOT,
    backbone: str = typer.Option(
        "dinov2_vitb14",
        help="dinov2_vit{s,b,l}14[_reg] (DINOv2 through timm) or pixels (weight-free).",
    ),
    backbone_weights: Path | None = opt.BACKBONE_WEIGHTS,
    frames: int = opt.FRAMES,
    fps: float = opt.FPS,
    webm_native: bool = opt.WEBM_NATIVE,
    views: int = typer.Option(
        5,
        help="Views per video: view 0 plain, the others photometrically augmented (training "
        "draws one per read; 1: no augmentation). Each view costs a backbone pass and storage.",
    ),
    augment_ops: int = typer.Option(2, help="RandAugment ops per augmented view."),
    augment_magnitude: float = typer.Option(10.0, help="RandAugment magnitude (0..10)."),
    image_size: int = typer.Option(
        224, help="The backbone's input: frames are squashed to this many px square."
    ),
    max_side: int = typer.Option(
        512, help="Decode frames with their longer side at most this many px, their shorter "
        "side no smaller than --image-size (0: native size)."
    ),
    mean: tuple[float, float, float] = typer.Option(
        CLIP_MEAN, help="Normalisation mean (RGB).", metavar="R G B"
    ),
    std: tuple[float, float, float] = typer.Option(
        CLIP_STD, help="Normalisation std (RGB).", metavar="R G B"
    ),
    shard_size: int = opt.SHARD_SIZE,
    shard_index: int | None = opt.SHARD_INDEX,
    num_shards: int | None = opt.NUM_SHARDS,
    workers: int = opt.WORKERS,
    features_batch: int = opt.FEATURES_BATCH,
    device: str = opt.DEVICE,
    precision: str = opt.PRECISION,
    executor: str = opt.EXECUTOR,
    scheduler: str | None = opt.SCHEDULER,
    video_timeout: float = opt.VIDEO_TIMEOUT,
    lease_timeout: float = opt.LEASE_TIMEOUT,
    max_attempts: int = opt.MAX_ATTEMPTS,
    progress: bool = opt.PROGRESS,
) -> None:
    """Encode the stored frames of every video (and its augmented views) into OUT."""
    from tats.manifest import read_manifest
    from tats.pipeline.augment import AugmentConfig
    from tats.pipeline.backbones import Preprocess
    from tats.pipeline.features import FeaturesConfig, extract_features

    with graceful_termination(), input_errors():
        config = FeaturesConfig(
            backbone=backbone,
            frames=frames,
            fps=fps or None,
            native_suffixes=(".webm",) if webm_native else (),
            views=views,
            augment=AugmentConfig(num_ops=augment_ops, magnitude=augment_magnitude),
            preprocess=Preprocess(image_size, tuple(mean), tuple(std)),
            shard_size=shard_size,
            max_side=max_side or None,
        )
        rows = read_manifest(manifest, video_root)
        summary = extract_features(
            rows,
            out,
            config,
            weights=backbone_weights,
            device=device,
            precision=precision,
            workers=workers,
            batch_videos=features_batch,
            shard_index=shard_index,
            num_shards=num_shards,
            executor=executor,
            scheduler=scheduler,
            video_timeout=video_timeout or None,
            lease_timeout=lease_timeout,
            max_attempts=max_attempts,
            progress=progress,
        )
    _finish(summary, "features")


@app.command(cls=Command)
def status(
    store: Path = typer.Argument(..., help="A tracks or features store."),
    lease_timeout: float = opt.LEASE_TIMEOUT,
) -> None:
    """Print done / failed / pending units and videos of a store, with the errors, the units
    in progress, and leases whose holders are dead (no heartbeat for --lease-timeout s, or a
    process on this host that is gone)."""
    from tats.pipeline.status import store_status

    with input_errors():
        s = store_status(store, lease_timeout)
    typer.echo(f"{s.path} ({s.schema}, {s.rows} videos in {s.units} units)")
    typer.echo(
        f"units:  {s.units_done} done, {s.units_failed} with failures, {s.units_pending} pending"
    )
    typer.echo(
        f"videos: {s.videos_done} done, {len(s.failures)} failed, {s.videos_pending} pending"
    )
    for f in s.failures:
        typer.echo(f"  failed row {f.row} ({f.video_id}): {f.error}")
    for lease in s.in_progress:
        typer.echo(f"  in progress: {lease}")
    for lease in s.abandoned:
        typer.echo(f"  dead holder: {lease}")


@app.command(cls=Command)
def verify(
    store: Path = typer.Argument(..., help="A tracks or features store."),
    allow_incomplete: bool = typer.Option(
        False, help="Accept pending units and failed videos (still listed): exit 0 if sound."
    ),
    workers: int = typer.Option(1, help="Processes that read and check the units."),
    progress: bool = opt.PROGRESS,
) -> None:
    """Check every row the ledger calls done (sound data, as written), that no other row holds
    data, and that nothing is pending or failed. Exit 0 sound and complete, 1 incomplete
    (pending units or failed videos), 3 data that differs from the ledger: rows that hold
    data no record calls done (a write interrupted by a kill or a full disk: rerun the
    extraction, it rewrites them), or done rows unlike their record (delete those units'
    records, then rerun); the last lines say which."""
    from tats.pipeline.status import store_status, verify_advice, verify_store

    with input_errors():
        s = store_status(store)
        problems = verify_store(store, progress, workers)
    for problem in problems:
        typer.echo(problem, err=True)
    if problems:
        typer.echo(f"{store}: {len(problems)} rows differ from the ledger", err=True)
        for line in verify_advice(store, problems):
            typer.echo(line, err=True)
        raise typer.Exit(INFRASTRUCTURE)
    missing = []
    if s.units_pending:
        missing.append(f"{s.units_pending} units pending ({s.videos_pending} videos)")
    if s.failures:
        missing.append(f"{len(s.failures)} videos failed")
    for f in s.failures:
        typer.echo(f"  failed row {f.row} ({f.video_id}): {f.error}", err=True)
    if missing:
        typer.echo(f"{store}: sound but incomplete: {', '.join(missing)}", err=True)
        raise typer.Exit(OK if allow_incomplete else SOME_FAILED)
    typer.echo(f"{store}: sound and complete")


@app.command(cls=Command)
def diff(
    a: Path = typer.Argument(..., help="A tracks or features store."),
    b: Path = typer.Argument(..., help="A store of the same kind, made for the same manifest."),
    max_px: float | None = typer.Option(
        None, help="Tracks: exit 1 when the 99th-percentile distance is above this (px)."
    ),
    min_cosine: float | None = typer.Option(
        None, help="Features: exit 1 when the 1st-percentile patch cosine is below this."
    ),
    worst: int = typer.Option(10, help="List this many videos furthest apart."),
    json_output: bool = typer.Option(False, "--json", help="Print the result as JSON."),
    manifest: Path | None = typer.Option(
        None, "--manifest", "-m", help="The stores' manifest, to name the videos listed."
    ),
    progress: bool = opt.PROGRESS,
) -> None:
    """Compare two stores of one manifest row by row, over the rows done in both. Tracks:
    the distance in px between the positions of the same point where both call it visible
    (mean, 99th percentile, max) and the visibility agreement. Features: the cosine of every
    patch (mean, 1st percentile, min). Exit 0; 1 past --max-px / --min-cosine, when rows could
    not be compared or none was; 2 for stores of different kinds or manifests."""
    from tats.manifest import read_manifest
    from tats.pipeline.diff import diff_stores, failures, report_lines
    from tats.stores import TRACKS

    with input_errors():
        rows = None if manifest is None else read_manifest(manifest)
        result = diff_stores(a, b, rows, progress)
        if max_px is not None and result.kind != TRACKS:
            raise ValueError("--max-px applies to tracks stores; use --min-cosine")
        if min_cosine is not None and result.kind == TRACKS:
            raise ValueError("--min-cosine applies to features stores; use --max-px")
    reasons = failures(result, max_px, min_cosine)
    if json_output:
        typer.echo(json.dumps(result.to_dict(worst) | {"failures": reasons}, indent=1))
    else:
        for line in report_lines(result, worst):
            typer.echo(line)
    for reason in reasons:
        typer.echo(f"diff: {reason}", err=True)
    raise typer.Exit(SOME_FAILED if reasons else OK)


@app.command(
    cls=Command, context_settings={"allow_extra_args": True, "ignore_unknown_options": True}
)
def sbatch(
    ctx: typer.Context,
    stage: str = typer.Argument(..., help="The stage to run: tracks or features."),
    tasks: int = typer.Option(
        ..., help="Array tasks; each starts with an even share of the units (the script fixes "
        "this count, so a task resubmitted alone with --array=K keeps its share)."
    ),
    script: Path | None = typer.Option(
        None, help="Where to write the script.",
        show_default="tats-STAGE.sbatch in the current folder",
    ),
    partition: str | None = typer.Option(None, help="Slurm partition."),
    time: str | None = typer.Option(
        None, help="Time limit per task in Slurm's form, e.g. 12:00:00 for 12 hours."
    ),
    cpus_per_task: int | None = typer.Option(None, help="CPUs per task (decoders + 1)."),
    gpus_per_task: int | None = typer.Option(None, help="GPUs per task."),
    mem: str | None = typer.Option(None, help="Memory per task, e.g. 32G."),
    max_parallel: int | None = typer.Option(None, help="At most this many tasks at once."),
    logs: Path = typer.Option(Path("slurm-logs"), help="Folder for the tasks' output."),
    submit: bool = typer.Option(False, help="Submit the script with sbatch."),
) -> None:
    """Write a Slurm job-array script running STAGE; options after `--` go to the stage.

    Example: tats-extract sbatch tracks --tasks 32 --gpus-per-task 1 --time 12:00:00 --submit
    -- --manifest m.csv --out tracks.zarr (the script holds absolute paths and changes to this
    folder; `tats run --plan --time-limit 12:00:00` says how many tasks a limit needs)
    """
    from tats.pipeline import slurm

    if stage not in ("tracks", "features"):
        raise fail(f"unknown stage {stage!r}; use tracks or features")
    command = typer.main.get_command(app).get_command(ctx, stage)
    args = rename_options(list(ctx.args), command.renamed)  # the script uses the new names
    paths = {
        name for param in command.params if value_name(param) == "PATH" for name in param.opts
    }
    with input_errors():
        command_line = slurm.stage_command(stage, args, tasks, paths)
    try:  # check the stage's options now, not in every task of the array
        command.make_context(stage, list(args))
    except Exception as error:
        if not is_click_exception(error) or not hasattr(error, "format_message"):
            raise
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
        script.write_text(slurm.sbatch_script(command_line, options, Path.cwd()))
        typer.echo(f"wrote {script} ({tasks} array tasks, logs in {logs}/)")
        if submit:
            typer.echo(f"submitted job {slurm.submit(script)}")


@app.command("import-tracks", cls=Command)
def import_tracks(
    source: tuple[str, Path] = typer.Option(
        ..., "--from", help="tats-pkl or trokens-pkl, and the folder of the original "
        "extraction's per-video pickles (<video name>.pkl, searched recursively).",
        show_default=False, metavar="LAYOUT DIR",
    ),
    manifest: Path = opt.MANIFEST,
    out: Path = typer.Option(..., "--out", "-o", help="The tracks store to write."),
    trust_pickles: bool = typer.Option(
        False, "--trust-pickles", help="Read the pickles: unpickling runs whatever code a file "
        "names, so only for files you or a source you trust wrote."
    ),
    video_root: Path | None = opt.VIDEO_ROOT,
    grid: int = typer.Option(16, help="tats-pkl: the grid size G of the pickles."),
    queries: str = typer.Option("uniform:8", help="tats-pkl: the pickles' query frames."),
    points_per_cluster: int = typer.Option(
        16, help="trokens-pkl: query points per cluster (with --max-clusters, the room)."
    ),
    max_clusters: int = typer.Option(
        32, help="trokens-pkl: clusters per video; the store has room for max-clusters x "
        "points-per-cluster points."
    ),
    frames: int = opt.FRAMES,
    fps: float = opt.FPS,
    webm_native: bool = opt.WEBM_NATIVE,
    min_distance: float = typer.Option(
        16.0, help="tats-pkl: the redundancy filter's distance in px, applied as extraction "
        "applies it (the pickles hold the points it kept)."
    ),
    subset: int = typer.Option(256, help="Points in the fixed per-video subset training reads."),
    max_points: int | None = typer.Option(
        None, help="tats-pkl: room for kept points.", show_default="G^2 x query frames"
    ),
    shard_size: int = opt.SHARD_SIZE,
    workers: int = typer.Option(2, help="Processes reading pickles ahead (0: inline)."),
    lease_timeout: float = opt.LEASE_TIMEOUT,
    progress: bool = opt.PROGRESS,
) -> None:
    """Import the point tracks of the original TATs or Trokens extraction scripts (one pickle
    per video) into a tracks store, with the same fields and checks as an extracted one: each
    video's points go through the filter, subset and stored frames of `tracks`, on the time
    base of its video. Unpickling runs code: without --trust-pickles nothing is read (exit 2).
    Rerun to resume; a video without a readable pickle is listed as failed (exit 1)."""
    from tats.interop import import_pickles
    from tats.manifest import read_manifest
    from tats.pipeline.semantic import SemanticConfig
    from tats.pipeline.tracks import SEMANTIC, TracksConfig

    layout, folder = source
    with graceful_termination(), input_errors():
        semantic = None
        if layout == "trokens-pkl":  # Trokens' points are semantic queries
            semantic = SemanticConfig(points_per_cluster=points_per_cluster,
                                      max_clusters=max_clusters)  # fmt: skip
        config = TracksConfig(
            tracker=f"import:{layout}", grid=grid, queries=SEMANTIC if semantic else queries,
            frames=frames, fps=fps or None, native_suffixes=(".webm",) if webm_native else (),
            min_distance=min_distance, subset=subset, max_points=max_points,
            shard_size=shard_size, semantic=semantic,
        )  # fmt: skip
        rows = read_manifest(manifest, video_root)
        summary = import_pickles(
            layout, folder, rows, out, config, trust_pickles, workers=workers,
            video_timeout=None, lease_timeout=lease_timeout, progress=progress,
        )  # fmt: skip
    _finish(summary, "import")


@app.command("export", cls=Command)
def export(
    store: Path = typer.Argument(..., help="A tracks or features store."),
    out: Path = typer.Argument(..., help="The HDF5 file (h5), or the folder of .npz files."),
    manifest: Path = opt.MANIFEST,
    format: str = typer.Option("h5", "--format", help="h5 or npz."),
    video_root: Path | None = opt.VIDEO_ROOT,
) -> None:
    """Export a store for tools that read HDF5 or NumPy files. h5: one chunked, compressed
    dataset per array (first axis the manifest row), the store's attributes as HDF5
    attributes, and /manifest, /done and /ledger alongside; `import-h5` reads it back.
    npz: one <video_id>.npz per done video, with attributes.json and the manifest."""
    from tats.interop import export_h5, export_npz
    from tats.manifest import read_manifest

    if format not in ("h5", "npz"):
        raise fail(f"--format {format!r}: use h5 or npz")
    with input_errors():
        rows = read_manifest(manifest, video_root)
        if format == "h5":
            typer.echo(f"wrote {export_h5(store, rows, out)}")
        else:
            typer.echo(f"wrote {len(export_npz(store, rows, out))} videos to {out}")


@app.command("import-h5", cls=Command)
def import_h5(
    source: Path = typer.Argument(..., help="An HDF5 file written by `export --format h5`."),
    out: Path = typer.Option(..., "--out", "-o", help="The store to make (must not exist)."),
    manifest_out: Path | None = typer.Option(
        None, help="Also write the manifest the store was made for (the same bytes)."
    ),
) -> None:
    """Make the store of an HDF5 export again: the same arrays, attributes and ledger, each
    done row checked against its digest (an export of a schema version 2 store makes a store
    of the current version)."""
    from tats.interop import import_h5 as read_h5

    with input_errors():
        typer.echo(f"wrote {read_h5(source, out, manifest_out)}")
