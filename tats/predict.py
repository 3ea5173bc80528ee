"""`tats predict`: classify new videos from a few labelled clips of new classes.

    result = predict("run/checkpoints/best.pt", "support.csv", "query.csv", "out")

support.csv lists `video_id,path,label`: any number of classes, at least one clip each.
query.csv lists `video_id,path` and, optionally, `label`. Video ids are unique across both.

Stage one runs on the clips of both lists into out/tracks.zarr and out/features.zarr with the
settings of the stores the model was trained on, which the checkpoint records (their
provenance): the same tracker, query frames, grid, filter and point subset, the same backbone,
preprocessing and stored frames. The tracker and backbone weights must be the same files
(SHA-256). Both stages resume as always: a rerun extracts nothing.

The model then embeds every clip once (view 0, the stored point subset, as evaluation reads
clips). A class's prototype is the mean of the tokens of all its support clips, as in training
(any number of clips per class: kept as a running sum, a batch of clips at a time), and every
query is matched against every class with the trained matching (tats/fewshot.py): predicted
is the nearest class, and the softmax of minus the distances (the probabilities the training
loss fits) is each class's score.

Files in out: videos.csv (both lists' clips: the stores' manifest), predictions.csv (a row per
query), metrics.json, failed.csv (videos that could not be read, if any) and, where queries
have labels, confusion.png.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import os
import typing
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from tats import viz
from tats.chain import extract_stages
from tats.checkpoints import check_identity, load_checkpoint, recorded_stores
from tats.episodes import EpisodeData, EpisodeWarning, ReadOptions
from tats.evaluate import (
    EVAL_BATCH,
    check_model_fits,
    embed,
    evaluation_options,
    load_model,
    write_json,
)
from tats.fewshot import frame_embeddings, hausdorff_distances
from tats.manifest import (
    ListedClip,
    ManifestError,
    RowChecker,
    VideoRow,
    read_clip_list,
    read_manifest,
    write_manifest,
)
from tats.model import ModelConfig, TATsModel
from tats.pipeline.executors import build_stage
from tats.pipeline.features import FeaturesConfig, FeaturesRecipe
from tats.pipeline.ledger import Ledger
from tats.pipeline.runner import RunSummary
from tats.pipeline.status import done_rows
from tats.pipeline.tracks import TracksConfig, TracksRecipe
from tats.runtime import Runtime, device_line, inference_amp
from tats.stores import FEATURES, TRACKS, RowStore

Config = typing.TypeVar("Config")
# Spreadsheets read a cell that starts with one of these as a formula: written with a ' first.
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


@dataclass(frozen=True)
class QueryPrediction:
    """One query: the nearest class, the distance to and the score of every class (in the
    order of PredictResult.classes), and its label ("" where the list gives none)."""

    video_id: str
    predicted: str
    distances: np.ndarray  # [C] float32
    scores: np.ndarray  # [C] float32, softmax of minus the distances
    label: str = ""


@dataclass(frozen=True)
class FailedVideo:
    """A video that could not be read (or tracked, or encoded), with the stage's error."""

    video_id: str
    role: str  # support or query
    path: Path
    error: str


@dataclass
class PredictResult:
    out: Path
    classes: list[str]  # sorted support labels
    support: dict[str, int]  # readable support clips per class
    predictions: list[QueryPrediction]
    failed: list[FailedVideo]
    extraction: dict[str, RunSummary]  # what each stage did in this run
    accuracy: float | None = None  # percent, over the queries with labels
    ci95: tuple[float, float] | None = None  # Wilson score interval of `accuracy`, percent
    per_class: dict[str, float] = field(default_factory=dict)  # by true class
    confusion: np.ndarray | None = None  # [C, C], row = true class, column = predicted


def predict(
    checkpoint: str | Path,
    support: str | Path,
    query: str | Path,
    out: str | Path,
    *,
    video_root: str | Path | None = None,
    tracker_checkpoint: str | Path | None = None,
    tracker_options: dict | None = None,
    weights: str | Path | None = None,
    backbone_options: dict | None = None,
    cluster_weights: str | Path | None = None,
    device: str = "auto",
    tracks_batch: int | None = None,
    features_batch: int = 4,
    precision: str = "auto",
    workers: int = 2,
    batch_clips: int = EVAL_BATCH,
    progress: bool = True,
    **run,
) -> PredictResult:
    """Predict the class of every query clip from the support clips (see the module docstring).

    tracker_checkpoint, tracker_options, weights and backbone_options build the tracker and
    the backbone as `tats-extract` does (weights from the caches where not given; semantic
    queries: cluster_weights for their clustering backbone); `device`, `precision`,
    `tracks_batch` (None: 8 on a GPU, 1 on a CPU), `features_batch`, `workers`, `progress`
    and `run` (executor, scheduler, ...: `executors.extract`) say how the stages run. `device`
    also runs the model.

    Bad input raises ValueError (ManifestError, StoreError) with a one-line message: a list or
    checkpoint that cannot be used, weights other than the training stores', a support class
    without a readable clip. Videos that cannot be read are in `failed`; the rest are predicted.
    """
    checkpoint, out = Path(checkpoint), Path(out)
    for name, value in (("tracks_batch", tracks_batch), ("features_batch", features_batch),
                        ("batch_clips", batch_clips)):  # fmt: skip
        if value is not None and value < 1:
            raise ValueError(f"{name} must be at least 1, not {value}")
    if workers < 0:
        raise ValueError(f"workers must be 0 or more, not {workers}")
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out}: a file, not a folder; --out is the folder the stores and "
                         "predictions go to")  # fmt: skip
    state = load_checkpoint(checkpoint)  # checked whole: nothing is extracted for a bad one
    saved = state["config"]
    rt = Runtime.setup(device, inference_amp(saved, device), workers, saved["prefetch"])
    rt.log(f"model: {device_line(device, rt.device, rt.precision)}")
    recorded = recorded_stores(state, checkpoint)
    checker = RowChecker()  # video ids unique across both lists
    supports = read_clip_list(support, True, video_root, checker)
    queries = read_clip_list(query, False, video_root, checker)
    classes = sorted({clip.label for clip in supports})
    for clip in queries:
        if clip.label and clip.label not in classes:
            raise ManifestError(f"{clip.where}: label {clip.label!r} has no clip in {support}")
    if len(classes) == 1:
        warnings.warn(
            f"{support}: one class ({classes[0]!r}): every query is predicted as it, with score "
            f"1.0; list clips of two or more classes to tell them apart",
            stacklevel=2,
        )

    # Nothing is written before both stages check out against the training stores.
    recipes = training_stages(
        recorded, checkpoint,
        TracksRecipe(
            config=stage_config(TracksConfig, recorded["tracks"]["config"], checkpoint),
            checkpoint=None if tracker_checkpoint is None else str(tracker_checkpoint),
            tracker_options=tuple(sorted((tracker_options or {}).items())),
            device=device, batch_videos=tracks_batch,
            cluster_weights=None if cluster_weights is None else str(cluster_weights),
            precision=precision,
        ),
        FeaturesRecipe(
            config=stage_config(FeaturesConfig, recorded["features"]["config"], checkpoint),
            weights=None if weights is None else str(weights), device=device,
            batch_videos=features_batch,
            backbone_options=tuple(sorted((backbone_options or {}).items())),
            precision=precision,
        ),
    )  # fmt: skip
    manifest = write_videos(out, supports, queries)
    extraction = extract_stages(recipes, manifest, out, workers=workers, progress=progress, **run)
    tracks_path, features_path = out / "tracks.zarr", out / "features.zarr"
    failed = failed_videos(manifest.rows, tracks_path, features_path)
    failed_ids = {f.video_id for f in failed}
    readable = [clip for clip in supports if clip.video_id not in failed_ids]
    for name in classes:
        if not any(clip.label == name for clip in readable):
            listed = {clip.video_id for clip in supports if clip.label == name}
            errors = "; ".join(f"{f.video_id}: {f.error}" for f in failed if f.video_id in listed)
            raise ValueError(f"{support}: class {name!r} has no readable clip ({errors})")

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", EpisodeWarning)  # failed videos: listed in `failed`
        data = EpisodeData.open(tracks_path, features_path, manifest)
    check_model_fits(ModelConfig(**state["model_config"]), data, checkpoint)
    model = load_model(state, rt.device)
    # A run trained with fresh point subsets reads the stored subset here: a subset of the
    # same kind, drawn once per video (seeded by its id).
    options = dataclasses.replace(evaluation_options(saved), fresh_subset=False)
    row_of = {row.video_id: row.row for row in manifest.rows}
    class_rows = [[row_of[c.video_id] for c in readable if c.label == name] for name in classes]
    predicted = [clip for clip in queries if clip.video_id not in failed_ids]
    query_rows = [row_of[clip.video_id] for clip in predicted]
    distances = match(model, data, class_rows, query_rows, options, rt, batch_clips)
    scores = torch.softmax(-distances, dim=1).numpy()
    distances = distances.numpy()
    predictions = [
        QueryPrediction(clip.video_id, classes[int(np.argmin(d))], d, s, clip.label)
        for clip, d, s in zip(predicted, distances, scores, strict=True)
    ]
    result = PredictResult(
        out, classes, {name: len(rows) for name, rows in zip(classes, class_rows, strict=True)},
        predictions, failed, extraction,
    )  # fmt: skip
    score_labelled(result)
    write_outputs(result, checkpoint, state)
    return result


def training_stages(
    recorded: dict, checkpoint: Path, tracks: TracksRecipe, features: FeaturesRecipe
) -> tuple[TracksRecipe, FeaturesRecipe]:
    """The two stages, checked to build the tracker and backbone that the training stores
    record (`recorded`, the checkpoint's `data`). The stages are built here once: `extract`
    finds them in `build_stage`'s cache."""
    stage = build_stage(tracks)
    check_identity("tracker", stage.tracker.identity.to_dict(), recorded["tracks"]["tracker"],
                   checkpoint)  # fmt: skip
    if stage.backbone is not None:  # semantic queries
        check_identity("clustering backbone", stage.backbone.identity,
                       recorded["tracks"]["clustering_backbone"], checkpoint)  # fmt: skip
    backbone = build_stage(features).backbone.identity
    check_identity("backbone", backbone, recorded["features"]["backbone"], checkpoint)
    return tracks, features


def wilson_interval(correct: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """The 95% Wilson score interval of `correct` of `n`, in percent. Queries are single
    right-or-wrong trials, where the normal interval of the episode evaluation would say
    +- 0 at 0% or 100% however few they are."""
    p, z2 = correct / n, z * z
    center = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    return 100.0 * max(0.0, center - half), 100.0 * min(1.0, center + half)


def score_labelled(result: PredictResult) -> None:
    """Accuracy with its 95% interval, per-class accuracy and the confusion of the queries with a
    label (none: left None)."""
    labelled = [p for p in result.predictions if p.label]
    if not labelled:
        return
    index = {name: i for i, name in enumerate(result.classes)}
    confusion = np.zeros((len(index), len(index)), np.int64)
    for p in labelled:
        confusion[index[p.label], index[p.predicted]] += 1
    correct = sum(p.predicted == p.label for p in labelled)
    result.accuracy = 100.0 * correct / len(labelled)
    result.ci95 = wilson_interval(correct, len(labelled))
    seen = confusion.sum(axis=1)
    result.per_class = {
        result.classes[c]: float(100 * confusion[c, c] / seen[c]) for c in np.flatnonzero(seen)
    }
    result.confusion = confusion


class Prototypes:
    """Class prototypes as running sums of their support clips' tokens: float32, added a clip
    at a time in the order given, as `fewshot.prototype_frames` adds a stack of them, so the
    two agree exactly. Memory holds one sum per class, however many clips a class has."""

    def __init__(self) -> None:
        self._sums: dict[int, torch.Tensor] = {}
        self._counts: dict[int, int] = {}

    def add(self, c: int, tokens: torch.Tensor) -> None:
        """Add the tokens [n, S, P, D] of n support clips of class c."""
        for clip in tokens:
            if c in self._sums:
                self._sums[c] += clip
            else:
                self._sums[c] = clip.to(torch.float32, copy=True)
            self._counts[c] = self._counts.get(c, 0) + 1

    def frames(self, classes: int) -> torch.Tensor:
        """The prototypes' frame embeddings [classes, S, D] (`fewshot.frame_embeddings`)."""
        return torch.stack(
            [frame_embeddings(self._sums[c] / self._counts[c]) for c in range(classes)]
        )


@torch.no_grad()
def match(
    model: TATsModel,
    data: EpisodeData,
    class_rows: list[list[int]],
    query_rows: list[int],
    options: ReadOptions,
    rt: Runtime,
    batch_clips: int = EVAL_BATCH,
) -> torch.Tensor:
    """Distances [Q, C] (float32, on the CPU) of the query clips to the classes, each class's
    prototype made from all its support clips (`Prototypes`: a batch of clips at a time)."""
    supports = [r for rows in class_rows for r in rows]
    owner = np.repeat(np.arange(len(class_rows)), [len(rows) for rows in class_rows])
    rows = np.array(supports + list(query_rows), np.int64)
    prototypes, done = Prototypes(), 0
    query_frames = torch.zeros(len(query_rows), data.num_frames, model.cfg.dim, device=rt.device)
    for batch in rt.loader(data.clips(rows, options), batch_size=batch_clips):
        with rt.autocast():
            tokens = embed(model, rt.to_device(batch))
        n = max(0, min(len(tokens), len(supports) - done))  # the batch's support clips
        for c in np.unique(owner[done : done + n]):  # a class's clips are consecutive
            at = np.flatnonzero(owner[done : done + n] == c)
            prototypes.add(int(c), tokens[at[0] : at[-1] + 1])
        start = max(0, done - len(supports))
        query_frames[start : start + len(tokens) - n] = frame_embeddings(tokens[n:])
        done += len(tokens)
    class_frames = prototypes.frames(len(class_rows))
    return torch.cat([hausdorff_distances(q, class_frames).cpu() for q in query_frames.split(1024)])


def stage_config(cls: type[Config], values: dict, checkpoint: Path) -> Config:
    """A stage config (a frozen dataclass) from its record in a store's provenance: nested
    configs rebuilt, lists read back as tuples. Settings the record lacks (made by an older
    tats) take their defaults, with a warning."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ValueError(
            f"{checkpoint}: its stores were made with {cls.__name__} settings this tats does not "
            f"know ({', '.join(unknown)}); predict with the tats that made them"
        )
    missing = sorted(names - set(values))
    if missing:
        warnings.warn(
            f"{checkpoint}: its stores do not record {cls.__name__} {', '.join(missing)}; "
            f"using the defaults",
            stacklevel=2,
        )

    def value_of(hint, value):
        for option in typing.get_args(hint) or (hint,):  # `Config | None` too
            if dataclasses.is_dataclass(option) and isinstance(value, dict):
                return stage_config(option, value, checkpoint)
        return tuple(value) if isinstance(value, list) else value

    try:
        config = cls(**{name: value_of(hints[name], value) for name, value in values.items()})
    except (TypeError, ValueError) as error:
        raise ValueError(f"{checkpoint}: damaged checkpoint: its stores' {cls.__name__}: "
                         f"{error}") from None  # fmt: skip
    rebuilt = json.loads(json.dumps(dataclasses.asdict(config)))
    if any(rebuilt[name] != value for name, value in values.items()):
        raise ValueError(f"{checkpoint}: cannot rebuild the {cls.__name__} of its stores: {values}")
    return config


def write_videos(out: Path, supports: list[ListedClip], queries: list[ListedClip]):
    """out/videos.csv, the stores' manifest: the support clips, then the query clips (label:
    their role). A folder that holds other lists' stores is refused."""
    listed = [(clip, "support") for clip in supports] + [(clip, "query") for clip in queries]
    rows = [
        VideoRow(i, clip.video_id, clip.path, role, "test") for i, (clip, role) in enumerate(listed)
    ]
    path, new = out / "videos.csv", out / ".videos.csv.new"
    write_manifest(rows, new)
    if path.is_file() and path.read_bytes() != new.read_bytes():
        new.unlink()
        raise ValueError(
            f"{out} holds the stores of other support and query lists ({path}); use a new --out"
        )
    os.replace(new, path)
    return read_manifest(path)


def failed_videos(rows: tuple[VideoRow, ...], tracks: Path, features: Path) -> list[FailedVideo]:
    """The videos not done in both stores, with the errors their ledgers recorded."""
    errors: dict[int, list[str]] = {}
    usable = None
    for path, schema in ((tracks, TRACKS), (features, FEATURES)):
        store = RowStore.open(path, schema)
        done = set(done_rows(store).tolist())
        usable = done if usable is None else usable & done
        for record in Ledger(store.ledger_dir).records().values():
            for failure in record.failed:
                errors.setdefault(failure.row, []).append(f"{path.stem}: {failure.error}")
    return [
        FailedVideo(r.video_id, r.label, r.path, "; ".join(errors.get(r.row, ["not extracted"])))
        for r in rows
        if r.row not in usable
    ]


def write_outputs(result: PredictResult, checkpoint: Path, state: dict) -> None:
    """predictions.csv, metrics.json, failed.csv and confusion.png (see the module docstring);
    files of an earlier run that this one has no content for are removed."""
    out, classes = result.out, result.classes
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(
        ["video_id", "label", "predicted"]
        + [f"distance_{c}" for c in classes]
        + [f"score_{c}" for c in classes]
    )
    for p in result.predictions:
        numbers = [f"{float(x):.9g}" for x in (*p.distances, *p.scores)]
        writer.writerow([*map(spreadsheet_safe, (p.video_id, p.label, p.predicted)), *numbers])
    _write_text(out / "predictions.csv", text.getvalue())

    failed_csv = out / "failed.csv"
    if result.failed:
        text = io.StringIO()
        writer = csv.writer(text, lineterminator="\n")
        writer.writerow(["video_id", "role", "path", "error"])
        writer.writerows([spreadsheet_safe(str(cell)) for cell in (f.video_id, f.role, f.path,
                                                                    f.error)]
                         for f in result.failed)  # fmt: skip
        _write_text(failed_csv, text.getvalue())
    else:
        failed_csv.unlink(missing_ok=True)

    predicted = [p.predicted for p in result.predictions]
    write_json(out / "metrics.json", {
        "checkpoint": str(checkpoint.resolve()), "epoch": state["epoch"],
        "classes": classes, "support": result.support,
        "queries": len(result.predictions), "predicted": {c: predicted.count(c) for c in classes},
        "labelled": int(sum(bool(p.label) for p in result.predictions)),
        "accuracy": result.accuracy, "ci95": result.ci95, "per_class": result.per_class,
        "confusion": None if result.confusion is None else result.confusion.tolist(),
        "failed": [{**dataclasses.asdict(f), "path": str(f.path)} for f in result.failed],
    })  # fmt: skip
    if result.confusion is not None:
        viz.plot_confusion(result.confusion, classes, out / "confusion.png")
    else:
        (out / "confusion.png").unlink(missing_ok=True)


def spreadsheet_safe(text: str) -> str:
    """`text` with a ' in front where a spreadsheet would run it as a formula (formula
    injection: a video id "=HYPERLINK(...)"); other text unchanged."""
    return f"'{text}" if text.startswith(FORMULA_STARTS) else text


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
