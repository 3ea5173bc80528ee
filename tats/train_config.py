"""The trainer's config: every option of `tats-train`, read from a mapping or a JSON / TOML file
(a `--method` preset filled in under the values given), checked when it is built. Saved in
every checkpoint, which `tats.checkpoints` checks with it before any work.

    config = config_from_dict(read_config_file("run.toml") | {"out": "runs/x"})
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from tats.episodes import EpisodeSpec, ReadOptions
from tats.fixes import FIX_NAMES, PROTOCOLS, RELEASE_VAL_SHARE, parse_fixes
from tats.methods import TRAIN_KEYS, with_method
from tats.model import MOTION_FEATURES, SAMPLING_MODES
from tats.runtime import AMP_MODES


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
    episodes: int = 400  # optimizer steps per epoch
    epochs: int = 50
    val_episodes: int = 1000
    test_episodes: int = 10000
    # what the model sees
    tracks_mode: str = "tracks"  # "frozen": a fixed grid of points, the appearance baseline
    mask: str = "query"
    fresh_subset: bool = False
    cluster_sampling: bool = False  # Trokens: cluster-balanced points per read (semantic stores)
    fill: str = "repeat"  # cluster-sampled clips with few points: Trokens' repeats, or "pad"
    augment: bool = True  # a random feature view per training clip; False: view 0 only
    motion: str = "none"  # Trokens' motion tokens: none, hod, offsets, both
    hod_bins: int = 32
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
    # the releases' fixes on (tats/fixes.py) and the protocol: "clean" validates on the val
    # split after every epoch and tests the best checkpoint; "release" validates on the test
    # split every 5 epochs and tests the last epoch's (the releases' test step)
    fixes: tuple[str, ...] = FIX_NAMES
    protocol: str = "clean"
    # running
    seed: int = 0
    device: str = "auto"
    workers: int = 2
    prefetch: int = 4
    log_every: int = 50
    resume: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "lr_steps", tuple(int(s) for s in self.lr_steps))
        object.__setattr__(self, "fixes", parse_fixes(self.fixes))
        if self.protocol not in PROTOCOLS:
            raise ValueError(f"protocol {self.protocol!r} is not one of {', '.join(PROTOCOLS)}")
        EpisodeSpec(self.way, self.shot, self.train_queries)
        EpisodeSpec(self.way, self.shot, self.test_queries)
        ReadOptions(self.augment, self.fresh_subset, self.tracks_mode, self.mask,
                    self.cluster_sampling, self.fill)  # fmt: skip
        if self.motion not in MOTION_FEATURES:
            raise ValueError(f"motion {self.motion!r} is not one of {MOTION_FEATURES}")
        if self.hod_bins < 1:
            raise ValueError(f"hod_bins must be at least 1, not {self.hod_bins}")
        for name in ("episodes", "epochs", "depth", "heads", "log_every", "prefetch"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, not {getattr(self, name)}")
        for name in ("val_episodes", "test_episodes", "warmup_epochs", "workers", "seed"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be at least 0, not {getattr(self, name)}")
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
        if self.sampling not in SAMPLING_MODES:
            raise ValueError(f"sampling {self.sampling!r} is not one of {SAMPLING_MODES}")

    def to_dict(self) -> dict:
        return {**asdict(self), "lr_steps": list(self.lr_steps), "fixes": list(self.fixes)}

    @property
    def val_split(self) -> str:
        """The split validation reads: the releases validate on test (a comment there says MoLo
        does so)."""
        return "test" if self.protocol == "release" else "val"

    @property
    def eval_period(self) -> int:
        """Validate after every this many epochs, and after the last (TRAIN.EVAL_PERIOD)."""
        return 5 if self.protocol == "release" else 1

    def validates_after(self, epoch: int) -> bool:
        """Whether validation runs after (0-based) `epoch`: every `eval_period` epochs, and
        after the last."""
        return (epoch + 1) % self.eval_period == 0 or epoch + 1 == self.epochs

    @property
    def test_checkpoint(self) -> str:
        """Which checkpoint the protocol tests: the releases' test step takes the last one by
        file name (`checkpoint_epoch_00050.pyth` sorts after `checkpoint_best.pyth`)."""
        return "last" if self.protocol == "release" else "best"


def with_protocol(values: dict) -> dict:
    """`values` over what its protocol fills where not given: "release" validates with the
    releases' episode count, FEW_SHOT.TEST_EPISODES // 5."""
    if values.get("protocol") == "release" and "val_episodes" not in values:
        tests = values.get("test_episodes", TrainConfig.test_episodes)
        values = {**values, "val_episodes": tests // RELEASE_VAL_SHARE}
    return values


def config_from_dict(values: dict, source: str | None = None) -> TrainConfig:
    """TrainConfig from a mapping whose keys are field names (dashes allowed for underscores)
    and, optionally, "method": a preset (tats/methods.py) under the values given; `source` (a
    config file) prefixes error messages."""
    where = f"{source}: " if source else ""
    known = {f.name for f in fields(TrainConfig)}
    values = {key.replace("-", "_"): value for key, value in values.items()}
    try:
        values = with_protocol(with_method(values, TRAIN_KEYS))
    except ValueError as error:
        raise ValueError(f"{where}{error}") from None
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"{where}unknown option {unknown[0]!r}")
    missing = [n for n in ("tracks", "features", "manifest", "out") if values.get(n) is None]
    if missing:
        raise ValueError(f"{where}missing {', '.join('--' + m for m in missing)}")
    return TrainConfig(**values)


def read_config_file(path: str | Path) -> dict:
    """Options from a JSON file, or from a TOML file (.toml, Python 3.11+: tomllib)."""
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
