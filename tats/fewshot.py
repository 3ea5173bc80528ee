"""Few-shot matching, losses and accuracy for TATs.

Matching is MoLo's bidirectional mean Hausdorff metric as the original TATs applies it: the K
support clips of a class are averaged token by token into a prototype; tokens go through ReLU
and are averaged over points into one embedding per frame; frames are compared with
d = 1 - cosine, where 0.01 is added to the product of the norms; and

    score(query, class) = -(sum over query frames of min over class frames of d
                            + sum over class frames of min over query frames of d).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

NORM_EPS = 0.01  # added to |a| * |b| in the cosine, as in the original
LABEL_SMOOTHING = 0.1


def class_prototypes(support_tokens: Tensor, support_labels: Tensor, way: int, shot: int) -> Tensor:
    """Mean over the shots of each class: [way*shot, S, P, D] -> [way, S, P, D] float32, row
    c = label c."""
    n = support_tokens.shape[0]
    if n != way * shot or support_labels.shape != (n,):
        raise ValueError(
            f"support: expected {way}*{shot} clips with one label each, got tokens "
            f"{tuple(support_tokens.shape)} and labels {tuple(support_labels.shape)}"
        )
    counts = torch.bincount(support_labels, minlength=way)
    if counts.numel() != way or bool((counts != shot).any()):
        raise ValueError(
            f"support_labels: each label 0..{way - 1} must appear {shot} times, "
            f"got counts {counts.tolist()}"
        )
    order = torch.argsort(support_labels, stable=True)
    # Averaged in float32 under autocast too, as `prototype_frames` (the embed-once path) does.
    shots = support_tokens[order].reshape(way, shot, *support_tokens.shape[1:])
    return shots.float().mean(dim=1)


def hausdorff_scores(
    support_tokens: Tensor,
    support_labels: Tensor,
    query_tokens: Tensor,
    way: int,
    shot: int,
    full_precision: bool = True,
) -> Tensor:
    """Scores [Q, way] (higher = closer) of queries against the episode's classes.

    support_tokens [way*shot, S, P, D] with support_labels [way*shot] in 0..way-1 (each label
    `shot` times, any order); query_tokens [Q, S, P, D]. Column c is the class labelled c.
    Computed in float32 even under autocast; full_precision False leaves the distances' matrix
    products to the autocast, as the releases' training did (tats/fixes.py "metric-fp32").
    """
    prototypes = class_prototypes(support_tokens, support_labels, way, shot)
    enabled = torch.is_autocast_enabled(query_tokens.device.type) and not full_precision
    with torch.autocast(device_type=query_tokens.device.type, enabled=enabled):
        return -hausdorff_distances(frame_embeddings(query_tokens), frame_embeddings(prototypes))


def frame_embeddings(tokens: Tensor) -> Tensor:
    """One embedding per frame, in float32: tokens [..., S, P, D] through ReLU, averaged over
    the points -> [..., S, D]. A clip's (or a prototype's) only input to the matching."""
    return F.relu(tokens.float()).mean(dim=-2)


def prototype_frames(tokens: Tensor, support_sets: Tensor) -> Tensor:
    """The frame embeddings [M, S, D] of M prototypes: support_sets [M, K] index the K support
    clips of each in tokens [N, S, P, D]; a prototype is its clips' tokens averaged (as
    `class_prototypes`, in float32), then `frame_embeddings`. Adds one clip at a time: no
    [M, K, ...] temporary."""
    total = tokens[support_sets[:, 0]].float()
    for k in range(1, support_sets.shape[1]):
        total += tokens[support_sets[:, k]]
    return frame_embeddings(total / support_sets.shape[1])


def hausdorff_distances(query_frames: Tensor, class_frames: Tensor) -> Tensor:
    """Distances [..., Q, C] between queries [..., Q, S, D] and classes [..., C, S', D], both
    frame embeddings (`frame_embeddings`); the score of the matching is minus the distance."""
    dist = frame_distances(query_frames, class_frames)  # [..., Q, C, S, S']
    return dist.min(dim=-1).values.sum(dim=-1) + dist.min(dim=-2).values.sum(dim=-1)


def frame_distances(query_frames: Tensor, class_frames: Tensor) -> Tensor:
    """d = 1 - cosine [..., Q, C, S, S'] between every query frame and every class frame (frame
    embeddings), NORM_EPS added to the product of the norms: what the metric minimises over."""
    dot = torch.einsum("...qid,...cjd->...qcij", query_frames, class_frames)
    query_norms = query_frames.norm(dim=-1)[..., :, None, :, None]
    norms = query_norms * class_frames.norm(dim=-1)[..., None, :, None, :]
    return 1.0 - dot / (norms + NORM_EPS)


class EpisodeLoss(NamedTuple):
    total: Tensor  # episode_weight * episode + cls_weight * cls
    episode: Tensor  # cross-entropy of the episode scores against the query labels
    cls: Tensor  # label-smoothed cross-entropy of the CLS logits against global train labels


def episode_loss(
    scores: Tensor,
    query_labels: Tensor,
    cls_logits: Tensor,
    cls_labels: Tensor,
    episode_weight: float = 1.0,
    cls_weight: float = 1.0,
    label_smoothing: float = LABEL_SMOOTHING,
) -> EpisodeLoss:
    """The training loss of one episode.

    scores [Q, way] from hausdorff_scores with query_labels [Q] in 0..way-1; cls_logits
    [N, num_classes] of the episode's clips (support and query) with their global train-class
    labels cls_labels [N].
    """
    episode = F.cross_entropy(scores.float(), query_labels)
    cls = F.cross_entropy(cls_logits.float(), cls_labels, label_smoothing=label_smoothing)
    return EpisodeLoss(episode_weight * episode + cls_weight * cls, episode, cls)


def accuracy_with_ci(per_episode_acc: Sequence[float] | np.ndarray | Tensor) -> tuple[float, float]:
    """Mean accuracy over episodes and its 95% confidence half-width, 1.96 * std / sqrt(n).

    std is the population standard deviation (numpy's default, as TRX reports it). The result
    is in the units of the input (fractions or percent).
    """
    if isinstance(per_episode_acc, Tensor):
        per_episode_acc = per_episode_acc.detach().cpu().numpy()
    acc = np.asarray(per_episode_acc, dtype=np.float64).ravel()
    if acc.size == 0:
        raise ValueError("accuracy_with_ci: no episodes")
    return float(acc.mean()), float(1.96 * acc.std() / np.sqrt(acc.size))
