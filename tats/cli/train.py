"""`tats-train`: few-shot training and evaluation from the two stores (never from video).

Options come from the defaults, then `--recipe NAME` (its [train] table and method), then
`--train-config FILE` (JSON, or TOML on Python 3.11+, keys as the long option names), then the
command line. Run under `torchrun --nproc_per_node N` for DDP.
"""

from __future__ import annotations

import os
from pathlib import Path

import typer

from tats.cli import options as opt
from tats.cli.common import OK, fail, input_errors, renamed
from tats.cli.options import RENAMED

HELP = (
    "Stage two: train the TATs few-shot model on tracks.zarr + features.zarr, select it on the "
    "val split, evaluate it on the test split. --eval-only evaluates a checkpoint. Options come "
    "from the defaults, then --recipe, then --train-config FILE, then the command line; run under "
    "torchrun for DDP."
)
app = typer.Typer(add_completion=False, rich_markup_mode=None)
NOT_TRAIN_OPTIONS = ("recipe", "train_config", "eval_only", "checkpoint")  # main's other parameters


def _steps(text: str | None) -> list[int] | None:
    if text is None:
        return None
    try:
        return [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise fail(
            f"--lr-steps: expected epochs separated by commas (e.g. 20,40), got {text!r}"
        ) from None


def _main_process() -> bool:
    """Rank 0 of a torchrun job, or a plain process: the one that prints."""
    return os.environ.get("RANK", "0") == "0"


REQUIRED = "  [required]"  # here or in --train-config: typer cannot mark them itself


def _option(default: str, text: str, *names: str) -> typer.Option:
    """An option whose value may also come from --recipe or --train-config (so typer's own
    default is None), with the default it takes when none of them gives it."""
    return typer.Option(None, *names, help=text, show_default=default)


@app.command(help=HELP, cls=renamed(**RENAMED["train"]))
def main(
    tracks: Path = typer.Option(
        None, help="The tracks store (tats-extract tracks), here or in --train-config." + REQUIRED
    ),
    features: Path = typer.Option(
        None,
        help="The features store (tats-extract features), here or in --train-config." + REQUIRED,
    ),
    manifest: Path = typer.Option(
        None, "--manifest", "-m",
        help="The dataset manifest CSV, here or in --train-config." + REQUIRED,
    ),
    out: Path = typer.Option(
        None, "--out", "-o",
        help="Run folder (eval-only: output folder), here or in --train-config." + REQUIRED,
    ),
    recipe: str = typer.Option(
        None,
        help="A published configuration's training options (`tats recipes`, e.g. trokens/hmdb) "
        "or a recipe TOML file's; --train-config and the command line win over it.",
    ),
    train_config: Path = typer.Option(
        None, help="Options from a JSON or TOML file, keys as the long option names."
    ),
    eval_only: bool = typer.Option(
        False, "--eval-only", help="Only evaluate --checkpoint on the test split."
    ),
    checkpoint: Path = typer.Option(
        None, help="The tats-train checkpoint --eval-only evaluates (e.g. run/checkpoints/best.pt)."
    ),
    way: int = _option("5", "Classes per episode."),
    shot: int = _option("1", "Support clips per class."),
    train_queries: int = _option("6", "Query clips per class in training."),
    test_queries: int = _option("1", "Query clips per class in val/test."),
    episodes: int = _option("400", "Episodes (optimizer steps) per epoch."),
    epochs: int = _option("50", "Epochs."),
    val_episodes: int = _option("1000", "Val episodes after each epoch; 0: none."),
    test_episodes: int = _option("10000", "Test episodes at the end; 0: none."),
    method: str = _option(
        "tats",
        "A preset of the options below that make a method, filled in where not given: "
        "tats (--mask query, --no-cluster-sampling, --motion none: the defaults) or trokens "
        "(--mask visible, --cluster-sampling, --motion both; needs semantic-queries tracks).",
    ),
    tracks_mode: str = _option(
        "tracks",
        "tracks, or frozen: the first query frame's grid fixed where it starts (the "
        "appearance-only baseline).",
    ),
    mask: str = _option(
        "query",
        "query: points exist from their query frame on; visible: only where the tracker saw "
        "them (Trokens).",
    ),
    fresh_subset: bool = _option(
        "stored-subset", "A new random point subset per read, or the stored one.",
        "--fresh-subset/--stored-subset",
    ),
    cluster_sampling: bool = _option(
        "no-cluster-sampling",
        "Trokens: a new subset per training read, at least one point per cluster and the "
        "rest by cluster size (semantic-queries tracks); evaluation reads the stored subset.",
        "--cluster-sampling/--no-cluster-sampling",
    ),
    motion: str = _option(
        "none",
        "Motion tokens: none, hod (histograms of oriented displacements), offsets (relative "
        "offsets to every point), both (Trokens).",
    ),
    hod_bins: int = _option("32", "Bins of the displacement histograms."),
    augment: bool = _option(
        "augment", "A random feature view per training clip, or view 0 only.",
        "--augment/--no-augment",
    ),
    width: int = _option("the feature dim", "Transformer width."),
    depth: int = _option("1", "Transformer blocks."),
    heads: int = _option("8", "Attention heads."),
    mlp_ratio: float = _option("4.0", "MLP hidden size / width."),
    drop_path: float = _option("0.2", "Stochastic depth of the last block."),
    sampling: str = _option("nearest", "Patch sampling at the tracks: nearest, bilinear."),
    lr: float = _option("0.0001", "AdamW learning rate after warm-up."),
    weight_decay: float = _option("0.5", "AdamW weight decay."),
    warmup_epochs: int = _option("5", "Linear warm-up epochs."),
    warmup_lr: float = _option("1e-06", "Learning rate of the first epoch."),
    lr_steps: str = _option("20,40", "Epochs (from 0) where lr is multiplied by --lr-decay."),
    lr_decay: float = _option("0.1", "Factor applied at each lr step."),
    clip_grad: float = _option("off", "Clip the gradient L2 norm to this."),
    amp: str = _option("auto", "auto (bf16 on CUDA, off on CPU), bf16, fp16, off."),
    seed: int = _option("0", "Seed of the model and of every episode."),
    fixes: str = opt.FIXES,
    protocol: str = opt.PROTOCOL,
    device: str = _option("auto", "auto (CUDA where there is one), cpu, cuda, cuda:1, ..."),
    workers: int = _option("2", "DataLoader worker processes."),
    prefetch: int = _option("4", "Episodes each worker reads ahead."),
    log_every: int = _option("50", "Log every this many steps."),
    resume: bool = _option("off", "Continue the run in --out.", "--resume"),
) -> None:
    """Train on the train split, select on val, evaluate on test; or --eval-only."""
    options = {k: v for k, v in locals().items() if k not in NOT_TRAIN_OPTIONS}
    given = {k: str(v) if isinstance(v, Path) else v for k, v in options.items() if v is not None}
    from tats import viz
    from tats.chain import FILE_ONLY, check_recipe
    from tats.evaluate import evaluate
    from tats.recipes import load_recipe
    from tats.train import train
    from tats.train_config import TrainConfig, config_from_dict, read_config_file
    from tats.values import check_table

    if "lr_steps" in given:
        given["lr_steps"] = _steps(given["lr_steps"])
    with input_errors():
        chosen = load_recipe(recipe) if recipe is not None else None
        if chosen is not None:
            check_recipe(chosen)
        values = {"fixes": "none", "protocol": "release"} if chosen else {}
        values.update(chosen.train_options() if chosen else {})
        from_file = read_config_file(train_config) if train_config is not None else {}
        from_file = {k.replace("-", "_"): v for k, v in from_file.items()}
        if train_config is not None:
            check_table(TrainConfig, from_file, f"{train_config}:", FILE_ONLY)
        values.update(from_file)
        values.update(given)
        if chosen is not None and values["protocol"] == "release":
            values = {**chosen.release, **values}
        if eval_only:
            if checkpoint is None:
                raise fail("--eval-only needs --checkpoint")
            missing = [n for n in ("tracks", "features", "manifest", "out") if n not in values]
            if missing:
                raise fail(f"--eval-only needs {', '.join('--' + m for m in missing)}")
            result = evaluate(
                checkpoint, values["tracks"], values["features"], values["manifest"],
                values["out"], episodes=values.get("test_episodes", 10000),
                way=values.get("way"), shot=values.get("shot"),
                queries=values.get("test_queries"), seed=values.get("seed", 0),
                workers=values.get("workers", 2), device=values.get("device", "auto"),
            )  # fmt: skip
            if _main_process():
                viz.plot_confusion(
                    result.confusion, result.classes, Path(values["out"]) / "confusion.png"
                )
                typer.echo(
                    f"test: {result.accuracy:.2f} +- {result.ci95:.2f}% over {result.episodes} "
                    f"{result.way}-way {result.shot}-shot episodes; wrote "
                    f"{values['out']}/metrics.json"
                )
            raise typer.Exit(OK)
        run = train(config_from_dict(values, str(train_config or recipe or "") or None))
    if not _main_process():
        return
    best = "" if run.best_val_accuracy is None else f" (val {run.best_val_accuracy:.2f}%)"
    typer.echo(f"best checkpoint: {run.best_checkpoint}, epoch {run.best_epoch}{best}")
    if run.test is not None:
        typer.echo(
            f"test: {run.test.accuracy:.2f} +- {run.test.ci95:.2f}% over {run.test.episodes} "
            f"{run.test.way}-way {run.test.shot}-shot episodes"
        )
