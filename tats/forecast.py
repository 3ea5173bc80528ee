"""A run's plan (`tats run --plan`): what the whole manifest will cost, projected from a
handful of its clips extracted with the run's own settings on this machine's device.

    forecast = plan_run(config, manifest, clips=8)
    print("\\n".join(forecast.lines(time_limit=12 * 3600)))

Measured on the sample (in a temporary folder): each stage's time once per process (the model
loaded, the store made, workers started) and its units' seconds per video (features: per view,
since training videos get every view and the others view 0), the stores' bytes per row after
compression and their files per unit, the peak memory of the process (and of a decoding
process, and of the GPU); then, on the sample's stores, the seconds of a training episode (the
trainer's own epoch), of a clip embedded for evaluation and of an episode matched. The
projection scales these to the manifest: seconds = once + per video x videos (one process; a
Slurm array of K tasks divides the videos), bytes = measured compression x the exact
uncompressed size of every row, files = fixed files + files per unit x units. Time is
projected for the machine and load of the moment: measure on a quiet machine.
"""

from __future__ import annotations

import json
import math
import re
import resource
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from tats.manifest import SPLITS, Manifest, VideoRow, read_manifest, write_manifest

PLAN_CLIPS = 8
TIMED_SECONDS = 10.0  # of training timed (4 to 32 episodes, after as many to warm up)
SLURM_MARGIN = 0.8  # of the wall-time limit a task plans to use (startup, slow nodes)


@dataclass(frozen=True)
class StageCost:
    """One extraction stage, measured on the sample and projected to the manifest."""

    name: str
    device: str
    load_seconds: float  # building the model, the store and the workers (once per process)
    seconds_per_item: float  # per video (tracks), per view (features)
    items: int  # videos (tracks) or views (features) of the whole manifest
    bytes: int  # the store, projected (compressed as measured)
    files: int  # the store's files (inodes), projected
    peak_rss: int  # bytes, this process
    peak_gpu: int | None  # bytes allocated on the GPU at most

    @property
    def seconds(self) -> float:
        """One process doing the whole stage."""
        return self.load_seconds + self.seconds_per_item * self.items

    def tasks(self, time_limit: float) -> int:
        """Slurm array tasks so that each task's share fits `time_limit` seconds (with a
        margin); 0 where one video is too long for it."""
        usable = time_limit * SLURM_MARGIN - self.load_seconds
        if usable <= self.seconds_per_item:
            return 0
        return max(1, math.ceil(self.seconds_per_item * self.items / usable))


@dataclass(frozen=True)
class TrainCost:
    """Training and evaluation, from model steps on inputs read from the sample's stores."""

    device: str
    precision: str
    seconds_per_episode: float
    seconds_per_clip: float  # reading and embedding one clip for evaluation
    seconds_per_match: float  # matching one evaluation episode (its clips embedded)
    episodes: int  # training episodes, all epochs
    clips_embedded: int  # by every validation pass and test pass
    episodes_matched: int  # by the same passes
    peak_rss: int
    peak_gpu: int | None

    @property
    def seconds(self) -> float:
        evaluation = self.seconds_per_clip * self.clips_embedded
        evaluation += self.seconds_per_match * self.episodes_matched
        return self.seconds_per_episode * self.episodes + evaluation


@dataclass(frozen=True)
class Forecast:
    """A run's plan: its stages' costs for a manifest of `videos` videos."""

    videos: int
    units: int  # store shards
    sample: int  # clips extracted
    stages: tuple[StageCost, ...]
    train: TrainCost | None
    decoder_peak_rss: int  # bytes, a decoding process at most
    measured: dict = field(default_factory=dict)  # what the projection was made from

    def to_dict(self) -> dict:
        return asdict(self) | {
            "stage_seconds": {s.name: s.seconds for s in self.stages},
            "train_seconds": None if self.train is None else self.train.seconds,
        }

    def lines(self, time_limit: float | None = None) -> list[str]:
        """The plan as a table for the terminal (and the docs)."""
        out = [
            f"plan for {self.videos:,} videos ({self.units:,} units), from {self.sample} of its "
            f"clips extracted:",
            f"  {'stage':<9} {'device':<24} {'time':>10} {'per video':>10} {'store':>10} "
            f"{'files':>8} {'peak memory':>12}",
        ]
        for s in self.stages:
            per = s.seconds_per_item * s.items / max(self.videos, 1)
            gpu = f" +{gb(s.peak_gpu)} GPU" if s.peak_gpu else ""
            out.append(
                f"  {s.name:<9} {s.device:<24} {duration(s.seconds):>10} {per:>9.2f}s "
                f"{gb(s.bytes):>10} {s.files:>8,} {gb(s.peak_rss):>12}{gpu}"
            )
        if self.train is not None:
            t = self.train
            gpu = f" +{gb(t.peak_gpu)} GPU" if t.peak_gpu else ""
            out.append(
                f"  {'train':<9} {t.device + ', ' + t.precision:<24} {duration(t.seconds):>10} "
                f"{'':>10} {'':>10} {'':>8} {gb(t.peak_rss):>12}{gpu}"
            )
            out.append(
                f"    ({t.episodes:,} episodes at {t.seconds_per_episode:.3f} s; val and test "
                f"embed {t.clips_embedded:,} clips at {1000 * t.seconds_per_clip:.1f} ms and "
                f"match {t.episodes_matched:,} episodes at {1000 * t.seconds_per_match:.1f} ms)"
            )
        total = sum(s.seconds for s in self.stages) + (self.train.seconds if self.train else 0)
        stores = sum(s.bytes for s in self.stages)
        out.append(
            f"  total {duration(total)} in one process; stores {gb(stores)}, "
            f"{sum(s.files for s in self.stages):,} files; a decoding process peaks at "
            f"{gb(self.decoder_peak_rss)}"
        )
        if time_limit is not None:
            for s in self.stages:
                tasks = s.tasks(time_limit)
                if tasks == 0:
                    out.append(f"  slurm {s.name}: one video takes longer than the limit")
                    continue
                per_task = s.load_seconds + s.seconds_per_item * math.ceil(s.items / tasks)
                out.append(
                    f"  slurm {s.name}: --tasks {tasks} for --time {clock(time_limit)} "
                    f"(about {duration(per_task)} per task)"
                )
        return out


def plan_rows(manifest: Manifest, clips: int) -> list[VideoRow]:
    """A handful of rows spread over the manifest, training and other videos in proportion
    (at least one of each where both exist), in manifest order."""
    rows = manifest.rows
    train = np.flatnonzero(rows.splits == SPLITS.index("train"))
    other = np.flatnonzero(rows.splits != SPLITS.index("train"))
    share = round(clips * len(train) / max(len(rows), 1))
    share = min(max(share, int(len(train) > 0)), len(train), clips - int(len(other) > 0))
    picked = [_spread(train, share), _spread(other, clips - share)]
    return [rows[int(i)] for i in np.sort(np.concatenate(picked))]


def _spread(rows: np.ndarray, count: int) -> np.ndarray:
    if count <= 0 or len(rows) == 0:
        return np.zeros(0, np.int64)
    return rows[np.unique(np.linspace(0, len(rows) - 1, min(count, len(rows))).round().astype(int))]


def plan_run(config, manifest: Manifest, clips: int = PLAN_CLIPS, train: bool = True) -> Forecast:
    """Extract `clips` of the manifest's videos with `config` (a RunConfig) in a temporary
    folder, time a few training steps on them, and project the whole run (see the module
    docstring). The run folder is not touched."""
    from tats.chain import STORES, stage_recipes
    from tats.pipeline.executors import build_stage, extract
    from tats.pipeline.ledger import Ledger

    if clips < 2:
        raise ValueError(f"--plan-clips must be at least 2, not {clips}")
    picked = plan_rows(manifest, clips)
    # Training videos first, in a unit of their own: a unit of val and test videos only has
    # fewer files (their empty views' arrays write nothing), so both kinds are counted.
    is_train = [row.split == "train" for row in picked]
    picked = [r for r, t in zip(picked, is_train, strict=True) if t] + [
        r for r, t in zip(picked, is_train, strict=True) if not t
    ]
    first_unit = sum(is_train) if 0 < sum(is_train) < len(picked) else len(picked)
    kinds = _unit_kinds(manifest, config.tracks.shard_size)
    with tempfile.TemporaryDirectory(prefix="tats-plan-") as tmp:
        folder = Path(tmp)
        sample_path = folder / "manifest.csv"
        write_manifest(picked, sample_path)
        sample = read_manifest(sample_path)
        costs, measured = [], {}
        for recipe in stage_recipes(config):
            recipe = replace(recipe, config=replace(recipe.config, shard_size=first_unit))
            _reset_peaks()
            tic = time.perf_counter()
            stage = build_stage(recipe)
            load = time.perf_counter() - tic
            tic = time.perf_counter()
            summary = extract(recipe, sample, folder / STORES[recipe.name], workers=config.workers,
                              progress=False)  # fmt: skip
            seconds = time.perf_counter() - tic
            if summary.failures:
                failure = summary.failures[0]
                raise ValueError(
                    f"{recipe.name} failed on {failure.video_id} of the plan's sample: "
                    f"{failure.error}"
                )
            items = _items(recipe.name, config, manifest)
            sample_items = _items(recipe.name, config, sample)
            store = folder / STORES[recipe.name]
            # What grows with the videos is the units' own time (decoding, computing, writing:
            # their ledger records); the rest of the stage's (the store made, workers started)
            # comes once per process, like the model's load.
            with Ledger(store / "ledger") as ledger:
                unit_seconds = sum(r.seconds.get("total", 0) + r.seconds.get("write", 0)
                                   for r in ledger.records().values())  # fmt: skip
            once = max(0.0, seconds - unit_seconds)
            data_bytes = _data_bytes(store)
            raw_full, raw_sample = _raw_bytes(recipe.name, config, stage, manifest, sample)
            fixed, per_unit = _files(store, units=2 if first_unit < len(picked) else 1)
            per_kind = {"train": per_unit[0], "other": per_unit[-1]}
            costs.append(StageCost(
                name=recipe.name, device=_device_text(stage), load_seconds=load + once,
                seconds_per_item=unit_seconds / sample_items, items=items,
                bytes=round(data_bytes / raw_sample * raw_full) + _meta_bytes(store),
                files=fixed + sum(per_kind[k] * n for k, n in kinds.items()),
                peak_rss=_peak_rss(), peak_gpu=_peak_gpu(),
            ))  # fmt: skip
            measured[recipe.name] = {
                "seconds": seconds, "unit_seconds": unit_seconds, "load_seconds": load,
                "items": sample_items, "data_bytes": data_bytes, "raw_bytes": raw_sample,
                "fixed_files": fixed, "files_per_unit": per_kind,
            }  # fmt: skip
        train_cost = _train_cost(config, manifest, sample, folder) if train else None
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    units = sum(kinds.values())
    return Forecast(len(manifest.rows), units, len(picked), tuple(costs), train_cost,
                    children, measured)  # fmt: skip


def _unit_kinds(manifest: Manifest, shard_size: int) -> dict[str, int]:
    """Units (shards of `shard_size` rows) with a training video, and the others."""
    train = manifest.rows.splits == SPLITS.index("train")
    starts = np.arange(0, len(train), shard_size)
    with_train = int(np.logical_or.reduceat(train, starts).sum()) if len(train) else 0
    return {"train": with_train, "other": len(starts) - with_train}


def _items(stage: str, config, manifest: Manifest) -> int:
    """What a stage's time grows with: videos (tracks), views (features: every view of a
    training video, view 0 of the others)."""
    if stage == "tracks":
        return len(manifest.rows)
    train = int((manifest.rows.splits == SPLITS.index("train")).sum())
    return train * config.features.views + len(manifest.rows) - train


def _raw_bytes(stage: str, config, built, manifest: Manifest, sample: Manifest) -> tuple[int, int]:
    from tats.preflight import store_sizes

    dim = getattr(getattr(built, "backbone", None), "dim", 64)
    sizes = [store_sizes(config.tracks, config.features, m, dim) for m in (manifest, sample)]
    return tuple(getattr(s, stage) for s in sizes)


def _data_bytes(store: Path) -> int:
    """Bytes of the store's array data: the shard files (`c.*`) of every array."""
    return sum(f.stat().st_size for f in store.glob("*/c.*") if f.is_file())


def _meta_bytes(store: Path) -> int:
    return sum(f.stat().st_size for f in store.rglob("*") if f.is_file()) - _data_bytes(store)


def store_inodes(store: Path) -> list[Path]:
    """The files and folders a finished store holds (the store's folder too); leases are
    gone once their units are."""
    return [store, *(p for p in store.rglob("*") if p.suffix != ".lease")]


def _files(store: Path, units: int) -> tuple[int, list[int]]:
    """The store's inodes that every store has, and those of each of its `units` units (its
    shard files and its ledger record)."""
    inodes = store_inodes(store)
    per_unit = []
    for unit in range(units):
        names = (f"c.{unit}.", f"unit-{unit:06d}.")
        per_unit.append(sum(1 for p in inodes if p.name.startswith(names) or p.name == f"c.{unit}"))
    return len(inodes) - sum(per_unit), per_unit


def _device_text(stage) -> str:
    model = getattr(stage, "tracker", None) or stage.backbone
    precision = getattr(model, "precision", "fp32")
    device = getattr(model, "device", "cpu")
    return f"{device}, {precision}"


def _reset_peaks() -> None:
    """Start the peak memory counters again (Linux: the process's resident peak)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass
    import torch

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def _peak_rss() -> int:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _peak_gpu() -> int | None:
    import torch

    return torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None


def _train_cost(config, manifest: Manifest, sample: Manifest, folder: Path) -> TrainCost:
    """Seconds per training episode from the trainer's own epoch (`tats.train.train_epoch` on
    its DataLoader: the reads, augmentation and step), per clip embedded from evaluation's
    (`embed_groups`: the reads and forward), and per episode matched (`hausdorff_scores` on an
    episode's tokens, the matching of the per-episode path, which the embed-once path batches);
    with the run's model, precision and workers, on the sample's clips dealt out to the
    episodes' classes, each timed after a warm-up."""
    import contextlib
    import io

    import torch

    from tats.episodes import EpisodeData, EpisodeKeys, EpisodeSpec, ReadOptions, SplitClasses
    from tats.evaluate import EVAL_BATCH, embed_groups, evaluation_options
    from tats.fewshot import hausdorff_scores
    from tats.model import TATsModel
    from tats.runtime import Runtime, amp_modes, autocast_dtype
    from tats.train import model_config, param_groups, train_epoch

    cfg = config.train
    _reset_peaks()
    train_amp, eval_amp = amp_modes(cfg.amp, cfg.device, cfg.fixes)
    rt = Runtime.setup(cfg.device, train_amp, cfg.workers, cfg.prefetch)
    eval_rt = replace(rt, amp_dtype=autocast_dtype(eval_amp, rt.device))
    data = EpisodeData.open(folder / "tracks.zarr", folder / "features.zarr", sample)
    rows = data.usable
    train_rows = rows[sample.rows.splits[rows] == SPLITS.index("train")]
    spec = EpisodeSpec(cfg.way, cfg.shot, cfg.train_queries)
    # Every class holds every training clip of the sample, as often as an episode draws it.
    pool = train_rows if len(train_rows) else rows
    dealt = np.resize(pool, max(len(pool), spec.per_class))
    classes = SplitClasses("train", tuple(map(str, range(spec.way))), (dealt,) * spec.way,
                           np.arange(spec.way))  # fmt: skip
    model = TATsModel(model_config(cfg, data, len(manifest.classes("train")))).to(rt.device)
    optimizer = torch.optim.AdamW(param_groups(model, cfg.weight_decay, cfg.fixes), lr=cfg.lr)
    scaler = torch.amp.GradScaler(rt.device.type, enabled=rt.amp_dtype == torch.float16)
    options = ReadOptions(cfg.augment, cfg.fresh_subset, cfg.tracks_mode, cfg.mask,
                          cfg.cluster_sampling, cfg.fill)  # fmt: skip
    dataset = data.dataset("train", spec, options, cfg.seed, 0, classes)

    def epochs(episodes: int, count: int) -> float:
        """The seconds of the last of `count` epochs of `episodes` on one DataLoader (the
        first starts its workers): with enough episodes, the loader's reads run beside the
        steps as in a run's epoch, rather than all ahead of them."""
        loader = rt.loader(dataset, EpisodeKeys(range(episodes)))
        timed = replace(cfg, episodes=episodes, log_every=episodes)
        with contextlib.redirect_stdout(io.StringIO()):  # the trainer's progress lines
            for epoch in range(count):
                seconds = train_epoch(model, loader, optimizer, scaler, timed, spec, epoch, rt,
                                      None)["seconds"]  # fmt: skip
        return seconds

    first = epochs(1, 1)  # an upper bound of an episode's seconds
    episodes = min(max(round(TIMED_SECONDS / first), 4), 32)
    per_episode = epochs(episodes, 2) / episodes

    model.eval()
    clips = np.resize(rows, EVAL_BATCH * 2)
    read = evaluation_options(cfg.to_dict())
    embed_once = read.per_clip
    if not embed_once:  # points drawn anew per episode: each episode embeds its own clips,
        read = replace(read, fresh_subset=False, cluster_sampling=False)  # read alike

    held: list[torch.Tensor] = []  # the last pass's tokens, which the matching is timed on

    def embed_clips() -> None:
        with torch.no_grad():
            held[:] = [t for _, t in embed_groups(model, data, [clips], read, eval_rt)]

    per_clip = _timed(embed_clips, rt.device, repeats=1) / len(clips)
    tokens = torch.cat(held)
    test_spec = EpisodeSpec(cfg.way, cfg.shot, cfg.test_queries)
    episode = tokens[np.arange(test_spec.way * test_spec.per_class) % len(tokens)].float()
    labels = torch.arange(test_spec.way, device=rt.device).repeat_interleave(test_spec.shot)
    support = test_spec.num_support

    def match() -> None:
        hausdorff_scores(episode[:support], labels, episode[support:], test_spec.way,
                         test_spec.shot)  # fmt: skip

    per_match = _timed(match, rt.device, repeats=10)
    embedded, matched = evaluation_work(cfg, manifest, embed_once)
    return TrainCost(
        device=str(rt.device), precision=rt.precision,
        seconds_per_episode=per_episode, seconds_per_clip=per_clip,
        seconds_per_match=per_match, episodes=cfg.episodes * cfg.epochs,
        clips_embedded=embedded, episodes_matched=matched, peak_rss=_peak_rss(),
        peak_gpu=_peak_gpu(),
    )  # fmt: skip


def evaluation_work(cfg, manifest: Manifest, embed_once: bool) -> tuple[int, int]:
    """The clips embedded and the episodes matched by a run's evaluation: a pass over its
    validation split at each validating epoch, then one over test for each checkpoint tested
    (best and last, which validation may make two epochs). A pass embeds each clip of its
    split once, or (`embed_once` False) each episode's clips with it."""
    val_clips = len(manifest.split_rows(cfg.val_split))
    validates = cfg.val_episodes and val_clips
    passes = sum(map(cfg.validates_after, range(cfg.epochs))) if validates else 0
    tests = (2 if passes else 1) if cfg.test_episodes else 0
    test_clips = len(manifest.split_rows("test"))
    episodes = passes * cfg.val_episodes + tests * cfg.test_episodes
    if not embed_once:
        return episodes * cfg.way * (cfg.shot + cfg.test_queries), episodes
    return passes * val_clips + tests * test_clips, episodes


def _timed(work, device, repeats: int = 3) -> float:
    """Seconds per call of `work`, after one call to warm up."""
    import torch

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    work()
    sync()
    tic = time.perf_counter()
    for _ in range(repeats):
        work()
    sync()
    return (time.perf_counter() - tic) / repeats


def gb(size: float | None) -> str:
    if size is None:
        return "-"
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6)):
        if size >= scale:
            return f"{size / scale:.1f} {unit}"
    return f"{size / 1e3:.0f} kB"


def duration(seconds: float) -> str:
    if seconds >= 86400:
        return f"{seconds / 86400:.1f} days"
    if seconds >= 3600:
        return f"{seconds / 3600:.1f} h"
    if seconds >= 60:
        return f"{seconds / 60:.1f} min"
    return f"{seconds:.1f} s"


def clock(seconds: float) -> str:
    s = round(seconds)
    return f"{s // 3600:02d}:{s % 3600 // 60:02d}:{s % 60:02d}"


def parse_clock(text: str) -> float:
    """A Slurm time limit in seconds: minutes, minutes:seconds, hours:minutes:seconds,
    days-hours, days-hours:minutes or days-hours:minutes:seconds."""
    match = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", text.strip())
    if not match or (match.group(1) is None and match.group(2) is None):
        raise ValueError(f"--time-limit {text!r}: expected Slurm's form, e.g. 12:00:00")
    days, *parts = match.groups()
    parts = [int(p) for p in parts if p is not None]
    if days is not None:  # days-hours[:minutes[:seconds]]
        h, m, s = (parts + [0, 0])[:3]
        return int(days) * 86400 + h * 3600 + m * 60 + s
    h, m, s = {1: (0, parts[0], 0), 2: (0, *parts), 3: tuple(parts)}[len(parts)]
    return h * 3600 + m * 60 + s


def write_json(forecast: Forecast, path: Path) -> None:
    path.write_text(json.dumps(forecast.to_dict(), indent=1) + "\n")
