"""The few-shot trainer: episodes from the stores, the original's schedule, DDP, exact resume.

    result = train(TrainConfig(tracks="t.zarr", features="f.zarr", manifest="m.csv", out="run"))
    scores = evaluate("run/checkpoints/best.pt", "t.zarr", "f.zarr", "m.csv", "eval")

One optimizer step per episode (per rank: under torchrun every rank draws its own episodes and
DDP averages their gradients), `episodes` steps an epoch. The learning rate is set once per
epoch as in the original: a linear warm-up from `warmup_lr` over `warmup_epochs`, then `lr`
times `lr_decay` at each of `lr_steps` (epochs counted from 0). AdamW with weight decay on all
parameters except the position embeddings and the CLS token (the original meant to exempt
those, but its list named no parameter, so it decayed everything but the CLS token).

Every epoch ends with a validation pass over a fixed set of val-split episodes and a
checkpoint: `last.pt` always, `best.pt` when validation improves. After the last epoch the
best checkpoint is evaluated on the test split (never used for selection). Episodes and the
torch random state are functions of (seed, rank, epoch), so `resume` after a kill continues to
the same weights an uninterrupted run reaches.

Files in `out`: config.json, checkpoints/{last,best}.pt, metrics.csv (one row per epoch),
metrics.json (history, best epoch, test results), tensorboard/, plots/*.png.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import os
import time
import warnings
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import torch
import torch.distributed as torch_dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from tats import viz
from tats.episodes import (
    EpisodeData,
    EpisodeKeys,
    EpisodeSpec,
    EpisodeWarning,
    ReadOptions,
    SplitClasses,
)
from tats.fewshot import accuracy_with_ci, episode_loss, hausdorff_scores
from tats.model import ModelConfig, TATsModel
from tats.stores import StoreError

AMP_MODES = ("auto", "bf16", "fp16", "off")
CHECKPOINT_FORMAT = "tats.train.checkpoint"
CHECKPOINT_VERSION = 1
# The original's no_weight_decay() named 'pos_embed' and 'temp_embed', matching no parameter.
NO_WEIGHT_DECAY = ("space_pos_embed", "time_pos_embed", "cls_token")
# Fields a resumed run may change: where things are and how fast, not what is trained.
STAT_NAMES = ("loss", "episode_loss", "cls_loss", "accuracy")
RESUME_MAY_CHANGE = (
    "tracks", "features", "manifest", "out", "resume", "device", "workers", "prefetch",
    "log_every", "test_episodes", "epochs",
)  # fmt: skip


@dataclass(frozen=True)
class TrainConfig:
    """Every option of `tats-train`; saved in every checkpoint and in metrics.json."""

    tracks: str
    features: str
    manifest: str
    out: str
    # episodes
    way: int = 5
    shot: int = 1
    train_queries: int = 6
    test_queries: int = 1
    episodes: int = 400  # optimizer steps per epoch (episodes per rank)
    epochs: int = 50
    val_episodes: int = 1000
    test_episodes: int = 10000
    # what the model sees
    tracks_mode: str = "tracks"  # "frozen": the appearance-only baseline
    mask: str = "query"
    fresh_subset: bool = False
    augment: bool = True  # a random feature view per training clip; False: view 0 only
    # model (feature dim, frames, grid and classes come from the stores and the manifest)
    width: int | None = None
    depth: int = 1
    heads: int = 8
    mlp_ratio: float = 4.0
    drop_path: float = 0.2
    sampling: str = "nearest"
    # optimisation
    lr: float = 1e-4
    weight_decay: float = 0.5
    warmup_epochs: int = 5
    warmup_lr: float = 1e-6
    lr_steps: tuple[int, ...] = (20, 40)
    lr_decay: float = 0.1
    clip_grad: float | None = None  # max gradient L2 norm; None: no clipping
    amp: str = "auto"  # auto: bf16 on CUDA when supported, off on CPU
    episode_weight: float = 1.0
    cls_weight: float = 1.0
    # running
    seed: int = 0
    device: str = "auto"
    workers: int = 2
    prefetch: int = 4
    log_every: int = 50
    resume: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "lr_steps", tuple(int(s) for s in self.lr_steps))
        EpisodeSpec(self.way, self.shot, self.train_queries)
        EpisodeSpec(self.way, self.shot, self.test_queries)
        ReadOptions(tracks_mode=self.tracks_mode, mask=self.mask)
        for name in ("episodes", "epochs", "depth", "heads", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, not {getattr(self, name)}")
        for name in ("val_episodes", "test_episodes", "warmup_epochs", "workers", "seed"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be at least 0, not {getattr(self, name)}")
        if self.prefetch < 1:
            raise ValueError(f"prefetch must be at least 1, not {self.prefetch}")
        if not (self.lr > 0 and self.warmup_lr > 0 and self.lr_decay > 0):
            raise ValueError("lr, warmup_lr and lr_decay must be positive")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay must be at least 0, not {self.weight_decay}")
        if list(self.lr_steps) != sorted(self.lr_steps):
            raise ValueError(f"lr_steps must be ascending, got {list(self.lr_steps)}")
        if self.clip_grad is not None and self.clip_grad <= 0:
            raise ValueError(f"clip_grad must be positive, not {self.clip_grad}")
        if self.amp not in AMP_MODES:
            raise ValueError(f"amp {self.amp!r} is not one of {AMP_MODES}")

    def to_dict(self) -> dict:
        data = asdict(self)
        data["lr_steps"] = list(self.lr_steps)
        return data


def config_from_dict(values: dict, source: str = "config") -> TrainConfig:
    """TrainConfig from a mapping whose keys are field names (dashes allowed for underscores)."""
    known = {f.name for f in fields(TrainConfig)}
    values = {key.replace("-", "_"): value for key, value in values.items()}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"{source}: unknown option {unknown[0]!r}")
    missing = [n for n in ("tracks", "features", "manifest", "out") if values.get(n) is None]
    if missing:
        raise ValueError(f"{source}: missing {', '.join('--' + m for m in missing)}")
    return TrainConfig(**values)


def read_config_file(path: str | Path) -> dict:
    """Options from a JSON file, or a TOML file (.toml; needs Python 3.11's tomllib)."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as error:
        raise ValueError(f"{path}: cannot read ({error.strerror or error})") from None
    if path.suffix == ".toml":
        try:
            import tomllib
        except ImportError:
            raise ValueError(f"{path}: TOML needs Python 3.11 or later; use JSON") from None
        try:
            values = tomllib.loads(text)
        except tomllib.TOMLDecodeError as error:
            raise ValueError(f"{path}: {error}") from None
    else:
        try:
            values = json.loads(text)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}:{error.lineno}: {error.msg}") from None
    if not isinstance(values, dict):
        raise ValueError(f"{path}: expected a table of options")
    return values


def learning_rate(config: TrainConfig, epoch: int) -> float:
    """The learning rate of (0-based) `epoch`: warm-up, then steps."""

    def stepped(e: int) -> float:
        return config.lr * config.lr_decay ** sum(e >= s for s in config.lr_steps)

    if epoch < config.warmup_epochs:
        target = stepped(config.warmup_epochs)
        return config.warmup_lr + epoch * (target - config.warmup_lr) / config.warmup_epochs
    return stepped(epoch)


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        (no_decay if name in NO_WEIGHT_DECAY else decay).append(param)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


# ---------------------------------------------------------------------------------------------
# Distributed runs and devices


@dataclass
class Distributed:
    """This process's place in a torchrun job (rank 0 of 1 without torchrun)."""

    rank: int = 0
    world: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @classmethod
    def setup(cls, device: str) -> Distributed:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        dev = torch.device(device)
        if dev.type == "cuda" and dev.index is None:
            dev = torch.device("cuda", local_rank)
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        if world > 1 and not torch_dist.is_initialized():
            torch_dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
        return cls(rank, world, dev)

    @property
    def main(self) -> bool:
        return self.rank == 0

    def gather(self, value) -> list:
        """Every rank's `value`, in rank order."""
        if self.world == 1:
            return [value]
        values = [None] * self.world
        torch_dist.all_gather_object(values, value)
        return values

    def mean(self, values: torch.Tensor) -> torch.Tensor:
        if self.world > 1:
            values = values.to(self.device)
            torch_dist.all_reduce(values)
            values = values / self.world
        return values.cpu()

    def barrier(self) -> None:
        if self.world > 1:
            torch_dist.barrier()


def autocast_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of an amp mode on a device (None: full precision)."""
    if amp == "auto":
        cuda_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if cuda_bf16 else None
    if amp == "fp16" and device.type != "cuda":
        raise ValueError("amp fp16 needs a CUDA device; use bf16 or off")
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "off": None}[amp]


def autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None:
        return nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def seed_torch(seed: int, rank: int, epoch: int) -> None:
    """The torch random state of an epoch (dropout, drop path): a function of its key."""
    torch.manual_seed(int(np.random.SeedSequence([seed, rank, epoch]).generate_state(1)[0]))


def make_loader(dataset, keys: EpisodeKeys, workers: int, prefetch: int, device) -> DataLoader:
    return DataLoader(
        dataset,
        batch_size=None,
        sampler=keys,
        num_workers=workers,
        persistent_workers=workers > 0,
        prefetch_factor=prefetch if workers > 0 else None,
        pin_memory=device.type == "cuda",
        generator=torch.Generator(),  # leaves the global torch random state alone
    )


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


# ---------------------------------------------------------------------------------------------
# Checkpoints


def save_checkpoint(path: Path, state: dict) -> None:
    """Write atomically: a kill while saving leaves the previous file whole."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: checkpoint not found")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises many types for a bad file
        raise ValueError(f"{path}: cannot read checkpoint: {error}") from error
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path}: not a tats-train checkpoint")
    if state.get("version") != CHECKPOINT_VERSION:
        raise ValueError(
            f"{path}: checkpoint version {state.get('version')}, this tats reads "
            f"{CHECKPOINT_VERSION}"
        )
    return state


def data_identity(data: EpisodeData) -> dict:
    """What the stores were made from, recorded in checkpoints and checked on resume."""
    return {
        "manifest_sha256": data.manifest.sha256,
        "tracks": data.tracks.provenance,
        "features": data.features.provenance,
    }


def model_from_checkpoint(state: dict, device: torch.device) -> TATsModel:
    model = TATsModel(ModelConfig(**state["model_config"]))
    model.load_state_dict(state["model"])
    return model.to(device).eval()


def check_resumable(state: dict, config: TrainConfig, data: EpisodeData, path: Path) -> None:
    saved = state["config"]
    now = config.to_dict()
    changed = [k for k in now if k not in RESUME_MAY_CHANGE and saved.get(k) != now[k]]
    if changed:
        k = changed[0]
        raise ValueError(
            f"{path}: cannot resume with {k}={now[k]!r}, the run was started with "
            f"{saved.get(k)!r} (use a new --out for a new run)"
        )
    if state["data"] != data_identity(data):
        raise ValueError(f"{path}: the run was trained on other stores or another manifest")


# ---------------------------------------------------------------------------------------------
# Evaluation


@dataclass
class EvalResult:
    """Few-shot accuracy over episodes of one split (percent), per class and confused."""

    split: str
    way: int
    shot: int
    episodes: int
    accuracy: float
    ci95: float
    classes: list[str]
    per_class: dict[str, float]
    confusion: np.ndarray  # [C, C] query counts, row = true class, column = predicted

    def to_dict(self) -> dict:
        return {**asdict(self), "confusion": self.confusion.tolist()}


@torch.no_grad()
def run_episodes(
    model: TATsModel, loader: DataLoader, spec: EpisodeSpec, device, amp_dtype, dist: Distributed
) -> list[tuple[int, np.ndarray, np.ndarray]]:
    """(episode index, true class, predicted class of each query) of every rank's episodes."""
    was_training = model.training
    model.eval()
    mine = []
    n = spec.num_support
    for batch in loader:
        batch = to_device(batch, device)
        with autocast(device, amp_dtype):
            tokens, _ = model(batch["features"], batch["positions"], batch["mask"])
        labels, classes = batch["labels"], batch["classes"]
        scores = hausdorff_scores(tokens[:n], labels[:n], tokens[n:], spec.way, spec.shot)
        label_class = classes[:n].view(spec.way, spec.shot)[:, 0]  # supports are class-major
        predicted = label_class[scores.argmax(dim=1)]
        index = int(batch["key"][1])
        mine.append((index, classes[n:].cpu().numpy(), predicted.cpu().numpy()))
    model.train(was_training)
    return sorted((r for part in dist.gather(mine) for r in part), key=lambda r: r[0])


def summarize(
    results: list[tuple[int, np.ndarray, np.ndarray]], classes: SplitClasses, spec: EpisodeSpec
) -> EvalResult:
    true = np.stack([r[1] for r in results])
    predicted = np.stack([r[2] for r in results])
    accuracy, ci = accuracy_with_ci((true == predicted).mean(axis=1) * 100)
    count = len(classes.names)
    confusion = np.zeros((count, count), np.int64)
    np.add.at(confusion, (true.ravel(), predicted.ravel()), 1)
    seen = confusion.sum(axis=1)
    per_class = {
        classes.names[c]: float(100 * confusion[c, c] / seen[c]) for c in np.flatnonzero(seen)
    }
    return EvalResult(
        classes.split, spec.way, spec.shot, len(results), accuracy, ci,
        list(classes.names), per_class, confusion,
    )  # fmt: skip


def episode_classes(data: EpisodeData, split: str, spec: EpisodeSpec) -> SplitClasses | None:
    """The split's classes for validation, or None (with a warning) when it cannot be drawn."""
    try:
        return data.classes(split, spec.per_class, 2)
    except StoreError as error:
        warnings.warn(f"no validation: {error}", EpisodeWarning, stacklevel=2)
        return None


def evaluate(
    checkpoint: str | Path,
    tracks: str | Path,
    features: str | Path,
    manifest: str | Path,
    out: str | Path | None,
    episodes: int = 10000,
    way: int | None = None,
    shot: int | None = None,
    queries: int | None = None,
    split: str = "test",
    seed: int = 0,
    workers: int = 2,
    device: str = "auto",
) -> EvalResult:
    """Evaluate a checkpoint on `episodes` episodes of `split`; way, shot and queries default to
    the checkpoint's. Writes metrics.json and confusion.png into `out` (when given)."""
    if episodes < 1:
        raise ValueError(f"episodes must be at least 1, not {episodes}")
    state = load_checkpoint(checkpoint)
    saved = state["config"]
    dist = Distributed.setup(device)
    data = EpisodeData.open(tracks, features, manifest)
    check_model_fits(ModelConfig(**state["model_config"]), data, Path(checkpoint))
    spec = EpisodeSpec(way or saved["way"], shot or saved["shot"], queries or saved["test_queries"])
    options = ReadOptions(
        fresh_subset=saved["fresh_subset"], tracks_mode=saved["tracks_mode"], mask=saved["mask"]
    )
    classes = data.classes(split, spec.per_class, spec.way)
    result = evaluate_split(
        model_from_checkpoint(state, dist.device), data, classes, spec, options, episodes, seed,
        workers, saved["prefetch"], autocast_dtype(saved["amp"], dist.device), dist,
    )  # fmt: skip
    if out is not None and dist.main:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / "metrics.json", {
            "checkpoint": str(Path(checkpoint).resolve()), "config": saved,
            "epoch": state["epoch"], split: result.to_dict(),
        })  # fmt: skip
        viz.plot_confusion(result.confusion, result.classes, out / "confusion.png")
    return result


def evaluate_split(
    model, data, classes, spec, options, episodes, seed, workers, prefetch, amp_dtype, dist
) -> EvalResult:
    """`episodes` episodes of one split, shared out by index between the ranks."""
    dataset = data.dataset(classes.split, spec, options, seed, rank=0, classes=classes)
    keys = EpisodeKeys(range(dist.rank, episodes, dist.world))
    loader = make_loader(dataset, keys, min(workers, len(keys)), prefetch, dist.device)
    results = run_episodes(model, loader, spec, dist.device, amp_dtype, dist)
    return summarize(results, classes, spec)


def check_model_fits(model_cfg: ModelConfig, data: EpisodeData, source: Path) -> None:
    want = (model_cfg.feature_dim, model_cfg.num_frames, model_cfg.grid_size)
    have = (data.feature_dim, data.num_frames, data.grid[0])
    if want != have or data.grid[0] != data.grid[1]:
        raise StoreError(
            f"{source}: the model takes (feature dim, frames, grid) = {want}, the stores hold "
            f"{have[:2] + (data.grid,)}"
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
    test: EvalResult | None


def write_json(path: Path, value) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(value, indent=1) + "\n")
    os.replace(tmp, path)


def write_history(out: Path, history: list[dict], summary: dict) -> None:
    columns = [k for k in history[0] if not isinstance(history[0][k], list)]
    tmp = out / ".metrics.csv.tmp"
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(history)
    os.replace(tmp, out / "metrics.csv")
    write_json(out / "metrics.json", {**summary, "history": history})


def train(config: TrainConfig) -> RunResult:
    """Train (or resume) the run in `config.out`, then evaluate its best checkpoint on test."""
    cfg = config
    dist = Distributed.setup(cfg.device)
    device, main = dist.device, dist.main
    amp_dtype = autocast_dtype(cfg.amp, device)
    out = Path(cfg.out)
    last_path, best_path = out / "checkpoints" / "last.pt", out / "checkpoints" / "best.pt"

    def log(message: str) -> None:
        if main:
            print(message, flush=True)

    data = EpisodeData.open(cfg.tracks, cfg.features, cfg.manifest)
    train_spec = EpisodeSpec(cfg.way, cfg.shot, cfg.train_queries)
    test_spec = EpisodeSpec(cfg.way, cfg.shot, cfg.test_queries)
    train_classes = data.classes("train", train_spec.per_class, cfg.way)
    test_classes = data.classes("test", test_spec.per_class, cfg.way) if cfg.test_episodes else None
    val_classes = episode_classes(data, "val", test_spec) if cfg.val_episodes else None
    if val_classes is not None and len(val_classes.drawable) < cfg.way:
        val_way = len(val_classes.drawable)
        warnings.warn(f"val has {val_way} usable classes: validating {val_way}-way", EpisodeWarning)
        val_spec = EpisodeSpec(val_way, cfg.shot, cfg.test_queries)
    else:
        val_spec = test_spec
    if data.grid[0] != data.grid[1]:
        raise StoreError(f"{data.features.path}: patch grids {data.grid} are not square")
    model_cfg = ModelConfig(
        feature_dim=data.feature_dim, width=cfg.width, depth=cfg.depth, num_heads=cfg.heads,
        mlp_ratio=cfg.mlp_ratio, num_frames=data.num_frames, grid_size=data.grid[0],
        num_classes=len(train_classes.names), sampling=cfg.sampling, drop_path_rate=cfg.drop_path,
    )  # fmt: skip

    torch.manual_seed(cfg.seed)
    model = TATsModel(model_cfg).to(device)
    optimizer = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    start_epoch, best_epoch, best_val, history = 0, 0, -math.inf, []
    if last_path.is_file():
        if not cfg.resume:
            raise ValueError(f"{out} already holds a run; pass --resume, or use a new --out")
        state = load_checkpoint(last_path)
        check_resumable(state, cfg, data, last_path)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        start_epoch, history = state["epoch"], state["history"]
        best_epoch, best_val = state["best_epoch"], state["best_val_accuracy"]
        log(f"resuming {out} after epoch {start_epoch}")
    elif cfg.resume:
        log(f"nothing to resume in {out}: starting")
    if main:
        (out / "checkpoints").mkdir(parents=True, exist_ok=True)
        write_json(out / "config.json", cfg.to_dict())
    dist.barrier()
    net = DistributedDataParallel(model) if dist.world > 1 else model

    options = ReadOptions(cfg.augment, cfg.fresh_subset, cfg.tracks_mode, cfg.mask)
    train_set = data.dataset("train", train_spec, options, cfg.seed, dist.rank, train_classes)
    train_keys = EpisodeKeys(range(cfg.episodes))
    train_loader = make_loader(train_set, train_keys, cfg.workers, cfg.prefetch, device)
    eval_options = ReadOptions(False, cfg.fresh_subset, cfg.tracks_mode, cfg.mask)
    writer = None
    if main:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(out / "tensorboard", purge_step=start_epoch * cfg.episodes)
    params = sum(p.numel() for p in model.parameters())
    log(
        f"training {params / 1e6:.2f}M parameters on {dist.world} x {device}: "
        f"{cfg.way}-way {cfg.shot}-shot, {cfg.episodes} episodes x {cfg.epochs} epochs, "
        f"{len(train_classes.drawable)} train classes, {len(data.usable)} usable videos"
    )

    for epoch in range(start_epoch, cfg.epochs):
        lr = learning_rate(cfg, epoch)
        for group in optimizer.param_groups:
            group["lr"] = lr
        train_keys.set_epoch(epoch)
        seed_torch(cfg.seed, dist.rank, epoch)
        record = train_epoch(
            net, train_loader, optimizer, scaler, cfg, train_spec, epoch, dist, amp_dtype, writer
        )
        record["lr"] = lr
        if val_classes is not None:
            val = evaluate_split(
                model, data, val_classes, val_spec, eval_options, cfg.val_episodes, cfg.seed,
                cfg.workers, cfg.prefetch, amp_dtype, dist,
            )  # fmt: skip
            record["val_accuracy"], record["val_ci95"] = val.accuracy, val.ci95
        history.append(record)
        improved = val_classes is None or record["val_accuracy"] > best_val
        if improved:
            best_epoch = epoch + 1
            if val_classes is not None:
                best_val = record["val_accuracy"]
        if main:
            ckpt = {
                "format": CHECKPOINT_FORMAT,
                "version": CHECKPOINT_VERSION,
                "config": cfg.to_dict(),
                "model_config": asdict(model_cfg),
                "train_classes": list(train_classes.names),
                "data": data_identity(data),
                "model": model.state_dict(),
                "epoch": epoch + 1,
                "best_epoch": best_epoch,
                "best_val_accuracy": best_val,
                "history": history,
            }
            if improved:
                save_checkpoint(best_path, ckpt)
            ckpt.update(optimizer=optimizer.state_dict(), scaler=scaler.state_dict())
            save_checkpoint(last_path, ckpt)
            write_history(out, history, summary(cfg, best_epoch, best_val))
            for name in ("loss", "train_accuracy", "val_accuracy", "data_wait_share"):
                if record[name] is not None:
                    writer.add_scalar(f"epoch/{name}", record[name], epoch + 1)
            writer.flush()
        val_text = "" if record["val_accuracy"] is None else (
            f", val {record['val_accuracy']:.2f} +- {record['val_ci95']:.2f}% "
            f"({val_spec.way}-way)"
        )
        log(
            f"epoch {epoch + 1}/{cfg.epochs}: loss {record['loss']:.4f}, train acc "
            f"{record['train_accuracy']:.1f}%{val_text}, {record['episodes_per_second']:.2f} "
            f"episodes/s, data wait {100 * record['data_wait_share']:.1f}%"
        )
    del train_loader  # stops its workers

    test = None
    dist.barrier()
    if test_classes is not None:
        best = load_checkpoint(best_path)
        model.load_state_dict(best["model"])
        test = evaluate_split(
            model, data, test_classes, test_spec, eval_options, cfg.test_episodes, cfg.seed,
            cfg.workers, cfg.prefetch, amp_dtype, dist,
        )  # fmt: skip
        log(
            f"test ({best_path.name}, epoch {best_epoch}): {test.accuracy:.2f} +- "
            f"{test.ci95:.2f}% over {test.episodes} {test.way}-way {test.shot}-shot episodes"
        )
    if main:
        extra = {"test": test.to_dict()} if test is not None else {}
        write_history(out, history, {**summary(cfg, best_epoch, best_val), **extra})
        viz.plot_history(history, out / "plots")
        if test is not None:
            viz.plot_confusion(test.confusion, test.classes, out / "plots" / "confusion.png")
        writer.close()
    dist.barrier()
    return RunResult(
        out, last_path, best_path, best_epoch, None if best_val == -math.inf else best_val,
        history, test,
    )  # fmt: skip


def train_epoch(
    net: torch.nn.Module,
    loader: DataLoader,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    cfg: TrainConfig,
    spec: EpisodeSpec,
    epoch: int,
    dist: Distributed,
    amp_dtype: torch.dtype | None,
    writer,
) -> dict:
    """One epoch of episodes, one optimizer step each; returns the epoch's record."""
    net.train()
    device, n = dist.device, spec.num_support
    stats, rows_digest = [], hashlib.blake2b(digest_size=8)
    wait, started = 0.0, time.perf_counter()
    tic = started
    for step, batch in enumerate(loader):
        wait += time.perf_counter() - tic
        rows_digest.update(batch["rows"].numpy().tobytes())
        batch = to_device(batch, device)
        labels = batch["labels"]
        with autocast(device, amp_dtype):
            tokens, logits = net(batch["features"], batch["positions"], batch["mask"])
            scores = hausdorff_scores(tokens[:n], labels[:n], tokens[n:], spec.way, spec.shot)
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
                for name, value in zip(STAT_NAMES, recent, strict=True):
                    writer.add_scalar(f"train/{name}", value, epoch * cfg.episodes + step + 1)
            if dist.main:
                rate = dist.world * (step + 1) / (time.perf_counter() - started)
                print(
                    f"epoch {epoch + 1}/{cfg.epochs} step {step + 1}/{cfg.episodes} loss "
                    f"{recent[0]:.4f} acc {recent[3]:.1f}% {rate:.2f} episodes/s",
                    flush=True,
                )
        tic = time.perf_counter()
    seconds = time.perf_counter() - started
    means = torch.stack(stats).mean(0).float().cpu()
    values = dist.mean(torch.cat([means, torch.tensor([wait / seconds, seconds])])).tolist()
    return {
        "epoch": epoch + 1,
        "lr": None,
        **dict(zip(("loss", "episode_loss", "cls_loss", "train_accuracy"), values[:4])),
        "val_accuracy": None,
        "val_ci95": None,
        "episodes_per_second": dist.world * cfg.episodes / values[5],
        "data_wait_share": values[4],
        "seconds": values[5],
        "episode_digests": dist.gather(rows_digest.hexdigest()),
    }


def summary(cfg: TrainConfig, best_epoch: int, best_val: float) -> dict:
    return {
        "config": cfg.to_dict(),
        "best_epoch": best_epoch,
        "best_val_accuracy": None if best_val == -math.inf else best_val,
    }
