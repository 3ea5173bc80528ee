"""Few-shot episodes read from the two stores, never from video.

`EpisodeData` opens a manifest with its tracks and features stores and refuses them unless
they were made for that manifest and agree row by row (stored frames, frame counts). Only rows
that both stores' ledgers call done take part; a class with too few of them is left out with a
warning.

An episode is a pure function of (seed, split, epoch, index, rank): `way` classes of one
split, `shot` support and `queries` query clips of each. Resuming a run therefore redraws the
episodes it would have drawn, and DDP ranks (different `rank`) draw different ones.
`EpisodeDataset` turns a key (epoch, index) into the episode's tensors, reading every clip's
arrays row by row (one chunk per array: fancy-indexing many rows of a sharded array at once
is very slow); each DataLoader worker opens the stores on first use. `ClipDataset` reads
clips one by one instead, for evaluation that embeds each clip once (tats/evaluate.py).

    data = EpisodeData.open("tracks.zarr", "features.zarr", "manifest.csv")
    train = data.dataset("train", EpisodeSpec(5, 1, 6), ReadOptions(random_view=True), seed=0)
    batch = train[(epoch, index)]   # features, positions, mask, visible, labels, classes, rows
    clips = data.clips(rows, ReadOptions())   # clips[i]: features, positions, mask, visible, rows
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from tats.manifest import SPLITS, Manifest, read_manifest
from tats.pipeline.queries import FILLS, canonical_order, cluster_subset, padded
from tats.pipeline.status import done_rows
from tats.stores import FEATURES, TRACKS, RowStore, StoreError, check_manifest

TRACKS_MODES = ("tracks", "frozen")
PADDING_LIMIT = 0.5  # share of padding points above which training warns (`warn_padding`)
MASK_MODES = ("query", "visible", "all")


class EpisodeWarning(UserWarning):
    """Rows or classes left out of episodes (failed videos, classes with too few videos)."""


@dataclass(frozen=True)
class EpisodeSpec:
    """N-way K-shot episodes with Q queries per class."""

    way: int
    shot: int
    queries: int

    def __post_init__(self) -> None:
        if self.way < 2:
            raise ValueError(f"way must be at least 2, not {self.way}")
        for name in ("shot", "queries"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, not {getattr(self, name)}")

    @property
    def per_class(self) -> int:
        return self.shot + self.queries

    @property
    def num_support(self) -> int:
        return self.way * self.shot


@dataclass(frozen=True)
class ReadOptions:
    """How a clip's arrays become model inputs.

    random_view: a random feature view per clip (training), else view 0 (the unaugmented one).
    fresh_subset: draw a new random subset of the clip's points on every read instead of the
    stored 256-subset. cluster_sampling: draw the points anew on every read from the clusters
    of a semantic-queries store, at least one per cluster and the rest by cluster size
    (Trokens' training sampling, `queries.cluster_subset`); evaluation leaves it off and reads
    the stored subset, which the tracks stage drew the same way once per video. Both draws are
    seeded per video and episode. tracks_mode "frozen" is the appearance-only baseline: the
    first query frame's grid of points, fixed where it starts and present at every frame
    (subsets and mask do not apply to it). mask "query": a point exists from its query frame
    on (TATs' query mask, for points tracked forward from their query frame); "visible": only
    where the tracker saw it (Trokens' mask: its points are tracked in both directions, so they
    exist at every frame and visibility is what is known of them); "all": every point at every
    frame (Trokens' release, whose query mask is all True: tats/fixes.py "trokens-mask").
    fill: how a clip with fewer points than the subset reaches its size. "repeat" (Trokens'):
    cluster draws repeat points (`queries.cluster_subset`), every read has P real points;
    "pad": every point at most once, masked zeros pad (grid stores' subsets always pad).
    Points are read in ascending point index, repeats then padding last, whatever the subset's
    draw order (`queries.canonical_order`): the motion tokens' relative offsets depend on it.
    """

    random_view: bool = False
    fresh_subset: bool = False
    tracks_mode: str = "tracks"
    mask: str = "query"
    cluster_sampling: bool = False
    fill: str = "repeat"

    @property
    def per_clip(self) -> bool:
        """Whether a clip's inputs are a function of the clip alone, the same in every episode
        that reads it: not where views or point subsets are drawn anew on every read."""
        return not (self.random_view or self.fresh_subset or self.cluster_sampling)

    def __post_init__(self) -> None:
        if self.tracks_mode not in TRACKS_MODES:
            raise ValueError(f"tracks mode {self.tracks_mode!r} is not one of {TRACKS_MODES}")
        if self.mask not in MASK_MODES:
            raise ValueError(f"mask {self.mask!r} is not one of {MASK_MODES}")
        if self.fill not in FILLS:
            raise ValueError(f"fill {self.fill!r} is not one of {FILLS}")
        if self.fresh_subset and self.cluster_sampling:
            raise ValueError("fresh subsets and cluster sampling exclude each other: choose one")


@dataclass(frozen=True)
class SplitClasses:
    """The classes of one split, the usable rows of each, and which of them episodes draw."""

    split: str
    names: tuple[str, ...]  # every class of the split in the manifest, sorted
    rows: tuple[np.ndarray, ...]  # usable rows of each class, ascending
    drawable: np.ndarray  # indices into `names` of the classes with enough rows


@dataclass(frozen=True)
class Episode:
    """Which clips an episode holds: the supports class by class, then the queries."""

    rows: np.ndarray  # [n] manifest rows
    labels: np.ndarray  # [n] episode label, 0..way-1
    classes: np.ndarray  # [n] index into SplitClasses.names
    views: np.ndarray  # [n] feature view read for each clip
    subset_seeds: np.ndarray  # [n] seeds of fresh point subsets (ReadOptions.fresh_subset)


def episode_rng(seed: int, split: str, epoch: int, index: int, rank: int) -> np.random.Generator:
    """The random stream of one episode."""
    return np.random.default_rng([seed, SPLITS.index(split), epoch, index, rank])


def draw_episode(
    classes: SplitClasses,
    spec: EpisodeSpec,
    views: int,
    random_view: bool,
    rng: np.random.Generator,
) -> Episode:
    """Draw `spec.way` classes, then `spec.per_class` distinct clips of each."""
    chosen = rng.choice(classes.drawable, spec.way, replace=False)
    picks = [rng.choice(classes.rows[c], spec.per_class, replace=False) for c in chosen]
    rows = np.concatenate([p[: spec.shot] for p in picks] + [p[spec.shot :] for p in picks])
    labels = np.concatenate(
        [np.repeat(np.arange(spec.way), spec.shot), np.repeat(np.arange(spec.way), spec.queries)]
    )
    n = len(rows)
    view = rng.integers(0, views, n) if random_view else np.zeros(n, np.int64)
    seeds = rng.integers(0, 2**63 - 1, n)
    return Episode(rows.astype(np.int64), labels, chosen[labels], view, seeds)


class EpisodeData:
    """A manifest and its two stores, checked against each other; use `EpisodeData.open`."""

    def __init__(
        self,
        manifest: Manifest,
        tracks: RowStore,
        features: RowStore,
        usable: np.ndarray,
        frames: np.ndarray,
        frame_size: np.ndarray,
    ):
        self.manifest = manifest
        self.tracks = tracks
        self.features = features
        self.usable = usable  # rows done in both stores, ascending
        self.frames = frames  # [R, S] time-base index of each stored frame
        self.frame_size = frame_size  # [R, 2] (height, width) of the decoded frames

    @classmethod
    def open(
        cls, tracks: str | Path, features: str | Path, manifest: str | Path | Manifest
    ) -> EpisodeData:
        """Open and check the stores; raise StoreError naming the store and the disagreement.
        Per-row metadata is read only in the shards that hold done rows (`done_field`): a store
        of a million rows, 1% done, opens in seconds."""
        if not isinstance(manifest, Manifest):
            manifest = read_manifest(manifest)
        track_store = RowStore.open(tracks, TRACKS)
        feature_store = RowStore.open(features, FEATURES)
        for store in (track_store, feature_store):
            check_manifest(store, manifest)
            if store.num_rows != len(manifest.rows):
                raise StoreError(
                    f"{store.path} has {store.num_rows} rows, {manifest.path} lists "
                    f"{len(manifest.rows)} videos"
                )
        s_tracks = track_store.fields["frames"].shape[0]
        s_features = feature_store.fields["frames"].shape[0]
        if s_tracks != s_features:
            raise StoreError(
                f"{track_store.path} stores {s_tracks} frames per video, {feature_store.path} "
                f"{s_features}"
            )
        done_t, done_f = done_rows(track_store), done_rows(feature_store)
        usable = np.intersect1d(done_t, done_f)
        only = len(done_t) + len(done_f) - 2 * len(usable)
        if only:
            warnings.warn(
                f"{only} videos are done in only one of {track_store.path.name} and "
                f"{feature_store.path.name}; they are left out",
                EpisodeWarning,
                stacklevel=2,
            )
        if not len(usable):
            raise StoreError(
                f"no video is done in both {track_store.path} and {feature_store.path}"
            )
        frames = done_field(track_store, "frames", usable)
        frame_size = done_field(track_store, "frame_size", usable)
        for name in ("frames", "num_frames"):
            t_values = frames if name == "frames" else done_field(track_store, name, usable)
            f_values = done_field(feature_store, name, usable)
            differ = (t_values[usable] != f_values[usable]).reshape(len(usable), -1).any(axis=1)
            if differ.any():
                row = int(usable[np.argmax(differ)])
                raise StoreError(
                    f"row {row} ({manifest.rows[row].video_id}): {name} differ between "
                    f"{track_store.path} ({t_values[row].tolist()}) and {feature_store.path} "
                    f"({f_values[row].tolist()}); were the stores made with the same settings?"
                )
        return cls(manifest, track_store, feature_store, usable, frames, frame_size)

    @property
    def num_frames(self) -> int:
        """S, the stored frames per clip."""
        return self.frames.shape[1]

    @property
    def views(self) -> int:
        return self.features.fields["features"].shape[0]

    @property
    def grid(self) -> tuple[int, int]:
        """(h, w) of the patch grids."""
        return self.features.fields["features"].shape[2:4]

    @property
    def feature_dim(self) -> int:
        return self.features.fields["features"].shape[4]

    @property
    def points(self) -> int:
        """P, the points per clip (the size of the stored subset)."""
        return self.tracks.fields["subset"].shape[0]

    def classes(self, split: str, per_class: int, way: int) -> SplitClasses:
        """The split's classes; those with fewer than `per_class` usable videos are left out
        with a warning, and fewer than `way` classes left is an error."""
        names = tuple(self.manifest.classes(split))
        column = self.manifest.rows  # by column: no VideoRow per row
        split_rows = self.usable[column.splits[self.usable] == SPLITS.index(split)]
        labels = column.labels[split_rows]
        order = np.argsort(labels, kind="stable")  # by class, rows ascending within each
        codes = np.searchsorted(column.label_names, names)
        bounds = np.searchsorted(labels[order], np.stack([codes, codes + 1]))
        rows = tuple(split_rows[order[a:b]] for a, b in bounds.T)
        counts = np.array([len(r) for r in rows], dtype=np.int64)
        drawable = np.flatnonzero(counts >= per_class)
        short = [f"{names[i]} ({counts[i]})" for i in np.flatnonzero(counts < per_class)]
        if short:
            warnings.warn(
                f"{split} classes with fewer than {per_class} usable videos are left out: "
                + ", ".join(short),
                EpisodeWarning,
                stacklevel=2,
            )
        if len(drawable) < way:
            raise StoreError(
                f"the {split} split has {len(drawable)} classes with at least {per_class} usable "
                f"videos; {way}-way episodes need {way}"
            )
        return SplitClasses(split, names, rows, drawable)

    def dataset(
        self,
        split: str,
        spec: EpisodeSpec,
        options: ReadOptions,
        seed: int,
        rank: int = 0,
        classes: SplitClasses | None = None,
    ) -> EpisodeDataset:
        """Episodes of `split`; `rank` enters the draw (give each DDP rank its own in training,
        and 0 in evaluation, where ranks split one set of episodes by index)."""
        queries = self.tracks.provenance.get("config", {}).get("queries")
        if options.cluster_sampling and queries != "semantic":  # grid points have no clusters
            raise StoreError(
                f"{self.tracks.path}: cluster sampling needs each point's cluster, which this "
                f"store (queries {queries}) does not hold; extract tracks with --queries semantic"
            )
        classes = classes or self.classes(split, spec.per_class, spec.way)
        return EpisodeDataset(
            self.tracks.path,
            self.features.path,
            classes,
            spec,
            options,
            self.frames,
            self.frame_size,
            self.views,
            seed,
            rank,
        )

    def padding_share(self, classes: SplitClasses, options: ReadOptions, most: int = 200) -> float:
        """The share of the points that reads of the classes' clips pad with masked zeros,
        over at most `most` of the clips (spread evenly over them)."""
        rows = np.sort(np.concatenate([classes.rows[c] for c in classes.drawable]))
        rows = rows[np.linspace(0, len(rows) - 1, min(len(rows), most)).astype(int)]
        reader = ClipReader(self.tracks.path, self.features.path, options, self.frames,
                            self.frame_size)  # fmt: skip
        return sum(reader.padding(int(row)) for row in rows) / (len(rows) * self.points)

    def clips(self, rows: np.ndarray, options: ReadOptions) -> ClipDataset:
        """The clips of `rows`, each read once (`options` must be `per_clip`)."""
        return ClipDataset(
            self.tracks.path, self.features.path, rows, options, self.frames, self.frame_size
        )


def done_field(store: RowStore, name: str, rows: np.ndarray) -> np.ndarray:
    """A per-row field [R, ...] of the store, read only where `rows` (ascending) lie: a slice
    from the first to the last of them in each shard, runs of whole shards read together (one
    chunk decode per shard where the field is a chunk per shard); the fill value in the rows
    no slice covers."""
    field = store.fields[name]
    out = np.full((store.num_rows, *field.shape), field.fill, dtype=field.dtype)
    if not len(rows):
        return out
    shard = rows // store.shard_size
    first = np.flatnonzero(np.diff(shard, prepend=-1))  # where each shard's rows begin
    starts, stops = rows[first], np.append(rows[first[1:] - 1], rows[-1]) + 1
    ends = np.flatnonzero(starts[1:] != stops[:-1])  # a gap ends a read
    for a, b in zip(starts[np.append(0, ends + 1)], stops[np.append(ends, -1)], strict=True):
        out[a:b] = store.read_field(name, range(int(a), int(b)))
    return out


def warn_padding(data: EpisodeData, classes: SplitClasses, options: ReadOptions) -> float:
    """Warn (EpisodeWarning) where most of the points training reads are padding: masked in
    attention, padding still costs as much as a point and enters the matching's mean over
    points. Returns the share."""
    share = data.padding_share(classes, options)
    if share > PADDING_LIMIT:
        real = data.points * (1 - share)
        fits = 2 ** max(3, int(np.log2(max(real, 1))))
        warnings.warn(
            f"{share:.0%} of the {data.points} points per clip that training reads are padding: "
            f"{data.tracks.path.name}'s clips keep {real:.0f} of them on average. Padding costs "
            f"as much as a point and enters the matching's mean over points; extract tracks "
            f"with --subset {fits} (or more points per clip: a larger --grid)",
            EpisodeWarning,
            stacklevel=2,
        )
    return share


def warn_augmented_pixels(data: EpisodeData, options: ReadOptions) -> bool:
    """Warn (EpisodeWarning) where training reads augmented views of `pixels` features most of
    the time: those features are the colour statistics that the views' photometric
    augmentation rewrites. On `tats synth` data (the demo's) a model so trained stayed at
    chance (docs/index.md). Returns whether it warned."""
    backbone = data.features.provenance.get("backbone", {}).get("name")
    augmented = data.views - 1 if options.random_view else 0
    if backbone != "pixels" or 2 * augmented <= data.views:
        return False
    warnings.warn(
        f"training reads an augmented view for {augmented} of every {data.views} clips "
        f"({data.features.path.name}), and `pixels` features are the colour statistics that "
        f"augmentation rewrites: on the demo's data such a model stayed at chance. Extract "
        f"features with --views 2, or train with --no-augment",
        EpisodeWarning,
        stacklevel=2,
    )
    return True


def point_mask(
    mode: str, frames: np.ndarray, query_frame: np.ndarray, visible: np.ndarray, real: np.ndarray
) -> np.ndarray:
    """Which (stored frame, point) pairs attention sees, [S, P] bool (`ReadOptions.mask`):
    "query": from each point's query frame on (stored `frames` [S] and `query_frame` [P] on
    the time base); "visible": where `visible` [S, P]; "all": every frame. Never a padding
    point (`real` [P] False)."""
    if mode == "visible":
        return visible & real
    if mode == "all":
        return np.broadcast_to(real, visible.shape).copy()
    return (frames[:, None] >= query_frame[None]) & real


class ClipReader:
    """One clip's model inputs, read from the two stores as `options` say.

    features float16 [S, h, w, C]; positions float32 [S, P, 2], (x, y) in [-1, 1] by the
    decoded frame size; mask bool [S, P]; visible bool [S, P], the tracker's visibility (in
    frozen mode: the mask). Points in ascending point index; padding points (clips with fewer
    than P points) come last, sit at (0, 0) and are masked and invisible everywhere.
    Picklable: each DataLoader worker opens the stores on first use.
    """

    def __init__(
        self,
        tracks: Path,
        features: Path,
        options: ReadOptions,
        frames: np.ndarray,
        frame_size: np.ndarray,
    ):
        self.tracks_path, self.features_path = Path(tracks), Path(features)
        self.options, self.frames, self.frame_size = options, frames, frame_size
        self._stores: tuple[RowStore, object] | None = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_stores": None}  # every worker opens its own

    def _open(self) -> tuple[RowStore, object]:
        if self._stores is None:
            features = RowStore.open(self.features_path, FEATURES).group["features"]
            self._stores = (RowStore.open(self.tracks_path, TRACKS), features)
        return self._stores

    def read_clip(self, row: int, view: int, subset_seed: int) -> dict[str, np.ndarray]:
        """The model inputs of one clip (see the class docstring)."""
        positions, mask, visible = self.read_tracks(row, subset_seed)
        features = self.read_features(row, view)
        return {"features": features, "positions": positions, "mask": mask, "visible": visible}

    def read_features(self, row: int, view: int) -> np.ndarray:
        """One clip's patch grids [S, h, w, C] of one view."""
        return np.asarray(self._open()[1][row, view])

    def read_tracks(self, row: int, subset_seed: int) -> tuple[np.ndarray, ...]:
        """One clip's points: positions [S, P, 2] in [-1, 1], mask and visible [S, P]."""
        opt = self.options
        if opt.tracks_mode == "frozen":
            return self._fixed_grid(row)
        names = ["positions", "visible", "query_frame", "subset"]
        names += ["valid"] if opt.fresh_subset or opt.cluster_sampling or opt.fill == "pad" else []
        names += ["cluster"] if opt.cluster_sampling else []
        t = self._open()[0].read_row(row, tuple(names))
        subset = t["subset"]
        if opt.fresh_subset or opt.cluster_sampling:
            kept = int(t["valid"].sum())  # kept points come first
            size = len(subset)
            if opt.cluster_sampling:
                subset = cluster_subset(t["cluster"][:kept], size, subset_seed, opt.fill)
            else:
                take = min(size, kept)
                subset = np.full(size, -1, np.int64)
                subset[:take] = np.random.default_rng(subset_seed).choice(kept, take, replace=False)
        elif opt.fill == "pad":
            subset = padded(subset, int(t["valid"].sum()))
        subset = canonical_order(subset)
        real = subset >= 0
        index = np.where(real, subset, 0)
        visible = t["visible"][:, index] & real
        mask = point_mask(opt.mask, self.frames[row], t["query_frame"][index], visible, real)
        positions = self._normalised(t["positions"][:, index], row)
        return np.where(real[None, :, None], positions, 0).astype(np.float32), mask, visible

    def padding(self, row: int) -> int:
        """How many of the P points a read of `row` pads with masked zeros (every read of it
        pads as many)."""
        opt, tracks = self.options, self._open()[0]
        size = tracks.fields["subset"].shape[0]
        if opt.tracks_mode == "frozen":
            return size - int(self._fixed_grid(row)[1].any(axis=0).sum())
        t = tracks.read_row(row, ("valid", "subset"))
        if opt.cluster_sampling and opt.fill == "repeat":
            return 0
        if opt.fresh_subset or opt.cluster_sampling or opt.fill == "pad":
            return size - min(size, int(t["valid"].sum()))
        return int((t["subset"] < 0).sum())

    def _fixed_grid(self, row: int) -> tuple[np.ndarray, ...]:
        """The appearance-only baseline: the first query frame's grid of points, fixed where
        it starts, at every frame. Neither the points kept from later query frames nor their
        query frames take part, as both depend on the motion."""
        tracks = self._open()[0]
        t = tracks.read_row(row, ("positions", "query_frame"))
        first = t["query_frame"][0]  # kept points come first, the first query frame's first
        count = tracks.fields["subset"].shape[0]
        grid = np.flatnonzero(t["query_frame"] == first)[:count] if first >= 0 else []
        start = int(np.argmax(self.frames[row] >= first))
        positions = np.zeros((len(self.frames[row]), count, 2), np.float32)
        positions[:, : len(grid)] = self._normalised(t["positions"][start, grid], row)
        mask = np.zeros(positions.shape[:2], bool)
        mask[:, : len(grid)] = True
        return positions, mask, mask.copy()

    def _normalised(self, xy: np.ndarray, row: int) -> np.ndarray:
        """Pixel (x, y) -> [-1, 1] by the decoded frame size, as the original."""
        height, width = self.frame_size[row]
        return xy / np.array([width, height], np.float32) * 2 - 1


class EpisodeDataset(ClipReader, Dataset):
    """Key (epoch, index) -> the tensors of one episode: its clips' inputs (`ClipReader`)
    stacked [n, ...], and labels, classes, rows int64 [n]; key int64 [2]."""

    def __init__(
        self,
        tracks: Path,
        features: Path,
        classes: SplitClasses,
        spec: EpisodeSpec,
        options: ReadOptions,
        frames: np.ndarray,
        frame_size: np.ndarray,
        views: int,
        seed: int,
        rank: int = 0,
    ):
        super().__init__(tracks, features, options, frames, frame_size)
        self.classes, self.spec, self.views = classes, spec, views
        self.seed, self.rank = seed, rank

    def episode(self, epoch: int, index: int) -> Episode:
        rng = episode_rng(self.seed, self.classes.split, epoch, index, self.rank)
        return draw_episode(self.classes, self.spec, self.views, self.options.random_view, rng)

    def __getitem__(self, key: tuple[int, int]) -> dict[str, torch.Tensor]:
        episode = self.episode(*key)
        picks = zip(episode.rows, episode.views, episode.subset_seeds, strict=True)
        clips = [self.read_clip(int(row), int(view), int(seed)) for row, view, seed in picks]
        return {
            **{name: torch.from_numpy(np.stack([c[name] for c in clips])) for name in clips[0]},
            "labels": torch.from_numpy(episode.labels),
            "classes": torch.from_numpy(episode.classes),
            "rows": torch.from_numpy(episode.rows),
            "key": torch.tensor(key, dtype=torch.int64),
        }


class ClipDataset(ClipReader, Dataset):
    """Index i -> the inputs of clip `rows[i]` (`ClipReader`) and its row, for batched
    DataLoaders: each clip once, as evaluation reads it (view 0, the stored point subset)."""

    def __init__(
        self,
        tracks: Path,
        features: Path,
        rows: np.ndarray,
        options: ReadOptions,
        frames: np.ndarray,
        frame_size: np.ndarray,
    ):
        if not options.per_clip:
            raise ValueError(f"{options}: a clip's inputs depend on the episode that reads it")
        super().__init__(tracks, features, options, frames, frame_size)
        self.rows = np.asarray(rows, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        row = int(self.rows[index])
        clip = self.read_clip(row, view=0, subset_seed=0)  # the seed is unused: stored subset
        return {**{k: torch.from_numpy(v) for k, v in clip.items()}, "rows": torch.tensor(row)}


class EpisodeKeys(Sampler):
    """The keys (epoch, index) one pass of a DataLoader runs: `indices` of the current epoch.

    Training gives every rank range(E) (ranks differ through the dataset's `rank`);
    evaluation gives rank r the indices r, r + world, ... of one shared set of episodes.
    """

    def __init__(self, indices: range, epoch: int = 0):
        self.indices, self.epoch = indices, epoch

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[tuple[int, int]]:
        return ((self.epoch, i) for i in self.indices)

    def __len__(self) -> int:
        return len(self.indices)
