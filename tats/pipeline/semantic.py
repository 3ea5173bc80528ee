"""Semantic query points (Trokens): clusters of patch features, and points spread over each.

As the Trokens release (`pulkitkumar95/trokens`, `point_tracking/`) selects them:

1. Patch features of `frames` clustering frames at `linspace(0, T-1, frames)` (DINOv2 ViT-B/14
   patch tokens at 224 px with ImageNet mean and std, from the backbone registry), in fp32 on
   every device as the release (`feat_extractor.py`): bf16 can flip the threshold merges below
   (`clustering_backbone`; the tracks store's provenance records the precision).
2. Clusters: per frame, ToMe-style bipartite merging (tokens split even / odd, cosine
   similarity, 25% of the tokens merged per iteration into their most similar partner by
   averaging; 11 iterations take 256 tokens to 12 centroids), then a temporal merge (frame 0's
   centroids, plus each later centroid whose best cosine similarity to those kept is below
   `threshold`), and every patch of every frame assigned to its most cosine-similar centroid
   (`clustering.py`). Or, `method="kmeans"`: k-means with `kmeans_clusters` centres on the
   patches of all frames together.
3. Per cluster, its query frame is the clustering frame where it covers most patches (the
   release takes the frame of the list position instead: `utils.py` with
   `get_semantic_points.py`); its mask there, upsampled (nearest) to the frame's pixels, gets
   `points_per_cluster` query points: k-means (seed 42) on the mask's pixel coordinates, and
   the mask pixel nearest each centre (`get_semantic_points.py`, `clustering.py`).

tats keeps at most `max_clusters` clusters (the largest, by patches over all clustering
frames), so that a store's point axis has a fixed size; cluster ids rank clusters by that size
(0 = largest), and points come grouped by cluster, in raster order within one: a canonical
order. Everything here is a pure function of the features; k-means is seeded.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from tats.pipeline.backbones import Backbone, Preprocess, create_backbone

METHODS = ("bipartite", "kmeans")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# The release's DINOv2 input: 224 x 224 (aspect not kept), ImageNet mean and std.
PREPROCESS = Preprocess(224, IMAGENET_MEAN, IMAGENET_STD)
MERGE_PERCENT = 25  # tokens merged per bipartite iteration, in percent
POINT_SEED = 42  # the release's k-means random_state for query points in a mask
FEATURE_SEED = 0  # k-means over patch features (the release's draw is unseeded per video)


@dataclass(frozen=True)
class SemanticConfig:
    """How `--queries semantic` picks its query points (recorded in the tracks store)."""

    method: str = "bipartite"  # or "kmeans"
    frames: int = 32  # clustering frames, at linspace(0, T-1, frames)
    threshold: float = 0.2  # temporal merge: a later centroid is new below this cosine
    merge_iterations: int = 11  # bipartite merging iterations per frame
    kmeans_clusters: int = 32  # method "kmeans": k
    points_per_cluster: int = 16
    max_clusters: int = 32  # clusters kept (the largest): the store has room for their points
    backbone: str = "dinov2_vitb14"  # clustering features, from the backbone registry

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"clustering method {self.method!r}: use {' or '.join(METHODS)}")
        for name in ("frames", "kmeans_clusters", "points_per_cluster", "max_clusters"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, not {getattr(self, name)}")
        if self.merge_iterations < 0:
            raise ValueError(f"merge_iterations must be >= 0, not {self.merge_iterations}")
        if not -1.0 <= self.threshold <= 1.0:
            raise ValueError(f"threshold is a cosine similarity in [-1, 1], not {self.threshold}")

    @property
    def max_points(self) -> int:
        """Room on the store's point axis."""
        return self.max_clusters * self.points_per_cluster


def clustering_backbone(
    name: str, weights: str | None = None, device: str | torch.device = "cpu", **kwargs
) -> Backbone:
    """The backbone semantic queries cluster the features of: `name` with the release's input
    (`PREPROCESS`), in fp32 on every device (its `identity` says so)."""
    return create_backbone(name, weights, device, preprocess=PREPROCESS, precision="fp32", **kwargs)


def clustering_frames(num_frames: int, count: int) -> np.ndarray:
    """The frames clustered: `linspace(0, T-1, count)` truncated to integers (all T frames when
    T < count); distinct and ascending."""
    return np.linspace(0, num_frames - 1, min(count, num_frames)).astype(np.int64)


# ---------------------------------------------------------------------------------------------
# clusters of patches


def bipartite_merge(tokens: torch.Tensor, iterations: int = 11) -> torch.Tensor:
    """ToMe bipartite soft matching, `iterations` times: tokens [F, N, D] -> centroids [F, M, D].

    Each iteration splits the tokens into even (a) and odd (b) positions, matches every a to
    its most cosine-similar b, and merges the r = floor(N * 25%) best-matched a's into their
    b's: a merged b becomes the plain mean of itself and the a's merged into it. The unmerged
    a's (in descending order of their best similarity) come first, then the b's, as in the
    release; the order decides the next iteration's split.
    """
    x = tokens
    f, _, d = x.shape
    for _ in range(iterations):
        n = x.shape[1]
        r = n * MERGE_PERCENT // 100
        if r == 0:  # fewer than 4 tokens: nothing merges any more
            break
        k = F.normalize(x, dim=-1)
        scores = k[:, ::2] @ k[:, 1::2].transpose(1, 2)
        best, partner = scores.max(dim=-1)
        order = best.argsort(dim=-1, descending=True, stable=True)
        src, unmerged = order[:, :r], order[:, r:]
        dst = partner.gather(1, src)
        a, b = x[:, ::2], x[:, 1::2]
        kept = a.gather(1, unmerged[..., None].expand(-1, -1, d))
        moved = a.gather(1, src[..., None].expand(-1, -1, d))
        counts = torch.ones(f, b.shape[1], dtype=x.dtype, device=x.device)
        counts.scatter_add_(1, dst, torch.ones_like(dst, dtype=x.dtype))
        b = b.scatter_add(1, dst[..., None].expand(-1, -1, d), moved) / counts[..., None]
        x = torch.cat([kept, b], dim=1)
    return x


def merge_temporal(centroids: torch.Tensor, threshold: float = 0.2) -> torch.Tensor:
    """Per-frame centroids [F, M, D] -> the video's centroids [K, D]: all of frame 0's, then
    each later frame's centroids whose highest cosine similarity to those kept so far is
    below `threshold` (compared with the centroids of earlier frames only)."""
    kept = [centroids[0]]
    unit = F.normalize(centroids[0], dim=-1)
    for frame in centroids[1:]:
        frame_unit = F.normalize(frame, dim=-1)
        new = (frame_unit @ unit.T).max(dim=1).values < threshold
        if new.any():
            kept.append(frame[new])
            unit = torch.cat([unit, frame_unit[new]])
    return torch.cat(kept)


def assign(tokens: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """Each token [..., D] -> the index of its most cosine-similar centroid [K, D] (the first
    on ties)."""
    similarity = F.normalize(tokens, dim=-1) @ F.normalize(centroids, dim=-1).T
    return similarity.argmax(dim=-1)


def kmeans(
    points: np.ndarray,
    k: int,
    seed: int,
    plus_plus: bool = True,
    max_iters: int = 300,
    tol: float = 1e-4,
) -> tuple[np.ndarray, np.ndarray]:
    """Lloyd's k-means with Euclidean distance: points [N, D] -> (labels [N], centres [k, D]).

    Initial centres: k-means++ (`plus_plus`), or k distinct points drawn uniformly (the
    release's feature k-means); drawn from numpy's generator seeded with `seed`. Iterates until
    the assignment stops changing, the centres move less than `tol` (squared, summed, relative
    to the points' mean variance: scikit-learn's rule) or `max_iters`; an empty cluster keeps
    its centre. Labels are the final centres' nearest (the first on ties).
    """
    rng = np.random.default_rng(seed)
    x = np.asarray(points, np.float64)
    n = len(x)
    if plus_plus:
        chosen = [int(rng.integers(n))]
        nearest = ((x - x[chosen[0]]) ** 2).sum(axis=1)
        for _ in range(1, k):
            total = nearest.sum()
            pick = int(rng.choice(n, p=nearest / total)) if total > 0 else int(rng.integers(n))
            chosen.append(pick)
            nearest = np.minimum(nearest, ((x - x[pick]) ** 2).sum(axis=1))
        centres = x[chosen].copy()
    else:
        centres = x[rng.permutation(n)[:k]].copy()
    limit = tol * float(x.var(axis=0).mean()) if n > 1 else 0.0
    squared = (x * x).sum(axis=1)

    def nearest_centre(c: np.ndarray) -> np.ndarray:
        if x.shape[1] <= 4:  # pixel coordinates: differences are exact and cheap
            return sum((x[:, j, None] - c[None, :, j]) ** 2 for j in range(x.shape[1])).argmin(1)
        return (squared[:, None] - 2 * x @ c.T + (c * c).sum(axis=1)[None]).argmin(axis=1)

    labels = nearest_centre(centres)
    for _ in range(max_iters):
        moved = centres.copy()
        for c in np.unique(labels):
            centres[c] = x[labels == c].mean(axis=0)
        new = nearest_centre(centres)
        converged = np.array_equal(new, labels) or ((centres - moved) ** 2).sum() <= limit
        labels = new
        if converged:
            break
    return labels, centres


def cluster_patches(features: torch.Tensor | np.ndarray, config: SemanticConfig) -> np.ndarray:
    """Patch features [F, h, w, D] of the clustering frames -> cluster id per patch [F, h, w]
    int64: 0 = the largest cluster, -1 = a patch of a cluster beyond `max_clusters`."""
    x = torch.as_tensor(features).float().cpu()
    frames, h, w, d = x.shape
    tokens = x.reshape(frames, h * w, d)
    if config.method == "bipartite":
        per_frame = bipartite_merge(tokens, config.merge_iterations)
        labels = assign(tokens, merge_temporal(per_frame, config.threshold)).numpy()
    else:
        flat = tokens.reshape(-1, d).numpy()
        labels, _ = kmeans(flat, config.kmeans_clusters, FEATURE_SEED, plus_plus=False)
    return rank_clusters(labels.reshape(frames, h, w), config.max_clusters)


def rank_clusters(labels: np.ndarray, max_clusters: int) -> np.ndarray:
    """Renumber cluster ids (>= 0) by size, largest first (ties: the lower old id first);
    clusters past `max_clusters` become -1."""
    labels = np.asarray(labels, np.int64)
    counts = np.bincount(labels[labels >= 0].ravel())
    order = np.argsort(-counts, kind="stable")
    order = order[counts[order] > 0][:max_clusters]
    new_id = np.full(len(counts) + 1, -1, np.int64)  # index -1 (a dropped patch) stays -1
    new_id[order] = np.arange(len(order))
    return new_id[labels]


def peak_frames(labels: np.ndarray) -> np.ndarray:
    """Per cluster (ids 0..K-1 of `labels` [F, h, w]), the clustering frame where it covers most
    patches (the first such frame on ties): [K] indices into the clustering frames."""
    num = int(labels.max()) + 1 if labels.size else 0
    if num <= 0:
        return np.zeros(0, np.int64)
    return np.stack([(labels == c).sum(axis=(1, 2)) for c in range(num)]).argmax(axis=1)


# ---------------------------------------------------------------------------------------------
# points in a cluster's mask


def upsample_mask(mask: np.ndarray, height: int, width: int) -> np.ndarray:
    """A patch mask [h, w] -> a pixel mask [height, width] (torch's nearest interpolation)."""
    m = torch.from_numpy(np.ascontiguousarray(mask, dtype=np.float32))[None, None]
    return F.interpolate(m, size=(height, width), mode="nearest")[0, 0].numpy() > 0.5


def mask_points(mask: np.ndarray, count: int, seed: int = POINT_SEED) -> np.ndarray:
    """Up to `count` pixels of a pixel mask [H, W], spread over it: k-means with `count`
    centres on the mask's pixel coordinates, and for each centre the nearest pixel of its
    k-means cluster; all pixels when the mask has at most `count`. (x, y) [n, 2] float32 in
    raster order."""
    ys, xs = np.nonzero(mask)
    coords = np.stack([xs, ys], axis=1).astype(np.float64)
    if len(coords) > count:
        labels, centres = kmeans(coords, count, seed)
        picked = []
        for c in range(count):
            members = np.flatnonzero(labels == c)
            if len(members):
                picked.append(members[((coords[members] - centres[c]) ** 2).sum(1).argmin()])
        coords = coords[np.unique(picked)]  # np.nonzero's order is raster order
    return coords.astype(np.float32)


def semantic_queries(
    labels: np.ndarray,
    frame_ids: np.ndarray,
    height: int,
    width: int,
    points_per_cluster: int,
    release_query_frame: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Query points of clustered frames: labels [F, h, w] (cluster ids, -1 none), `frame_ids`
    [F] the clip frames they are of, frames of `height` x `width` px.

    Returns queries [N, 3] float32 (t, x, y) and each point's cluster id [N] int32, grouped by
    cluster (ascending), raster order within a cluster; t is the cluster's peak frame, where
    its points lie. release_query_frame: t is the clustering frame at the peak frame's position
    among the distinct peak frames, ascending, as Trokens' release (`point_tracking/utils.py`
    `convert_points_for_tracking` numbers the peak frames' point lists, not the frames); the
    points still lie where the cluster is at its peak frame.
    """
    peaks = peak_frames(labels)
    position = np.searchsorted(np.unique(peaks), peaks)
    queries, clusters = [], []
    for cluster, peak in enumerate(peaks):
        mask = upsample_mask(labels[peak] == cluster, height, width)
        xy = mask_points(mask, points_per_cluster)
        when = frame_ids[position[cluster]] if release_query_frame else frame_ids[peak]
        t = np.full((len(xy), 1), when, np.float32)
        queries.append(np.concatenate([t, xy], axis=1))
        clusters.append(np.full(len(xy), cluster, np.int32))
    if not queries:
        return np.zeros((0, 3), np.float32), np.zeros(0, np.int32)
    return np.concatenate(queries), np.concatenate(clusters)


def select_queries(
    features: torch.Tensor | np.ndarray,
    frame_ids: np.ndarray,
    height: int,
    width: int,
    config: SemanticConfig,
    release_query_frame: bool = False,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Patch features [F, h, w, D] of the clip frames `frame_ids` -> (queries [N, 3] (t, x, y)
    in pixels of `height` x `width` frames, cluster id per query [N], patch labels [F, h, w]);
    `release_query_frame`: as `semantic_queries`."""
    labels = cluster_patches(features, config)
    queries, clusters = semantic_queries(
        labels, frame_ids, height, width, config.points_per_cluster, release_query_frame
    )
    return queries, clusters, labels
