"""The few-shot trainer: episodes from the stores, the original's schedule, DDP, exact resume.

    result = train(TrainConfig(tracks="t.zarr", features="f.zarr", manifest="m.csv", out="run"))

One optimizer step per episode, `episodes` steps an epoch. Under torchrun every rank draws its
own episodes and DDP averages their gradients (the original's ranks all drew the same ones).
The learning rate is set once per epoch, as in the original: a linear warm-up from `warmup_lr`
over `warmup_epochs`, then `lr`, times `lr_decay` at each of `lr_steps` (epochs counted from
0). AdamW decays every parameter but the position embeddings and the CLS token (the original
meant to spare those, but its list named no parameter, so only the CLS token was spared).

Each epoch ends with a validation pass over a fixed set of val-split episodes and a
checkpoint: `last.pt` always, `best.pt` when validation improves. After the last epoch the
best checkpoint is evaluated on the test split, which never takes part in selection
(tats/evaluate.py: every clip embedded once, then each episode matched). Episodes
and the torch random state are functions of (seed, rank, epoch), so `resume` after a kill
continues to the weights an uninterrupted run reaches.

Files in `out`: config.json, checkpoints/{last,best}.pt, metrics.csv (a row per epoch),
metrics.json (history, best epoch, test results), tensorboard/, plots/*.png.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import math
import os
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from tats import viz
from tats.checkpoints import CHECKPOINT_FORMAT, CHECKPOINT_VERSION, load_checkpoint, save_checkpoint
from tats.episodes import (
    EpisodeData,
    EpisodeKeys,
    EpisodeSpec,
    EpisodeWarning,
    ReadOptions,
    SplitClasses,
    warn_augmented_pixels,
    warn_padding,
)
from tats.evaluate import (
    EvalResult,
    check_model_fits,
    episode_predictions,
    eval_result,
    evaluation_options,
    write_json,
)
from tats.fewshot import episode_loss, hausdorff_scores
from tats.fixes import FIX_NAMES
from tats.model import MODEL_INPUTS, ModelConfig, TATsModel
from tats.runtime import Runtime, amp_modes, autocast_dtype, device_line
from tats.stores import StoreError
from tats.train_config import TrainConfig

# What a resumed run may change: where things are and how fast, not what is trained.
RESUME_MAY_CHANGE = (
    "tracks", "features", "manifest", "out", "resume", "device", "workers", "prefetch",
    "log_every", "test_episodes", "epochs",
)  # fmt: skip
# Options added after runs were first saved, with the value that reads as those runs read.
ADDED_SINCE = {"fill": "pad", "fixes": list(FIX_NAMES), "protocol": "clean"}
TRAIN_STATS = ("loss", "episode_loss", "cls_loss", "train_accuracy")


def learning_rate(config: TrainConfig, epoch: int) -> float:
    """The learning rate of (0-based) `epoch`: the original's warm-up, then steps."""

    def stepped(e: int) -> float:
        return config.lr * config.lr_decay ** sum(e >= s for s in config.lr_steps)

    if epoch < config.warmup_epochs:
        target = stepped(config.warmup_epochs)
        return config.warmup_lr + epoch * (target - config.warmup_lr) / config.warmup_epochs
    return stepped(epoch)


def param_groups(
    model: TATsModel, weight_decay: float, fixes: tuple[str, ...] = FIX_NAMES
) -> list[dict]:
    """AdamW groups: weight decay on all but the model's `no_weight_decay(fixes)` parameters."""
    exempt = model.no_weight_decay(fixes)
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        (no_decay if name in exempt else decay).append(param)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def draw_rank(fixes: tuple[str, ...], rank: int) -> int:
    """The rank a process's training episodes are drawn for: its own with the fix
    "rank-episodes", else 0 on every rank, as the releases' samplers (one seed for all)."""
    return rank if "rank-episodes" in fixes else 0


def seed_torch(seed: int, rank: int, epoch: int) -> None:
    """The torch random state of an epoch (dropout, drop path): a function of its key."""
    torch.manual_seed(int(np.random.SeedSequence([seed, rank, epoch]).generate_state(1)[0]))


# ---------------------------------------------------------------------------------------------
# Checkpoints (tats/checkpoints.py) and what they record


def data_identity(data: EpisodeData) -> dict:
    """What the stores were made from, recorded in checkpoints and checked on resume."""
    return {
        "manifest_sha256": data.manifest.sha256,
        "tracks": data.tracks.provenance,
        "features": data.features.provenance,
    }


def run_identity(data: EpisodeData, rt: Runtime) -> dict:
    """What else decides the episodes and the arithmetic of a run: the processes (each rank
    draws its own episodes), the precision, and the videos usable in both stores."""
    usable = hashlib.blake2b(data.usable.astype(np.int64).tobytes(), digest_size=8).hexdigest()
    precision = "fp32" if rt.amp_dtype is None else str(rt.amp_dtype).removeprefix("torch.")
    return {"world_size": rt.world, "precision": precision, "usable_videos": len(data.usable),
            "usable_digest": usable}  # fmt: skip


def check_resumable(
    state: dict, config: TrainConfig, data: EpisodeData, rt: Runtime, path: Path
) -> None:
    """Refuse, in one line, to resume a run into a different one: other options, stores,
    number of processes, precision, or videos (rows added to or failed in the stores)."""
    saved, now = {**ADDED_SINCE, **state["config"]}, config.to_dict()
    changed = [k for k in now if k not in RESUME_MAY_CHANGE and saved.get(k) != now[k]]
    if changed:
        k = changed[0]
        raise ValueError(
            f"{path}: cannot resume with {k}={now[k]!r}, the run was started with "
            f"{saved.get(k)!r} (use a new --out for a new run)"
        )
    if state["data"] != data_identity(data):
        raise ValueError(f"{path}: the run was trained on other stores or another manifest")
    was, is_now = state.get("run", {}), run_identity(data, rt)
    reasons = {
        "world_size": "processes (each rank draws its own episodes)",
        "precision": "precision (amp resolves per device)",
        "usable_digest": "usable videos (the stores changed since)",
    }
    for key, what in reasons.items():
        if key in was and was[key] != is_now[key]:
            then = was["usable_videos"] if key == "usable_digest" else was[key]
            this = is_now["usable_videos"] if key == "usable_digest" else is_now[key]
            raise ValueError(
                f"{path}: cannot resume: the run was trained with {then} {what}, this run has "
                f"{this}; resume it as it ran, or use a new --out"
            )


# ---------------------------------------------------------------------------------------------
# Training


@dataclass
class RunResult:
    out: Path
    last_checkpoint: Path
    best_checkpoint: Path
    best_epoch: int
    best_val_accuracy: float | None
    history: list[dict]
    test: EvalResult | None  # of the checkpoint the protocol tests (`test_checkpoint`)
    test_checkpoint: str = "best"  # "best" or "last"
    other_test: EvalResult | None = None  # of the other one, where it is of another epoch


def write_metrics(out: Path, history: list[dict], summary: dict) -> None:
    """metrics.csv (the scalar columns of the history) and metrics.json (everything)."""
    columns = [k for k, v in history[0].items() if not isinstance(v, list)]
    tmp = out / ".metrics.csv.tmp"
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(history)
    os.replace(tmp, out / "metrics.csv")
    write_json(out / "metrics.json", {**summary, "history": history})


def validation_spec(
    data: EpisodeData, spec: EpisodeSpec, split: str = "val"
) -> tuple[SplitClasses, EpisodeSpec]:
    """The classes and episodes of validation on `split`; fewer classes than `way` validate
    fewer-way."""
    classes = data.classes(split, spec.per_class, 2)
    if len(classes.drawable) < spec.way:
        way = len(classes.drawable)
        warnings.warn(f"{split} has {way} usable classes: validating {way}-way", EpisodeWarning, 2)
        spec = EpisodeSpec(way, spec.shot, spec.queries)
    return classes, spec


def model_config(cfg: TrainConfig, data: EpisodeData, num_classes: int) -> ModelConfig:
    """The model a run trains: `cfg`'s options over the stores' shapes, a CLS output per
    training class."""
    return ModelConfig(
        feature_dim=data.feature_dim, width=cfg.width, depth=cfg.depth, num_heads=cfg.heads,
        mlp_ratio=cfg.mlp_ratio, num_frames=data.num_frames, grid_size=data.grid[0],
        num_classes=num_classes, sampling=cfg.sampling, drop_path_rate=cfg.drop_path,
        motion=cfg.motion, hod_bins=cfg.hod_bins, num_points=data.points, fixes=cfg.fixes,
    )  # fmt: skip


def train(config: TrainConfig) -> RunResult:
    """Train (or resume) the run in `config.out`, then evaluate on test the checkpoint its
    protocol tests (best or last), and the other one too where it is of another epoch."""
    cfg = config
    train_amp, eval_amp = amp_modes(cfg.amp, cfg.device, cfg.fixes)
    rt = Runtime.setup(cfg.device, train_amp, cfg.workers, cfg.prefetch)
    eval_rt = dataclasses.replace(rt, amp_dtype=autocast_dtype(eval_amp, rt.device))
    rt.log(f"train: {rt.world} x {device_line(cfg.device, rt.device, rt.precision)}")
    out = Path(cfg.out)
    last_path, best_path = out / "checkpoints" / "last.pt", out / "checkpoints" / "best.pt"

    train_spec = EpisodeSpec(cfg.way, cfg.shot, cfg.train_queries)
    test_spec = EpisodeSpec(cfg.way, cfg.shot, cfg.test_queries)
    val_classes, val_spec = None, test_spec
    with warnings.catch_warnings():
        if not rt.main:  # one copy of each warning is enough
            warnings.simplefilter("ignore", EpisodeWarning)
        data = EpisodeData.open(cfg.tracks, cfg.features, cfg.manifest)
        train_classes = data.classes("train", train_spec.per_class, cfg.way)
        options = ReadOptions(cfg.augment, cfg.fresh_subset, cfg.tracks_mode, cfg.mask,
                              cfg.cluster_sampling, cfg.fill)  # fmt: skip
        train_set = data.dataset("train", train_spec, options, cfg.seed,
                                 draw_rank(cfg.fixes, rt.rank), train_classes)  # fmt: skip
        warn_padding(data, train_classes, options)
        warn_augmented_pixels(data, options)
        test_classes = None
        if cfg.test_episodes:
            test_classes = data.classes("test", test_spec.per_class, cfg.way)
        if cfg.val_episodes:
            try:
                val_classes, val_spec = validation_spec(data, test_spec, cfg.val_split)
            except StoreError as error:
                warnings.warn(f"no validation, best.pt is the last epoch: {error}",
                              EpisodeWarning, 2)  # fmt: skip
    model_cfg = model_config(cfg, data, len(train_classes.names))
    check_model_fits(model_cfg, data, data.features.path)

    torch.manual_seed(cfg.seed)
    model = TATsModel(model_cfg).to(rt.device)
    optimizer = torch.optim.AdamW(param_groups(model, cfg.weight_decay, cfg.fixes), lr=cfg.lr)
    scaler = torch.amp.GradScaler(rt.device.type, enabled=rt.amp_dtype == torch.float16)
    start_epoch, best_epoch, best_val, history = 0, 0, -math.inf, []
    if last_path.is_file():
        if not cfg.resume:
            raise ValueError(f"{out} already holds a run; pass --resume, or use a new --out")
        state = load_checkpoint(last_path)
        check_resumable(state, cfg, data, rt, last_path)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        start_epoch, history = state["epoch"], state["history"]
        best_epoch, best_val = state["best_epoch"], state["best_val_accuracy"]
        rt.log(f"resuming {out} after epoch {start_epoch}")
    elif cfg.resume:
        rt.log(f"nothing to resume in {out}: starting")
    writer = None
    if rt.main:
        from torch.utils.tensorboard import SummaryWriter

        (out / "checkpoints").mkdir(parents=True, exist_ok=True)
        write_json(out / "config.json", cfg.to_dict())
        writer = SummaryWriter(out / "tensorboard", purge_step=start_epoch * cfg.episodes)
    rt.barrier()

    net = DistributedDataParallel(model) if rt.world > 1 else model
    eval_options = evaluation_options(cfg.to_dict())
    train_keys = EpisodeKeys(range(cfg.episodes))
    train_loader = rt.loader(train_set, train_keys)
    rt.log(
        f"training {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters on "
        f"{rt.world} x {rt.device}: {cfg.way}-way {cfg.shot}-shot, {cfg.episodes} episodes x "
        f"{cfg.epochs} epochs, {len(train_classes.drawable)} train classes, "
        f"{len(data.usable)} usable videos"
    )
    for epoch in range(start_epoch, cfg.epochs):
        lr = learning_rate(cfg, epoch)
        for group in optimizer.param_groups:
            group["lr"] = lr
        train_keys.set_epoch(epoch)
        seed_torch(cfg.seed, rt.rank, epoch)
        record = {"epoch": epoch + 1, "lr": lr}
        record |= train_epoch(net, train_loader, optimizer, scaler, cfg, train_spec, epoch, rt,
                              writer)  # fmt: skip
        record |= {"val_accuracy": None, "val_ci95": None}
        if val_classes is not None and cfg.validates_after(epoch):
            val = eval_result(val_classes, val_spec, episode_predictions(
                model, data, val_classes, val_spec, eval_options, cfg.val_episodes, cfg.seed,
                eval_rt,
            ))  # fmt: skip
            record |= {"val_accuracy": val.accuracy, "val_ci95": val.ci95}
        history.append(record)
        improved = val_classes is None or (
            record["val_accuracy"] is not None and record["val_accuracy"] > best_val
        )
        if improved:
            best_epoch = epoch + 1
            best_val = best_val if val_classes is None else record["val_accuracy"]
        if rt.main:
            state = {
                "format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION,
                "config": cfg.to_dict(), "model_config": asdict(model_cfg),
                "train_classes": list(train_classes.names), "data": data_identity(data),
                "run": run_identity(data, rt),
                "model": model.state_dict(), "epoch": epoch + 1, "best_epoch": best_epoch,
                "best_val_accuracy": best_val, "history": history,
            }  # fmt: skip
            if improved:
                save_checkpoint(best_path, state)
            state |= {"optimizer": optimizer.state_dict(), "scaler": scaler.state_dict()}
            save_checkpoint(last_path, state)
            write_metrics(out, history, summary(cfg, best_epoch, best_val))
            for name in ("loss", "train_accuracy", "val_accuracy", "data_wait_share"):
                if record[name] is not None:
                    writer.add_scalar(f"epoch/{name}", record[name], epoch + 1)
            writer.flush()
        val_text = "" if record["val_accuracy"] is None else (
            f", val {record['val_accuracy']:.2f} +- {record['val_ci95']:.2f}% ({val_spec.way}-way"
            f"{', test split' if cfg.val_split == 'test' else ''})"
        )  # fmt: skip
        rt.log(
            f"epoch {epoch + 1}/{cfg.epochs}: loss {record['loss']:.4f}, train acc "
            f"{record['train_accuracy']:.1f}%{val_text}, {record['episodes_per_second']:.2f} "
            f"episodes/s, data wait {100 * record['data_wait_share']:.1f}%"
        )
    del train_loader  # stops its workers

    rt.barrier()  # best.pt is written
    final_epoch = history[-1]["epoch"] if history else 0
    tested = cfg.test_checkpoint
    other = "last" if tested == "best" else "best"
    tests: dict[str, EvalResult] = {}
    if test_classes is not None:
        checkpoints = {"best": (best_path, best_epoch), "last": (last_path, final_epoch)}
        wanted = [tested] + ([other] if best_epoch != final_epoch else [])
        for name in wanted:
            path, epoch = checkpoints[name]
            model.load_state_dict(load_checkpoint(path)["model"])
            tests[name] = result = eval_result(test_classes, test_spec, episode_predictions(
                model, data, test_classes, test_spec, eval_options, cfg.test_episodes, cfg.seed,
                eval_rt,
            ))  # fmt: skip
            rt.log(
                f"test ({path.name}, epoch {epoch}): {result.accuracy:.2f} +- "
                f"{result.ci95:.2f}% over {result.episodes} {result.way}-way {result.shot}-shot "
                f"episodes{'' if name == tested else ' (not the protocol choice)'}"
            )
    test, other_test = tests.get(tested), tests.get(other)
    if rt.main:
        results = {}
        if test is not None:
            results["test"] = {"checkpoint": tested, **test.to_dict()}
        if other_test is not None:
            results["other_test"] = {"checkpoint": other, **other_test.to_dict()}
        write_metrics(out, history, summary(cfg, best_epoch, best_val) | results)
        viz.plot_history(history, out / "plots")
        if test is not None:
            viz.plot_confusion(test.confusion, test.classes, out / "plots" / "confusion.png")
        writer.close()
    rt.barrier()
    best = None if best_val == -math.inf else best_val
    return RunResult(out, last_path, best_path, best_epoch, best, history, test, tested,
                     other_test)  # fmt: skip


def train_epoch(
    net: torch.nn.Module,
    loader: DataLoader,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    cfg: TrainConfig,
    spec: EpisodeSpec,
    epoch: int,
    rt: Runtime,
    writer,
) -> dict:
    """One epoch, an optimizer step per episode: mean losses and accuracy, speed, data wait."""
    net.train()
    n = spec.num_support
    stats, rows_digest = [], hashlib.blake2b(digest_size=8)
    wait, started = 0.0, time.perf_counter()
    tic = started
    for step, batch in enumerate(loader):
        wait += time.perf_counter() - tic
        rows_digest.update(batch["rows"].numpy().tobytes())
        batch = rt.to_device(batch)
        labels = batch["labels"]
        with rt.autocast():
            tokens, logits = net(**{k: batch[k] for k in MODEL_INPUTS})
            scores = hausdorff_scores(tokens[:n], labels[:n], tokens[n:], spec.way, spec.shot,
                                      "metric-fp32" in cfg.fixes)  # fmt: skip
            loss = episode_loss(
                scores, labels[n:], logits, batch["classes"], cfg.episode_weight, cfg.cls_weight
            )
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss.total).backward()
        if cfg.clip_grad is not None:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(net.parameters(), cfg.clip_grad)
        scaler.step(optimizer)
        scaler.update()
        accuracy = (scores.argmax(dim=1) == labels[n:]).float().mean() * 100
        stats.append(torch.stack([loss.total, loss.episode, loss.cls, accuracy]).detach())
        if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.episodes:
            recent = torch.stack(stats[-cfg.log_every :]).mean(0).tolist()
            if writer is not None:
                for name, value in zip(TRAIN_STATS, recent, strict=True):
                    writer.add_scalar(f"train/{name}", value, epoch * cfg.episodes + step + 1)
            rate = rt.world * (step + 1) / (time.perf_counter() - started)
            rt.log(
                f"epoch {epoch + 1}/{cfg.epochs} step {step + 1}/{cfg.episodes} loss "
                f"{recent[0]:.4f} acc {recent[3]:.1f}% {rate:.2f} episodes/s"
            )
        tic = time.perf_counter()
    seconds = time.perf_counter() - started
    means = torch.stack(stats).mean(0).tolist()
    *means, wait_share, seconds = rt.mean([*means, wait / seconds, seconds])
    return {
        **dict(zip(TRAIN_STATS, means, strict=True)),
        "episodes_per_second": rt.world * cfg.episodes / seconds,
        "data_wait_share": wait_share,
        "seconds": seconds,
        "episode_digests": rt.gather(rows_digest.hexdigest()),  # which episodes each rank ran
    }


def summary(cfg: TrainConfig, best_epoch: int, best_val: float) -> dict:
    return {
        "config": cfg.to_dict(),
        "best_epoch": best_epoch,
        "best_val_accuracy": None if best_val == -math.inf else best_val,
    }
