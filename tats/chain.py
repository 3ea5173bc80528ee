"""The chain `tats run` runs: tracks, features and training into one run folder, each resuming.

    config = resolve_run("m.csv", "runs/a", recipe="trokens/hmdb", train={"epochs": 2})
    print(json.dumps(config.to_dict(), indent=1))      # what `tats run --print-config` shows
    result = run_chain(config)

Settings come from the stages' and trainer's defaults, then the recipe (tats/recipes.py), then
a file of training options, then the options given (the command line's): each later one wins.
A recipe runs the releases' protocol with every fix off (tats/fixes.py) unless `fixes` and
`protocol` say otherwise; without one, tats runs every fix and the clean protocol.
The method preset (tats/methods.py) fills the options that make a method wherever none of
those set them. The run folder's `run.json` records the resolved config with every path
relative to the run folder (and, for what lies outside it, also absolute), so that `tats
report` works from any directory and on a moved or copied folder (`run_inputs`).
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

from tats.fixes import FIX_NAMES, parse_fixes
from tats.manifest import Manifest, read_manifest
from tats.pipeline.features import FeaturesConfig, FeaturesRecipe
from tats.pipeline.runner import RunSummary
from tats.pipeline.tracks import SEMANTIC, TracksConfig, TracksRecipe
from tats.runtime import PRECISIONS

RUN_FILE = "run.json"
RUN_FORMAT = "tats-run"
STORES = {"tracks": "tracks.zarr", "features": "features.zarr"}
TRAIN_PATHS = ("tracks", "features", "manifest", "out")  # set by the chain, not by options


@dataclass(frozen=True)
class RunConfig:
    """Everything `tats run` does, resolved: the stages' configs, the trainer's, and how to run."""

    manifest: Path  # absolute
    out: Path  # the run folder, absolute
    tracks: TracksConfig
    features: FeaturesConfig
    train: object  # tats.train_config.TrainConfig, its paths absolute
    method: str | None = None
    recipe: str | None = None
    video_root: Path | None = None
    tracker_checkpoint: Path | None = None
    tracker_options: tuple[tuple[str, object], ...] = ()  # the tracker's constructor options
    weights: Path | None = None  # the features backbone's (and semantic queries' clustering)
    device: str = "auto"  # the extraction stages' (auto: CUDA where there is one)
    workers: int = 2
    tracks_batch: int | None = None  # videos per tracker call (None: 8 on a GPU, 1 on a CPU)
    features_batch: int = 4  # videos per backbone forward
    precision: str = "auto"  # the tracker's and the backbone's arithmetic
    progress: bool = True
    train_out: str = "train"
    unhonoured: tuple[str, ...] = ()  # the recipe's values that tats cannot follow
    deviations: tuple[str, ...] = ()  # where the recipe differs from its release, and why
    command_line: tuple[tuple[str, object], ...] = ()  # the options given on the command line

    def to_dict(self) -> dict:
        """The resolved config as run.json records it: paths relative to the run folder."""
        train = {k: v for k, v in self.train.to_dict().items() if k not in TRAIN_PATHS}
        return {
            "format": RUN_FORMAT,
            "recipe": self.recipe,
            "method": self.method,
            **_path_entry("manifest", self.manifest, self.out),
            **_path_entry("video_root", self.video_root, self.out),
            **STORES,
            "stages": {"tracks": asdict(self.tracks), "features": asdict(self.features)},
            "extraction": {
                "tracker_checkpoint": _text(self.tracker_checkpoint),
                "tracker_options": dict(self.tracker_options),
                "weights": _text(self.weights),
                "device": self.device,
                "workers": self.workers,
                "tracks_batch": self.tracks_batch,
                "features_batch": self.features_batch,
                "precision": self.precision,
            },
            "trainings": {self.train_out: train},
            "protocol": self.train.protocol,
            "fixes": {"on": list(self.train.fixes),
                      "off": [f for f in FIX_NAMES if f not in self.train.fixes]},
            "command_line": {k: _plain(v) for k, v in self.command_line},
            "unhonoured": list(self.unhonoured),
            "deviations": list(self.deviations),
        }  # fmt: skip


@dataclass(frozen=True)
class ChainResult:
    """What a chain did: each stage's summary, and the training run (tats.train.TrainResult)."""

    summaries: dict[str, RunSummary]
    train: object

    @property
    def failed(self) -> bool:
        return any(summary.failures for summary in self.summaries.values())


def resolve_run(
    manifest: str | Path,
    out: str | Path,
    *,
    recipe: str | None = None,
    train_file: str | Path | None = None,
    method: str | None = None,
    tracks: dict | None = None,
    features: dict | None = None,
    train: dict | None = None,
    frames: int | None = None,
    paper_tracker: bool = False,
    tracker_options: dict | None = None,
    video_root: str | Path | None = None,
    tracker_checkpoint: str | Path | None = None,
    weights: str | Path | None = None,
    device: str | None = None,
    workers: int = 2,
    tracks_batch: int | None = None,
    features_batch: int = 4,
    precision: str = "auto",
    progress: bool = True,
    train_out: str = "train",
    fixes: str | None = None,
    protocol: str | None = None,
    command_line: dict | None = None,
) -> RunConfig:
    """The run's config from the defaults, `recipe`, `train_file` and the options given
    (`tracks`, `features`: stage options; `train`: tats-train's; `frames`: stored frames of
    both stages; `paper_tracker`: the recipe's [paper_tracker] instead of its tracker, under
    `tracker_options`; `fixes` "all", "none" or names, and `protocol` "release" or "clean":
    with a recipe "none" and "release" unless given, without one "all" and "clean";
    `command_line`: the options given there, recorded in run.json). Reads no manifest and no
    video: bad values raise ValueError, one line."""
    from tats.methods import TRACKS_KEYS, with_method
    from tats.pipeline.backbones import list_backbones
    from tats.pipeline.semantic import SemanticConfig
    from tats.pipeline.trackers import list_trackers
    from tats.recipes import load_recipe
    from tats.train_config import TrainConfig, config_from_dict, read_config_file
    from tats.values import blame, check_table

    chosen = load_recipe(recipe) if recipe else None
    given_tracks, given_features = dict(tracks or {}), dict(features or {})
    if frames is not None:
        given_tracks["frames"] = given_features["frames"] = frames
    file_options = read_config_file(train_file) if train_file else {}
    file_options = {k.replace("-", "_"): v for k, v in file_options.items()}
    # Where each value comes from, for the one line that refuses it; values from files are
    # checked against their fields' types before anything is built from them.
    origin: dict[str, dict[str, str]] = {"tracks": {}, "features": {}, "train": {}}
    if chosen is not None:
        check_recipe(chosen)
        for stage in ("tracks", "features"):
            origin[stage] |= {k: f"{chosen.path} [time]" for k in chosen.time}
            origin[stage] |= {k: f"{chosen.path} [{stage}]" for k in getattr(chosen, stage)}
        origin["train"] |= {k: f"{chosen.path} [train]" for k in chosen.train}
        origin["train"] |= {k: f"{chosen.path} [release]" for k in chosen.release}
        origin["train"]["method"] = f"{chosen.path} method"
    if train_file:
        check_table(TrainConfig, file_options, f"{train_file}:", FILE_ONLY)
        origin["train"] |= {k: str(train_file) for k in file_options}
    origin["tracks"] |= {k: _flag(k) for k in given_tracks}
    origin["features"] |= {k: _flag(k) for k in given_features}
    origin["train"] |= {k: _flag(k) for k in (train or {})}
    defaults = {"fixes": "none" if chosen else "all", "protocol": "release" if chosen else "clean"}
    train_options = {**defaults, **(chosen.train_options() if chosen else {}), **file_options,
                     **(train or {})}  # fmt: skip
    if fixes is not None:
        train_options["fixes"] = fixes
        origin["train"]["fixes"] = "--fixes"
    if protocol is not None:
        train_options["protocol"] = protocol
        origin["train"]["protocol"] = "--protocol"
    if chosen is not None and train_options["protocol"] == "release":
        train_options = {**chosen.release, **train_options}
    try:
        train_options["fixes"] = parse_fixes(train_options["fixes"])
    except ValueError as error:
        raise ValueError(f"{origin['train'].get('fixes', '--fixes')}: {error}") from None
    if device is not None:  # the command line's device runs training too
        train_options["device"] = device
        origin["train"]["device"] = "--device"
    if method is not None:
        train_options["method"] = method
        origin["train"]["method"] = "--method"
    method = train_options.get("method")
    fallback = str(train_file or (chosen.path if chosen else "tats run"))

    recipe_tracks = chosen.tracks_options() if chosen else {}
    tracker_options = dict(tracker_options or {})
    if paper_tracker:
        if chosen is None:
            raise ValueError("--paper-tracker needs --recipe")
        if "tracker" in given_tracks:
            raise ValueError("--paper-tracker and --tracker: give one of them")
        if chosen.paper_tracker:  # else the recipe's tracker is the paper's
            recipe_tracks["tracker"] = chosen.paper_tracker["tracker"]
            origin["tracks"]["tracker"] = f"{chosen.path} [paper_tracker]"
            tracker_options = {**chosen.paper_tracker.get("options", {}), **tracker_options}
    if chosen is not None and method != chosen.method:  # the other method's queries, then
        recipe_tracks = {k: v for k, v in recipe_tracks.items() if k not in TRACKS_KEYS}
    tracks_options = {**recipe_tracks, **given_tracks, "fixes": train_options["fixes"]}
    try:
        tracks_options = with_method({"method": method, **tracks_options}, TRACKS_KEYS)
    except ValueError as error:
        raise blame(error, origin["train"], fallback) from None
    if tracks_options.get("queries") == SEMANTIC:
        semantic = tracks_options.get("semantic") or SemanticConfig()
        if chosen is None or "backbone" in given_features:  # clusters of --backbone's features
            backbone = given_features.get("backbone", FeaturesConfig.backbone)
            semantic = dataclasses.replace(semantic, backbone=backbone)
        tracks_options["semantic"] = semantic
    else:
        tracks_options.pop("semantic", None)
    features_options = {**(chosen.features_options() if chosen else {}), **given_features}
    stage_fallback = str(chosen.path) if chosen else "tats run"
    try:
        tracks_config = TracksConfig(**tracks_options)
    except (TypeError, ValueError) as error:
        raise blame(error, origin["tracks"], stage_fallback) from None
    try:
        features_config = FeaturesConfig(**features_options)
    except (TypeError, ValueError) as error:
        raise blame(error, origin["features"], stage_fallback) from None
    if tracks_config.tracker not in list_trackers():
        raise ValueError(
            f"{origin['tracks'].get('tracker', '--tracker')}: unknown tracker "
            f"{tracks_config.tracker!r}; available: {', '.join(list_trackers())}"
        )
    backbones = {"backbone": features_config.backbone}
    if tracks_config.semantic is not None:
        backbones["cluster backbone"] = tracks_config.semantic.backbone
    for what, name in backbones.items():
        if name not in list_backbones():
            where = origin["features"].get("backbone", "--backbone")
            raise ValueError(
                f"{where}: unknown {what} {name!r}; available: {', '.join(list_backbones())}"
            )
    if precision not in PRECISIONS:
        raise ValueError(f"--precision must be one of {', '.join(PRECISIONS)}, not {precision!r}")
    if tracks_config.frames != features_config.frames:
        raise ValueError(
            f"the stages store different frames (tracks {tracks_config.frames}, features "
            f"{features_config.frames}); give --frames for both"
        )

    out = Path(out).absolute()
    manifest = Path(manifest).absolute()
    paths = dict(
        tracks=str(out / STORES["tracks"]), features=str(out / STORES["features"]),
        manifest=str(manifest), out=str(out / train_out), resume=True,
    )  # fmt: skip
    try:
        train_config = config_from_dict({**train_options, **paths})
    except (TypeError, ValueError) as error:
        raise blame(error, origin["train"], fallback) from None
    if train_config.cluster_sampling and tracks_config.queries != SEMANTIC:
        by_method = "the default"
        if method:
            by_method = f"{origin['train'].get('method', '--method')} {method}"
        sampling = origin["train"].get("cluster_sampling") or by_method
        queries = origin["tracks"].get("queries") or by_method
        raise ValueError(
            f"{sampling}: cluster sampling reads each point's cluster, which only semantic "
            f"queries store, and the tracks' queries are {tracks_config.queries!r} ({queries}); "
            f"give --queries semantic, or cluster_sampling = false in --train-config"
        )  # fmt: skip
    return RunConfig(
        manifest=manifest, out=out, tracks=tracks_config, features=features_config,
        train=train_config, method=method, recipe=chosen.name if chosen else None,
        video_root=None if video_root is None else Path(video_root).absolute(),
        tracker_checkpoint=_absolute(tracker_checkpoint),
        tracker_options=tuple(sorted(tracker_options.items())), weights=_absolute(weights),
        device=device or "auto", workers=workers, tracks_batch=tracks_batch,
        features_batch=features_batch, precision=precision, progress=progress,
        train_out=train_out,
        unhonoured=chosen.unhonoured if chosen else (),
        deviations=chosen.deviations if chosen else (),
        command_line=tuple(sorted((command_line or {}).items())),
    )  # fmt: skip


# Keys of an options file that are not TrainConfig's fields as they are written there.
FILE_ONLY = {"method": str, "fixes": str | list[str]}


def check_recipe(recipe) -> None:
    """Every value of a recipe's tables of the type of the option it sets (one line naming the
    file, table and key)."""
    from tats.train_config import TrainConfig
    from tats.values import check_table

    check_table(TracksConfig, recipe.time, f"{recipe.path}: [time]")
    check_table(TracksConfig, recipe.tracks, f"{recipe.path}: [tracks]")
    check_table(FeaturesConfig, recipe.features, f"{recipe.path}: [features]")
    check_table(TrainConfig, recipe.train, f"{recipe.path}: [train]", FILE_ONLY)
    check_table(TrainConfig, recipe.release, f"{recipe.path}: [release]")


def _flag(key: str) -> str:
    return "--" + key.replace("_", "-")


def planned_devices(config: RunConfig) -> dict[str, str]:
    """Where each stage of the run will run (`--device auto`: CUDA where there is one)."""
    from tats.pipeline.tracks import CPU_TRACKERS
    from tats.runtime import pick_device

    cpu_only = config.tracks.tracker in CPU_TRACKERS
    return {
        "tracks": str(pick_device(config.device, cpu_only)),
        "features": str(pick_device(config.device)),
        config.train_out: str(pick_device(config.train.device)),
    }


def stage_recipes(config: RunConfig) -> tuple[TracksRecipe, FeaturesRecipe]:
    """The two extraction stages of a run, in their order."""
    semantic = config.tracks.semantic is not None
    return (
        TracksRecipe(
            config.tracks, checkpoint=_text(config.tracker_checkpoint), device=config.device,
            tracker_options=config.tracker_options, batch_videos=config.tracks_batch,
            cluster_weights=_text(config.weights) if semantic else None,
            precision=config.precision,
        ),
        FeaturesRecipe(
            config.features, weights=_text(config.weights), device=config.device,
            batch_videos=config.features_batch, precision=config.precision,
        ),
    )  # fmt: skip


def extract_stages(
    recipes: tuple,
    manifest: Manifest,
    out: str | Path,
    *,
    clock: str | Path | None = None,
    report: Callable[[str, RunSummary], None] | None = None,
    **run,
) -> dict[str, RunSummary]:
    """Run each stage recipe into `out/<name>.zarr`, in order (`run`: `executors.extract`'s
    options); `clock`: time each stage into that run folder's timings.json; `report(name,
    summary)` after each stage."""
    from tats.pipeline.executors import extract
    from tats.timings import stage_clock

    summaries = {}
    for recipe in recipes:
        with stage_clock(clock, recipe.name) if clock is not None else nullcontext():
            summary = extract(recipe, manifest, Path(out) / f"{recipe.name}.zarr", **run)
        summaries[recipe.name] = summary
        if report is not None:
            report(recipe.name, summary)
    return summaries


def run_chain(
    config: RunConfig, report: Callable[[str, RunSummary], None] | None = None
) -> ChainResult:
    """Both stages, then training, in the run folder; each resumes where it stopped. Videos
    that fail extraction are recorded in the stores and left out of training."""
    from tats.preflight import check_run
    from tats.timings import stage_clock
    from tats.train import train

    manifest = read_manifest(config.manifest, config.video_root)
    check_run(config, manifest)  # before anything is written
    write_run_record(config, manifest)
    summaries = extract_stages(
        stage_recipes(config), manifest, config.out, clock=config.out, report=report,
        workers=config.workers, progress=config.progress,
    )  # fmt: skip
    with stage_clock(config.out, config.train_out):
        result = train(config.train)
    return ChainResult(summaries, result)


# ---------------------------------------------------------------------------------------------
# run.json


def write_run_record(config: RunConfig, manifest: Manifest) -> Path:
    """Write `run.json` into the run folder (atomically): `config.to_dict()` and the manifest's
    SHA-256; the trainings recorded by earlier runs into other training folders are kept."""
    path = config.out / RUN_FILE
    record = config.to_dict()
    record["manifest_sha256"] = manifest.sha256
    if path.is_file():
        earlier = _read_record(path)
        record["trainings"] = {**earlier.get("trainings", {}), **record["trainings"]}
    config.out.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{RUN_FILE}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(record, indent=1) + "\n")
    os.replace(tmp, path)
    return path


@dataclass(frozen=True)
class RunInputs:
    """A run folder's manifest and stores, found from its run.json."""

    manifest: Manifest
    tracks: Path
    features: Path


def run_inputs(run_dir: str | Path) -> RunInputs | None:
    """The manifest and stores of a `tats run` folder, resolved from the folder (None: the
    folder has no run.json). The stores are the folder's own; the manifest is looked for
    relative to the folder first (a folder moved together with its data), then at its absolute
    path (a folder moved alone), and must be the one the run read (its SHA-256)."""
    run_dir = Path(run_dir).absolute()
    path = run_dir / RUN_FILE
    if not path.is_file():
        return None
    record = _read_record(path)
    video_root = _locate(run_dir, record, "video_root")
    tried = []
    for candidate in _candidates(run_dir, record, "manifest"):
        if not candidate.is_file():
            tried.append(f"{candidate} (not found)")
            continue
        manifest = read_manifest(candidate, video_root)
        if manifest.sha256 != record.get("manifest_sha256"):
            tried.append(f"{candidate} (another manifest: its SHA-256 differs)")
            continue
        return RunInputs(manifest, run_dir / record["tracks"], run_dir / record["features"])
    raise FileNotFoundError(f"{path}: the run's manifest is not at {' nor at '.join(tried)}")


def _read_record(path: Path) -> dict:
    try:
        record = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}:{error.lineno}: {error.msg}") from None
    if not isinstance(record, dict) or record.get("format") != RUN_FORMAT:
        raise ValueError(f"{path}: not a tats run record")
    return record


def _path_entry(name: str, path: Path | None, run_dir: Path) -> dict:
    """`name`: relative to the run folder; `name_absolute` too where it lies outside it."""
    if path is None:
        return {name: None}
    relative = Path(os.path.relpath(path, run_dir)).as_posix()
    entry = {name: relative}
    if relative.startswith(".."):
        entry[f"{name}_absolute"] = str(path)
    return entry


def _candidates(run_dir: Path, record: dict, name: str) -> list[Path]:
    found = [run_dir / record[name]] if record.get(name) else []
    if record.get(f"{name}_absolute"):
        found.append(Path(record[f"{name}_absolute"]))
    return found


def _locate(run_dir: Path, record: dict, name: str) -> Path | None:
    candidates = _candidates(run_dir, record, name)
    return next((c for c in candidates if c.exists()), candidates[0] if candidates else None)


def _absolute(path: str | Path | None) -> Path | None:
    return None if path is None else Path(path).absolute()


def _text(path: Path | None) -> str | None:
    return None if path is None else str(path)


def _plain(value: object) -> object:
    """A command-line value as JSON holds it."""
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value
