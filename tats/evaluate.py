"""Few-shot evaluation: accuracy over the episodes of a split, each clip embedded once.

    result = evaluate("run/checkpoints/best.pt", "t.zarr", "f.zarr", "m.csv", out="eval")

The model embeds a clip independently of the other clips it is batched with: attention runs
along each of the clip's trajectories and across the points of each of its frames (with its
own CLS token), LayerNorm and the MLP act on single tokens, and there are no batch statistics;
drop path, the one random part, is off in evaluation. At evaluation a clip's inputs are fixed
too (view 0 and the stored point subset: `ReadOptions.per_clip`), so its tokens are the same
in every episode that draws it. Evaluation therefore embeds every clip of the split once
(batched, whole classes shared out between DDP ranks) and then runs only the matching for each
episode: the same prototypes (the support tokens averaged over the shots), frame embeddings and
Hausdorff distances as the per-episode path (tats/fewshot.py). The two paths differ only in
floating-point rounding (batches of other sizes), which tests/test_evaluate.py checks gives the
same predictions on the same episodes.

The per-episode path embeds the clips of each episode together, as training does; evaluation
takes it where a clip's inputs depend on the episode (fresh point subsets drawn per read).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

from tats.checkpoints import check_stores_match, load_checkpoint
from tats.episodes import EpisodeData, EpisodeKeys, EpisodeSpec, ReadOptions, SplitClasses
from tats.fewshot import (
    accuracy_with_ci,
    frame_embeddings,
    hausdorff_distances,
    hausdorff_scores,
    prototype_frames,
)
from tats.fixes import FIX_NAMES
from tats.model import MODEL_INPUTS, ModelConfig, TATsModel
from tats.runtime import Runtime, device_line, inference_amp
from tats.stores import StoreError

EVAL_BATCH = 32  # clips per forward when each clip is embedded once
# Bound on the temporaries of the matching: small on CPUs, where fresh large allocations cost
# more than the arithmetic (page faults), large enough to keep a GPU busy.
CHUNK_BYTES = {"cpu": 1 << 23, "cuda": 1 << 28}


@dataclass
class EvalResult:
    """Few-shot accuracy (percent) over the episodes of one split, per class and confused."""

    split: str
    way: int
    shot: int
    episodes: int
    accuracy: float
    ci95: float
    classes: list[str]
    per_class: dict[str, float]
    confusion: np.ndarray  # [C, C] query counts, row = true class, column = predicted class

    def to_dict(self) -> dict:
        return {**asdict(self), "confusion": self.confusion.tolist()}


class EpisodePredictions(NamedTuple):
    """What the model said in each episode, episodes in index order."""

    true: np.ndarray  # [E, Q] the class of each query (an index into SplitClasses.names)
    predicted: np.ndarray  # [E, Q] the class predicted for it
    scores: np.ndarray  # [E, Q, way] float32, minus the distance; column c = episode label c


def evaluation_options(config: dict) -> ReadOptions:
    """How evaluation reads the clips of a run with training config `config`: view 0, the
    run's point subsets, tracks mode and mask. Cluster sampling reads the stored subset, drawn
    once per video; without the fix "eval-subset" (tats/fixes.py) it draws anew at every read
    (seeded per episode), as Trokens' release tests."""
    fixes = config.get("fixes", FIX_NAMES)
    fresh_clusters = config.get("cluster_sampling", False) and "eval-subset" not in fixes
    return ReadOptions(False, config["fresh_subset"], config["tracks_mode"], config["mask"],
                       cluster_sampling=fresh_clusters,
                       fill=config.get("fill", "repeat"))  # fmt: skip


def embed(model: TATsModel, batch: dict[str, Tensor]) -> Tensor:
    """The tokens [B, S, P, D] of a batch of clips (the few-shot matching's input)."""
    tokens, _ = model(**{k: batch[k] for k in MODEL_INPUTS})
    return tokens


def check_model_fits(model_cfg: ModelConfig, data: EpisodeData, source: Path) -> None:
    want = (model_cfg.feature_dim, model_cfg.num_frames, (model_cfg.grid_size,) * 2)
    have = (data.feature_dim, data.num_frames, tuple(data.grid))
    if want != have:
        raise StoreError(
            f"{source}: the model takes (feature dim, frames, grid) = {want}, the stores hold "
            f"{have}"
        )
    if model_cfg.uses_offsets and model_cfg.num_points != data.points:
        raise StoreError(
            f"{source}: the model's relative-offset motion tokens take {model_cfg.num_points} "
            f"points per clip, the stores give {data.points}"
        )


def load_model(state: dict, device: torch.device) -> TATsModel:
    """The model of a checkpoint's state (tats/checkpoints.py), in eval mode on `device`."""
    model = TATsModel(ModelConfig(**state["model_config"]))
    model.load_state_dict(state["model"])
    return model.to(device).eval()


# ---------------------------------------------------------------------------------------------
# Episodes


@torch.no_grad()
def episode_predictions(
    model: TATsModel,
    data: EpisodeData,
    classes: SplitClasses,
    spec: EpisodeSpec,
    options: ReadOptions,
    episodes: int,
    seed: int,
    rt: Runtime,
    embed_once: bool | None = None,
    batch_clips: int = EVAL_BATCH,
) -> EpisodePredictions:
    """The predictions of episodes 0..episodes-1 of a split, on every rank (`eval_result`
    scores them).

    embed_once: embed every clip once, then match each episode (default where `options` allow
    it); False embeds the clips of each episode together, episodes shared out by index
    between the ranks. Both give the same episodes and the same predictions.
    """
    if embed_once is None:
        embed_once = options.per_clip
    if embed_once and not options.per_clip:
        raise ValueError(f"{options}: clips depend on the episode; they cannot be embedded once")
    was_training = model.training
    model.eval()
    try:
        if embed_once:
            return _embedding_once(
                model, data, classes, spec, options, episodes, seed, rt, batch_clips
            )
        return _episode_by_episode(model, data, classes, spec, options, episodes, seed, rt)
    finally:
        model.train(was_training)


def _episode_by_episode(
    model: TATsModel,
    data: EpisodeData,
    classes: SplitClasses,
    spec: EpisodeSpec,
    options: ReadOptions,
    episodes: int,
    seed: int,
    rt: Runtime,
) -> EpisodePredictions:
    dataset = data.dataset(classes.split, spec, options, seed, rank=0, classes=classes)
    n, mine = spec.num_support, []
    for batch in rt.loader(dataset, EpisodeKeys(range(rt.rank, episodes, rt.world))):
        batch = rt.to_device(batch)
        with rt.autocast():
            tokens = embed(model, batch)
        labels, clip_classes = batch["labels"], batch["classes"]
        scores = hausdorff_scores(tokens[:n], labels[:n], tokens[n:], spec.way, spec.shot)
        label_class = clip_classes[:n].view(spec.way, spec.shot)[:, 0]  # supports: class-major
        predicted = label_class[scores.argmax(dim=1)]
        mine.append((int(batch["key"][1]), clip_classes[n:].cpu().numpy(),
                     predicted.cpu().numpy(), scores.cpu().numpy()))  # fmt: skip
    results = sorted((r for part in rt.gather(mine) for r in part), key=lambda r: r[0])
    return EpisodePredictions(*(np.stack([r[i] for r in results]) for i in (1, 2, 3)))


def _embedding_once(
    model: TATsModel,
    data: EpisodeData,
    classes: SplitClasses,
    spec: EpisodeSpec,
    options: ReadOptions,
    episodes: int,
    seed: int,
    rt: Runtime,
    batch_clips: int,
) -> EpisodePredictions:
    dataset = data.dataset(classes.split, spec, options, seed, rank=0, classes=classes)
    drawn = [dataset.episode(0, i) for i in range(episodes)]  # the per-episode path's episodes
    n, way, shot = spec.num_support, spec.way, spec.shot
    supports = np.stack([e.rows[:n] for e in drawn]).reshape(episodes, way, shot)
    queries = np.stack([e.rows[n:] for e in drawn])  # [E, Q]
    chosen = np.stack([e.classes[:n:shot] for e in drawn])  # [E, way]: the class labelled c
    true = np.stack([e.classes[n:] for e in drawn])

    # Every clip the episodes hold (`rows`, ascending), grouped by class; whole classes go to
    # each rank, because a prototype needs the tokens of all its support clips.
    rows, first = np.unique(np.concatenate([e.rows for e in drawn]), return_index=True)
    row_class = np.concatenate([e.classes for e in drawn])[first]
    members = {int(c): rows[row_class == c] for c in np.unique(row_class)}
    mine = share_classes({c: len(r) for c, r in members.items()}, rt.rank, rt.world)
    device, num_frames, dim = rt.device, data.num_frames, model.cfg.dim
    chunk_bytes = CHUNK_BYTES.get(device.type, CHUNK_BYTES["cpu"])
    frames = torch.zeros(len(rows), num_frames, dim, device=device)  # per clip, for queries
    prototypes, proto_id, count = [], np.full((episodes, way), -1, np.int64), 0
    groups = [members[c] for c in mine]
    for g, tokens in embed_groups(model, data, groups, options, rt, batch_clips):
        c, member_rows = mine[g], groups[g]
        frames[_index(np.searchsorted(rows, member_rows), device)] = frame_embeddings(tokens)
        # The prototype of every (episode, label) whose class is c, once per distinct set of
        # support clips (in 1-shot, once per clip).
        e_idx, slot = np.nonzero(chosen == c)
        sets = np.searchsorted(member_rows, supports[e_idx, slot])  # [M, shot] into tokens
        unique, inverse = np.unique(sets, axis=0, return_inverse=True)
        step = max(1, chunk_bytes // (tokens[0].numel() * 4))
        for start in range(0, len(unique), step):
            sets = _index(unique[start : start + step], device)
            prototypes.append(prototype_frames(tokens, sets))
        proto_id[e_idx, slot] = count + inverse.reshape(-1)
        count += len(unique)
    rt.sum(frames)  # each clip was embedded on one rank; the others hold zeros

    # Scores of the (episode, label) pairs whose prototype is here; every pair is on one rank.
    scores = torch.zeros(episodes, queries.shape[1], way, device=device)
    if prototypes:
        prototypes = torch.cat(prototypes)
        e_idx, slot = np.nonzero(proto_id >= 0)
        step = max(1, chunk_bytes // (queries.shape[1] * num_frames * max(dim, num_frames) * 4))
        for start in range(0, len(e_idx), step):
            e, s = e_idx[start : start + step], slot[start : start + step]
            query_frames = frames[_index(np.searchsorted(rows, queries[e]), device)]
            class_frames = prototypes[_index(proto_id[e, s], device)][:, None]
            distances = hausdorff_distances(query_frames, class_frames)[..., 0]  # [m, Q]
            scores[_index(e, device), :, _index(s, device)] = -distances
    scores = rt.sum(scores).cpu().numpy()
    predicted = np.take_along_axis(chosen, scores.argmax(axis=2), axis=1)
    return EpisodePredictions(true, predicted, scores)


def embed_groups(
    model: TATsModel,
    data: EpisodeData,
    groups: list[np.ndarray],
    options: ReadOptions,
    rt: Runtime,
    batch_clips: int = EVAL_BATCH,
) -> Iterator[tuple[int, Tensor]]:
    """(g, tokens [len(groups[g]), S, P, D]) for each non-empty group of rows in turn.

    The clips are read by the DataLoader workers and embedded `batch_clips` at a time; a batch
    may span groups, and only the tokens of the groups not yet complete are held.
    """
    groups = [np.asarray(g, np.int64) for g in groups]
    todo = [g for g, rows in enumerate(groups) if len(rows)]
    order = np.concatenate([groups[g] for g in todo]) if todo else np.zeros(0, np.int64)
    held: list[Tensor] = []
    for batch in rt.loader(data.clips(order, options), batch_size=batch_clips):
        batch = rt.to_device(batch)
        with rt.autocast():
            held.append(embed(model, batch))
        while todo and sum(len(t) for t in held) >= len(groups[todo[0]]):
            tokens = torch.cat(held) if len(held) > 1 else held[0]
            size = len(groups[todo[0]])
            yield todo.pop(0), tokens[:size]
            held = [tokens[size:]] if size < len(tokens) else []


def share_classes(sizes: dict[int, int], rank: int, world: int) -> list[int]:
    """The classes `rank` embeds: whole classes dealt largest first to the least loaded rank
    (by clips); every rank computes the same deal."""
    load, mine = [0] * world, []
    for c in sorted(sizes, key=lambda c: (-sizes[c], c)):
        r = min(range(world), key=lambda r: (load[r], r))
        load[r] += sizes[c]
        if r == rank:
            mine.append(c)
    return sorted(mine)


def _index(values: np.ndarray, device: torch.device) -> Tensor:
    return torch.from_numpy(np.ascontiguousarray(values, dtype=np.int64)).to(device)


def eval_result(
    classes: SplitClasses, spec: EpisodeSpec, predictions: EpisodePredictions
) -> EvalResult:
    """Accuracy with its 95% CI over the episodes, per-class accuracy and the confusion."""
    true, predicted = predictions.true, predictions.predicted
    accuracy, ci = accuracy_with_ci((true == predicted).mean(axis=1) * 100)
    confusion = np.zeros((len(classes.names),) * 2, np.int64)
    np.add.at(confusion, (true.ravel(), predicted.ravel()), 1)
    seen = confusion.sum(axis=1)
    per_class = {classes.names[c]: 100 * confusion[c, c] / seen[c] for c in np.flatnonzero(seen)}
    return EvalResult(
        classes.split, spec.way, spec.shot, len(true), accuracy, ci, list(classes.names),
        {k: float(v) for k, v in per_class.items()}, confusion,
    )  # fmt: skip


# ---------------------------------------------------------------------------------------------
# A checkpoint


def evaluate(
    checkpoint: str | Path,
    tracks: str | Path,
    features: str | Path,
    manifest: str | Path,
    out: str | Path | None = None,
    episodes: int = 10000,
    way: int | None = None,
    shot: int | None = None,
    queries: int | None = None,
    split: str = "test",
    seed: int = 0,
    workers: int = 2,
    device: str = "auto",
    embed_once: bool | None = None,
) -> EvalResult:
    """Evaluate a checkpoint on `episodes` episodes of `split` (way, shot and queries default
    to the checkpoint's); write metrics.json into `out` when given. The numbers only: whoever
    wants the confusion matrix's picture draws it (`tats.viz.plot_confusion`)."""
    if episodes < 1:
        raise ValueError(f"episodes must be at least 1, not {episodes}")
    state = load_checkpoint(checkpoint)
    saved = state["config"]
    rt = Runtime.setup(device, inference_amp(saved, device), workers, saved["prefetch"])
    rt.log(f"evaluate: {device_line(device, rt.device, rt.precision)}")
    data = EpisodeData.open(tracks, features, manifest)
    check_stores_match(state, data.tracks, data.features, Path(checkpoint))
    check_model_fits(ModelConfig(**state["model_config"]), data, Path(checkpoint))
    model = load_model(state, rt.device)
    spec = EpisodeSpec(way or saved["way"], shot or saved["shot"], queries or saved["test_queries"])
    classes = data.classes(split, spec.per_class, spec.way)
    options = evaluation_options(saved)
    predictions = episode_predictions(
        model, data, classes, spec, options, episodes, seed, rt, embed_once
    )
    result = eval_result(classes, spec, predictions)
    if out is not None and rt.main:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / "metrics.json", {
            "checkpoint": str(Path(checkpoint).resolve()), "epoch": state["epoch"],
            "config": saved, split: result.to_dict(),
        })  # fmt: skip
    return result


def write_json(path: Path, value) -> None:
    """Write atomically (a temporary file, then a rename)."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(value, indent=1) + "\n")
    os.replace(tmp, path)
