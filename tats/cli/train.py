"""`tats-train`: few-shot training and evaluation from the two stores (never from video).

Options come from the defaults, then `--recipe NAME` (its [train] table and method), then
`--config FILE` (JSON, or TOML on Python 3.11+, keys as the long option names), then the
command line. Run under `torchrun --nproc_per_node N` for DDP.
"""

from __future__ import annotations

import os
from pathlib import Path

import typer

from tats.cli import options as opt
from tats.cli.common import OK, fail, input_errors

HELP = (
    "Stage two: train the TATs few-shot model on tracks.zarr + features.zarr, select it on the "
    "val split, evaluate it on the test split. --eval-only evaluates a checkpoint. Options come "
    "from the defaults, then --recipe, then --config FILE, then the command line; run under "
    "torchrun for DDP."
)
app = typer.Typer(add_completion=False, rich_markup_mode=None)
NOT_TRAIN_OPTIONS = ("recipe", "config", "eval_only", "checkpoint")  # main's other parameters


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


@app.command(help=HELP)
def main(
    tracks: Path = typer.Option(None, help="The tracks store (tats-extract tracks)."),
    features: Path = typer.Option(None, help="The features store (tats-extract features)."),
    manifest: Path = typer.Option(None, "--manifest", "-m", help="The dataset manifest CSV."),
    out: Path = typer.Option(None, "--out", "-o", help="Run folder (eval-only: output folder)."),
    recipe: str = typer.Option(
        None,
        help="A published configuration's training options (`tats recipes`, e.g. trokens/hmdb) "
        "or a recipe TOML file's; --config and the command line win over it.",
    ),
    config: Path = typer.Option(None, help="Options from a JSON or TOML file."),
    eval_only: bool = typer.Option(
        False, "--eval-only", help="Only evaluate --checkpoint on the test split."
    ),
    checkpoint: Path = typer.Option(None, help="Checkpoint for --eval-only."),
    way: int = typer.Option(None, help="Classes per episode [5]."),
    shot: int = typer.Option(None, help="Support clips per class [1]."),
    train_queries: int = typer.Option(None, help="Query clips per class in training [6]."),
    test_queries: int = typer.Option(None, help="Query clips per class in val/test [1]."),
    episodes: int = typer.Option(None, help="Episodes (optimizer steps) per epoch [400]."),
    epochs: int = typer.Option(None, help="Epochs [50]."),
    val_episodes: int = typer.Option(None, help="Val episodes after each epoch; 0: none [1000]."),
    test_episodes: int = typer.Option(None, help="Test episodes at the end; 0: none [10000]."),
    method: str = typer.Option(
        None,
        help="A preset of the options below that make a method, filled in where not given: "
        "tats (--mask query, --no-cluster-sampling, --motion none: the defaults) or trokens "
        "(--mask visible, --cluster-sampling, --motion both; needs semantic-queries tracks).",
    ),
    tracks_mode: str = typer.Option(
        None,
        help="tracks [default], or frozen: the first query frame's grid fixed where it "
        "starts (the appearance-only baseline).",
    ),
    mask: str = typer.Option(
        None,
        help="query: points exist from their query frame on [default]; visible: only where "
        "the tracker saw them (Trokens).",
    ),
    fresh_subset: bool = typer.Option(
        None, "--fresh-subset/--stored-subset", help="A new random point subset per read."
    ),
    cluster_sampling: bool = typer.Option(
        None,
        "--cluster-sampling/--no-cluster-sampling",
        help="Trokens: a new subset per training read, at least one point per cluster and the "
        "rest by cluster size (semantic-queries tracks); evaluation reads the stored subset.",
    ),
    motion: str = typer.Option(
        None,
        help="Motion tokens: none [default], hod (histograms of oriented displacements), "
        "offsets (relative offsets to every point), both (Trokens).",
    ),
    hod_bins: int = typer.Option(None, help="Bins of the displacement histograms [32]."),
    augment: bool = typer.Option(
        None, "--augment/--no-augment", help="A random feature view per training clip [on]."
    ),
    width: int = typer.Option(None, help="Transformer width [the feature dim]."),
    depth: int = typer.Option(None, help="Transformer blocks [1]."),
    heads: int = typer.Option(None, help="Attention heads [8]."),
    mlp_ratio: float = typer.Option(None, help="MLP hidden size / width [4]."),
    drop_path: float = typer.Option(None, help="Stochastic depth of the last block [0.2]."),
    sampling: str = typer.Option(None, help="Patch sampling at the tracks: nearest, bilinear."),
    lr: float = typer.Option(None, help="AdamW learning rate after warm-up [1e-4]."),
    weight_decay: float = typer.Option(None, help="AdamW weight decay [0.5]."),
    warmup_epochs: int = typer.Option(None, help="Linear warm-up epochs [5]."),
    warmup_lr: float = typer.Option(None, help="Learning rate of the first epoch [1e-6]."),
    lr_steps: str = typer.Option(None, help="Epochs (from 0) where lr is multiplied [20,40]."),
    lr_decay: float = typer.Option(None, help="Factor applied at each lr step [0.1]."),
    clip_grad: float = typer.Option(None, help="Clip the gradient L2 norm to this [off]."),
    amp: str = typer.Option(None, help="auto (bf16 on CUDA, off on CPU), bf16, fp16, off."),
    seed: int = typer.Option(None, help="Seed of the model and of every episode [0]."),
    fixes: str = opt.FIXES,
    protocol: str = opt.PROTOCOL,
    device: str = typer.Option(None, help="auto, cpu, cuda, cuda:1 ... [auto]."),
    workers: int = typer.Option(None, help="DataLoader worker processes [2]."),
    prefetch: int = typer.Option(None, help="Episodes each worker reads ahead [4]."),
    log_every: int = typer.Option(None, help="Log every this many steps [50]."),
    resume: bool = typer.Option(None, "--resume", help="Continue the run in --out."),
) -> None:
    """Train on the train split, select on val, evaluate on test; or --eval-only."""
    options = {k: v for k, v in locals().items() if k not in NOT_TRAIN_OPTIONS}
    given = {k: str(v) if isinstance(v, Path) else v for k, v in options.items() if v is not None}
    from tats import viz
    from tats.evaluate import evaluate
    from tats.recipes import load_recipe
    from tats.train import train
    from tats.train_config import config_from_dict, read_config_file

    if "lr_steps" in given:
        given["lr_steps"] = _steps(given["lr_steps"])
    with input_errors():
        chosen = load_recipe(recipe) if recipe is not None else None
        values = {"fixes": "none", "protocol": "release"} if chosen else {}
        values.update(chosen.train_options() if chosen else {})
        from_file = read_config_file(config) if config is not None else {}
        values.update({k.replace("-", "_"): v for k, v in from_file.items()})
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
        run = train(config_from_dict(values, str(config or recipe or "") or None))
    if not _main_process():
        return
    best = "" if run.best_val_accuracy is None else f" (val {run.best_val_accuracy:.2f}%)"
    typer.echo(f"best checkpoint: {run.best_checkpoint}, epoch {run.best_epoch}{best}")
    if run.test is not None:
        typer.echo(
            f"test: {run.test.accuracy:.2f} +- {run.test.ci95:.2f}% over {run.test.episodes} "
            f"{run.test.way}-way {run.test.shot}-shot episodes"
        )
