"""The options that several commands share (`tats-extract`, `tats run`, `tats predict`,
`tats viz`, `tats manifest`), each defined once: the same flag, default and help wherever it
appears. A command's parameter name gives the flag where none is named. One name for one
thing: `--tracker-weights`, `--backbone-weights` and `--cluster-weights` are pretrained
models' files, `--checkpoint` is always a tats-train checkpoint; `--tracks-batch` and
`--features-batch` are videos per tracker call and per backbone forward. The old names of
renamed options are in `RENAMED` (accepted, hidden, for one release; docs/changelog.md)."""

from __future__ import annotations

import typer

from tats.fixes import FIX_NAMES

MANIFEST = typer.Option(..., "--manifest", "-m", help="Dataset manifest CSV.", show_default=False)
VIDEO_ROOT = typer.Option(
    None,
    help="Folder that relative video paths start from.",
    show_default="the folder of the manifest or list that names the video",
)
WORKERS = typer.Option(
    2, help="Decoding processes running ahead of compute (0: decode inline, no time limit)."
)
DEVICE = typer.Option(
    "auto", help="Where the tracker and the backbone run: auto (CUDA where there is one, else "
    "the CPU; each stage prints what it picked), cpu, cuda, cuda:1, ..."
)
VIDEO_TIMEOUT = typer.Option(
    600.0, help="Seconds a video may take to decode before it is recorded as failed and its "
    "decoding process replaced (0: no limit)."
)
EXECUTOR = typer.Option(
    "local", help="local: this process and its decoders; dask: one task per unit on --scheduler."
)
SCHEDULER = typer.Option(
    None,
    help="Dask scheduler: tcp://host:8786, a scheduler file (.json), or local:N for a "
    "LocalCluster of N workers.",
    show_default="local:2",
)
PROGRESS = typer.Option(True, help="Show progress bars.")
PRECISION = typer.Option(
    "auto", help="Arithmetic of the tracker and the backbone: auto (bf16 on CUDA and on CPUs "
    "with bf16 matrix units, AMX or AVX512-BF16; else fp32), bf16, or fp32 (the figures of "
    "docs/faithful.md; no TF32 on CUDA). The stores record it; lk and pixels compute in fp32, "
    "and so does the clustering backbone of semantic queries."
)

# Stage one: shares, leases, the time base, the store's layout.
SHARD_INDEX = typer.Option(
    None,
    help="Which share of the work this process starts with, 0-based (it then helps with units "
    "nobody holds; leases keep every unit to one process at a time).",
    show_default="$SLURM_ARRAY_TASK_ID, else $RANK, else 0",
)
NUM_SHARDS = typer.Option(
    None,
    help="Into how many even, contiguous shares the work is split.",
    show_default="$SLURM_ARRAY_TASK_MAX + 1, else $WORLD_SIZE, else 1",
)
LEASE_TIMEOUT = typer.Option(
    180.0, help="Seconds without a heartbeat after which a unit's lease is taken over by another "
    "worker (a holder's death on the same host is noticed at once)."
)
MAX_ATTEMPTS = typer.Option(
    3, help="Times a failed video is tried over all runs, one try per run (all its tasks "
    "together), before it is reported and left."
)
FRAMES = typer.Option(8, help="Frames stored per video (the frames training uses).")
FPS = typer.Option(
    10.0, help="Time base in frames per second, on which the stored frames are chosen (both "
    "stages of a run use the same); 0 keeps the native rate."
)
WEBM_NATIVE = typer.Option(
    True, help="Keep .webm videos (Something-Something v2) at their native frame rate."
)
SHARD_SIZE = typer.Option(64, help="Videos per store shard (one file per array and shard).")
TRACKS_BATCH = typer.Option(
    None,
    help="Videos per tracker call (CoTracker3 packs them into GPU batches by their points).",
    show_default="8 on a GPU, 1 on a CPU",
)
FEATURES_BATCH = typer.Option(4, help="Videos per backbone forward.")

# The stages' weights and tracker settings (a checkpoint's training stores name the files
# `tats predict` must be given).
TRACKER_WEIGHTS = typer.Option(
    None,
    "--tracker-weights",
    help="Tracker weights (.pth; `tats weights` lists them and where to get them).",
    show_default="the torch hub cache",
)
TRACKER_OPTION = typer.Option(
    [],
    help="A tracker setting KEY=VALUE, repeatable; cotracker3: from_query_frame=false "
    "(track whole clips, as the official code), passes=per_query_frame, "
    "max_offline_frames=N, online_checkpoint=PATH; official: "
    "model=cotracker2 (or cotracker2v1, cotracker3), passes=per_query_frame, "
    "support_grid=false, online=true.",
    show_default=False,
)
BACKBONE_WEIGHTS = typer.Option(
    None,
    "--backbone-weights",
    help="Backbone weights: an official dinov2_*_pretrain.pth or a timm / Hugging Face "
    "checkpoint (`tats weights` lists them).",
    show_default="the Hugging Face and torch hub caches",
)
CLUSTER_WEIGHTS = typer.Option(
    None,
    "--cluster-weights",
    help="Semantic queries: the clustering backbone's weights.",
    show_default="its caches",
)

# The releases' fixes and protocol (tats/fixes.py): `tats run`, `tats-train`.
FIXES = typer.Option(
    None,
    help="The fixes of the releases to run: all, none, or names separated by commas ("
    + ", ".join(FIX_NAMES)
    + "; docs/faithful.md says what each changes).",
    show_default="none with --recipe, else all",
)
PROTOCOL = typer.Option(
    None,
    help="release: validate on the test split every 5 epochs with test-episodes / 5 episodes, "
    "test the last epoch, the release's seed (what the releases ran); clean: validate on the "
    "val split after every epoch, test the best epoch on val (both checkpoints are tested "
    "where they differ).",
    show_default="release with --recipe, else clean",
)


def command_line(ctx: typer.Context) -> dict:
    """The options given on the command line, by parameter name, with their values (by the
    source's name: typer ships its own copy of click's ParameterSource)."""
    given = {}
    for name, value in ctx.params.items():
        source = ctx.get_parameter_source(name)
        if source is not None and source.name == "COMMANDLINE":
            given[name] = value
    return given


# Old name -> new name, by command (tats.cli.common.renamed): accepted, hidden from --help,
# until the next release. docs/changelog.md lists them.
RENAMED = {
    "tracks": {"checkpoint": "--tracker-weights", "batch_videos": "--tracks-batch"},
    "features": {"weights": "--backbone-weights", "batch_videos": "--features-batch"},
    "run": {"checkpoint": "--tracker-weights", "weights": "--backbone-weights"},
    "predict": {"tracker_checkpoint": "--tracker-weights", "weights": "--backbone-weights"},
    "viz queries": {
        "method": "--cluster-method", "backbone": "--cluster-backbone",
        "weights": "--cluster-weights", "frames": "--cluster-frames",
        "threshold": "--merge-threshold",
    },
    "train": {"config": "--train-config"},
}  # fmt: skip
