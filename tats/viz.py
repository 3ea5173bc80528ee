"""Pictures: training curves, the confusion matrix, and what the stores and the model saw.

- `plot_history`, `plot_confusion`: a training run's PNGs (matplotlib, Agg backend).
- `render_tracks`: a tracks store's points over the video's stored frames (a PNG contact
  sheet, or an MP4 / GIF through PyAV).
- `render_features`: each stored frame beside its patch features projected to RGB by PCA.
- `render_episode`: one few-shot episode's matching, frame pairs and point matches.
- `render_queries`: a video's semantic query points (Trokens) over its clusters; this one
  reads a video file, not a store, and runs the clustering backbone on it.

Frames are decoded exactly as a store recorded them (the time base of the store's config, the
row's stored frame indices); nothing is tracked, encoded or sampled again.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def plot_history(history: Sequence[dict], out_dir: str | Path) -> list[Path]:
    """loss.png (total, episode and CLS losses) and accuracy.png (train and val) per epoch."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    panels = [
        ("loss.png", "loss", [("loss", "total"), ("episode_loss", "episode"), ("cls_loss", "CLS")]),
        (
            "accuracy.png",
            "few-shot accuracy (%)",
            [("train_accuracy", "train episodes"), ("val_accuracy", "val episodes")],
        ),
    ]
    for name, ylabel, series in panels:
        fig, ax = plt.subplots(figsize=(6, 4))
        for key, label in series:
            points = [(r["epoch"], r[key]) for r in history if r[key] is not None]
            if points:
                ax.plot(*zip(*points, strict=True), marker="o", markersize=3, label=label)
        ax.set_xlabel("epoch")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(out_dir / name, dpi=100)
        plt.close(fig)
        paths.append(out_dir / name)
    return paths


def plot_confusion(confusion: np.ndarray, classes: Sequence[str], path: str | Path) -> Path:
    """Row-normalised confusion matrix (row = true class) with the class names."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    counts = np.asarray(confusion, dtype=np.float64)
    rates = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    size = max(4.0, 0.45 * len(classes) + 2)
    fig, ax = plt.subplots(figsize=(size + 1, size))
    image = ax.imshow(rates, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(classes)), classes, rotation=90, fontsize=8)
    ax.set_yticks(range(len(classes)), classes, fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if len(classes) <= 30:
        for i, j in np.ndindex(rates.shape):
            if counts[i, j]:
                colour = "white" if rates[i, j] > 0.5 else "black"
                ax.text(
                    j, i, f"{rates[i, j]:.2f}", ha="center", va="center", fontsize=6, color=colour
                )
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


# ---------------------------------------------------------------------------------------------
# Pictures of the stores: shared parts

GAP = 2  # px between the tiles of a sheet
HEADER = 34  # px of the caption band above a sheet: two lines of text
VIDEO_FPS_STORED = 2.0  # frames per second of a video of the stored frames only
PICTURE_SUFFIXES = (".png", ".mp4", ".gif")


@dataclass(frozen=True)
class StoredRow:
    """One done row of a store, found through its manifest."""

    store: object  # tats.stores.RowStore
    video: object  # tats.manifest.VideoRow
    data: dict[str, np.ndarray]


def open_stored_row(store_path: str | Path, schema: str, manifest, video_id: str) -> StoredRow:
    """The row of `video_id` in the store at `store_path`, checked: the store holds `schema`,
    was made for `manifest` (a path or a Manifest), and has the row done."""
    from tats.manifest import Manifest, read_manifest
    from tats.pipeline.status import done_rows
    from tats.stores import RowStore, StoreError, check_manifest

    if not isinstance(manifest, Manifest):
        manifest = read_manifest(manifest)
    store = RowStore.open(store_path, schema)
    check_manifest(store, manifest)
    video = manifest.rows.find(video_id)
    if video is None:
        raise ValueError(f"{manifest.path}: no video {video_id!r}")
    if video.row not in set(done_rows(store).tolist()):
        raise StoreError(
            f"{store.path}: row {video.row} ({video_id}) is not done; extract it first"
        )
    return StoredRow(store, video, store.read_row(video.row))


def display_size(width: int, height: int, side: int) -> tuple[int, int]:
    """(width, height) with the longer side `side` px, aspect kept, even (H.264 needs it)."""
    scale = side / max(width, height)
    return max(2, 2 * round(width * scale / 2)), max(2, 2 * round(height * scale / 2))


def decode_time_base(
    stored: StoredRow, frames: np.ndarray, side: int
) -> tuple[np.ndarray, np.ndarray]:
    """Frames `frames` of the row's time base (as the store's config defines it), decoded at
    `side` px; and the scale (sx, sy) from pixels of the video file to those frames."""
    from tats.stores import StoreError
    from tats.video import probe, read_frames, timeline

    config, path = stored.store.provenance["config"], stored.video.path
    info = probe(path)
    native = timeline(info, config["fps"], config["native_suffixes"])
    recorded = int(stored.data["num_frames"])
    if len(native) != recorded:
        raise StoreError(
            f"{path}: {len(native)} frames on the time base, {stored.store.path} recorded "
            f"{recorded}; was the video replaced since extraction?"
        )
    width, height = display_size(info.width, info.height, side)
    images = read_frames(path, native[np.asarray(frames)], size=(width, height))
    return images, np.array([width / info.width, height / info.height], np.float32)


@lru_cache(maxsize=4)
def _font(size: int):
    from matplotlib import font_manager
    from PIL import ImageFont

    return ImageFont.truetype(font_manager.findfont("DejaVu Sans"), size)


def _text(image: np.ndarray, lines: Sequence[str], xy=(3, 2), size: int = 12, box=True) -> None:
    """Write `lines` onto `image` (in place) at `xy`, white on a dark box where `box`, else
    black; the font shrinks (down to 7 px) until the longest line fits the image's width."""
    from PIL import Image, ImageDraw

    pil = Image.fromarray(image)
    draw = ImageDraw.Draw(pil)
    x, y = xy
    font = _font(size)
    while size > 7 and max(draw.textlength(line, font=font) for line in lines) > (
        image.shape[1] - x - 3
    ):
        size -= 1
        font = _font(size)
    for line in lines:
        left, top, right, bottom = draw.textbbox((x, y), line, font=font)
        if box:
            draw.rectangle((left - 2, top - 1, right + 2, bottom + 1), fill=(0, 0, 0))
        draw.text((x, y), line, font=font, fill=(255, 255, 255) if box else (0, 0, 0))
        y += size + 3
    image[:] = np.asarray(pil)


def sheet(tiles: Sequence[np.ndarray], columns: int, header: Sequence[str] = ()) -> np.ndarray:
    """Tiles of one size in rows of `columns`, GAP px apart, under a HEADER px caption band
    holding up to two lines of `header` (none: no band)."""
    h, w = tiles[0].shape[:2]
    columns = max(1, min(columns, len(tiles)))
    rows = -(-len(tiles) // columns)
    top = HEADER if header else 0
    out = np.full((top + rows * h + (rows - 1) * GAP, columns * w + (columns - 1) * GAP, 3), 255,
                  np.uint8)  # fmt: skip
    for i, tile in enumerate(tiles):
        r, c = divmod(i, columns)
        out[top + r * (h + GAP) : top + r * (h + GAP) + h, c * (w + GAP) : c * (w + GAP) + w] = tile
    if header:
        _text(out, list(header)[:2], xy=(4, 2), size=12, box=False)
    return out


def write_picture(images: Sequence[np.ndarray], out: Path, fps: float, columns: int,
                  header: Sequence[str]) -> Path:  # fmt: skip
    """A PNG contact sheet of `images` (under `header`), or an MP4 / GIF of them, one frame
    each at `fps`, with the header on every frame."""
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix.lower() == ".png":
        from PIL import Image

        Image.fromarray(sheet(images, columns, header)).save(out, optimize=True)
        return out
    write_video([sheet([image], 1, header) for image in images], out, fps)
    return out


def write_video(frames: Sequence[np.ndarray], path: Path, fps: float) -> Path:
    """uint8 RGB frames of one (even) size -> an H.264 MP4 or a GIF, through PyAV."""
    from fractions import Fraction

    import av

    gif = path.suffix.lower() == ".gif"
    h, w = frames[0].shape[:2]
    tmp = path.with_name(f".{path.name}.tmp{path.suffix}")
    with av.open(str(tmp), "w") as container:
        stream = container.add_stream("gif" if gif else "libx264",
                                      rate=Fraction(fps).limit_denominator(1000))  # fmt: skip
        stream.width, stream.height = w + w % 2, h + h % 2
        stream.pix_fmt = "rgb8" if gif else "yuv420p"
        for frame in frames:
            frame = np.pad(frame, ((0, h % 2), (0, w % 2), (0, 0)), constant_values=255)
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    tmp.replace(path)
    return path


def check_picture_path(out: str | Path, suffixes: Sequence[str] = PICTURE_SUFFIXES) -> Path:
    out = Path(out)
    if out.suffix.lower() not in suffixes:
        raise ValueError(f"{out}: the picture must end in {', '.join(suffixes)}")
    return out


# Bright colours that stand out on video (each point also gets a dark outline).
PALETTE = ("#ffd400", "#00e5ff", "#ff3d8b", "#76ff03", "#ff8c00", "#c77dff", "#ffffff",
           "#00c853", "#ff1744", "#2979ff", "#f4ff81", "#a1887f")  # fmt: skip


def _categorical(count: int) -> np.ndarray:
    """`count` distinct uint8 RGB colours: PALETTE, then tab20 repeated for more."""
    if count <= len(PALETTE):
        rgb = [matplotlib.colors.to_rgb(c) for c in PALETTE[: max(count, 1)]]
    else:
        cmap = plt.get_cmap("tab20")
        rgb = [cmap(i % cmap.N)[:3] for i in range(count)]
    return (np.array(rgb) * 255).round().astype(np.uint8)


# ---------------------------------------------------------------------------------------------
# Tracks


def point_colours(data: dict[str, np.ndarray]) -> tuple[np.ndarray, str]:
    """A colour per point [P, 3] uint8, by cluster where the store holds clusters, else by query
    frame; and what the colour means."""
    valid = data["valid"]
    clusters = data.get("cluster")
    if clusters is not None and (clusters[valid] >= 0).any():
        count = int(clusters.max()) + 1
        colours = _cluster_colours(count)[np.maximum(clusters, 0)]  # as `render_queries`
        colours[clusters < 0] = 128
        return colours, f"colour = cluster ({len(np.unique(clusters[valid]))} clusters)"
    query = data["query_frame"]
    frames = np.unique(query[valid])
    colours = _categorical(len(frames))[np.clip(np.searchsorted(frames, query), 0, len(frames) - 1)]
    listed = ", ".join(str(int(f)) for f in frames)
    return colours, f"colour = query frame ({listed})"


def draw_points(image: np.ndarray, xy: np.ndarray, visible: np.ndarray, colours: np.ndarray,
                trails: Sequence[np.ndarray] = (), radius: float = 3.0) -> None:  # fmt: skip
    """Draw points xy [N, 2] (pixels of `image`) in place: filled where `visible`, hollow
    where not, each after its trail (a polyline [k, 2] ending at the point; may be empty)."""
    import cv2

    shift = 4  # sub-pixel precision: coordinates in 1/16 px
    scale = 1 << shift
    for points, colour in zip(trails, colours, strict=False):
        if len(points) > 1:
            line = np.round(points * scale).astype(np.int32)
            cv2.polylines(image, [line], False, colour.tolist(), 1, cv2.LINE_AA, shift)
    r = max(1, round(radius * scale))
    for (x, y), seen, colour in zip(xy, visible, colours, strict=True):
        centre = (round(x * scale), round(y * scale))
        if seen:
            cv2.circle(image, centre, r, colour.tolist(), -1, cv2.LINE_AA, shift)
            cv2.circle(image, centre, r, (0, 0, 0), 1, cv2.LINE_AA, shift)
        else:
            cv2.circle(image, centre, r, colour.tolist(), 2, cv2.LINE_AA, shift)


def to_display(xy: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """(x, y) pixels of the video file (pixel centres at integers) -> pixels of a frame
    resized by `scale` (sx, sy)."""
    return (xy + 0.5) * scale - 0.5


POINT_CHOICES = ("subset", "all")


def check_point_choice(points: str, max_points: int | None) -> None:
    """Raise ValueError, naming the option, for a `--points` or `--max-points` out of range."""
    if points not in POINT_CHOICES:
        raise ValueError(f"--points is subset or all, not {points!r}")
    if max_points is not None and max_points < 1:
        raise ValueError(f"--max-points must be at least 1, not {max_points}")


def drawn_points(data: dict[str, np.ndarray], points: str = "subset",
                 max_points: int | None = None) -> np.ndarray:  # fmt: skip
    """The indices (ascending) of a tracks row's points to draw: "subset", the stored subset
    that training reads (each point once; padding left out), or "all", every point the
    redundancy filter kept; then at most `max_points` of them, evenly spread by index (so
    every query frame or cluster keeps its share)."""
    check_point_choice(points, max_points)
    keep = np.flatnonzero(data["valid"])
    if points == "subset":
        subset = data["subset"]
        keep = np.intersect1d(keep, subset[subset >= 0])
    if max_points is not None and len(keep) > max_points:
        keep = keep[np.arange(max_points) * len(keep) // max_points]
    return keep


def render_tracks(
    tracks: str | Path,
    manifest,
    video_id: str,
    out: str | Path,
    all_frames: bool = False,
    trail: int = 3,
    side: int = 256,
    columns: int = 4,
    points: str = "subset",
    max_points: int | None = None,
) -> Path:
    """Draw a tracks store's points over the video's frames into `out` (.png: a contact sheet;
    .mp4 / .gif: a video).

    Each stored frame shows the drawn points (`drawn_points`: the stored subset or every kept
    point, at most `max_points`) that exist there (grid queries: from their query frame on;
    semantic queries, tracked both ways: at every frame), filled where visible and hollow
    where not, with their trail over the last `trail` stored frames; points the filter
    dropped are never drawn. Colour = cluster where the store holds clusters, else query
    frame. `all_frames` shows every frame of the time base instead of the stored ones, each
    with the points of the latest stored frame at or before it: it draws what the store holds
    and tracks nothing. Frames are decoded with their longer side `side` px.
    """
    from tats.stores import TRACKS

    out = check_picture_path(out)
    check_point_choice(points, max_points)
    stored = open_stored_row(tracks, TRACKS, manifest, video_id)
    data = stored.data
    time_base = data["frames"].astype(np.int64)
    shown = np.arange(int(data["num_frames"])) if all_frames else time_base
    images, scale = decode_time_base(stored, shown, side)
    keep = drawn_points(data, points, max_points)
    positions = to_display(data["positions"][:, keep], scale)  # [S, n, 2]
    query, visible = data["query_frame"][keep], data["visible"][:, keep]
    if stored.store.provenance["config"].get("queries") == "semantic":
        query = np.full_like(query, -1)  # tracked both ways: they exist at every frame
    colours, meaning = point_colours(data)
    colours = colours[keep]
    radius = max(2.5, side / 75)
    tiles = []
    for image, t in zip(images, shown, strict=True):
        s = int(np.searchsorted(time_base, t, side="right")) - 1  # latest stored frame <= t
        tile = image.copy()
        if s >= 0:
            exists = np.flatnonzero(time_base[s] >= query)
            first = max(0, s - trail)
            trails = [
                positions[first : s + 1, p][time_base[first : s + 1] >= query[p]] for p in exists
            ]
            draw_points(tile, positions[s, exists], visible[s, exists], colours[exists], trails,
                        radius)  # fmt: skip
        held = "" if s >= 0 and time_base[s] == t else (
            f" (points of t={time_base[s]})" if s >= 0 else " (no stored frame yet)"
        )  # fmt: skip
        _text(tile, [f"t={t}{held}"], size=max(10, side // 22))
        tiles.append(tile)
    kept = int(data["valid"].sum())
    which = "the stored subset" if points == "subset" else "all"
    which += f", at most {max_points}" if max_points is not None else ""
    header = [
        f"{video_id} ({stored.video.label}): {len(keep)} of {kept} kept points ({which}), "
        f"{meaning}",
        f"filled = visible, hollow = not visible; trails over {trail} stored frames; "
        f"t = frame of the {int(data['num_frames'])}-frame time base",
    ]
    fps = stored.store.provenance["config"]["fps"] or 10.0
    return write_picture(tiles, out, fps if all_frames else VIDEO_FPS_STORED, columns, header)


# ---------------------------------------------------------------------------------------------
# Features


def pca_rgb(features: np.ndarray) -> np.ndarray:
    """Patch features [..., C] -> RGB [..., 3] uint8: the first three principal components of
    all the patches together, each stretched from its 1st to its 99th percentile to 0..255.
    Component signs are fixed (largest loading positive), so the colours are reproducible."""
    x = np.asarray(features, np.float64).reshape(-1, features.shape[-1])
    x = x - x.mean(axis=0)
    _, _, vt = np.linalg.svd(x, full_matrices=False)
    components = vt[:3]
    components *= np.sign(components[np.arange(len(components)),
                                     np.abs(components).argmax(axis=1)])[:, None]  # fmt: skip
    projected = x @ components.T
    if projected.shape[1] < 3:  # fewer than 3 channels or patches: pad with grey
        projected = np.pad(projected, ((0, 0), (0, 3 - projected.shape[1])))
    low, high = np.percentile(projected, [1, 99], axis=0)
    rgb = (projected - low) / np.maximum(high - low, 1e-12)
    return (np.clip(rgb, 0, 1) * 255).round().astype(np.uint8).reshape(*features.shape[:-1], 3)


def render_features(
    features: str | Path, manifest, video_id: str, out: str | Path, side: int = 192
) -> Path:
    """A PNG of the video's stored frames (top row) and, under each, its view-0 patch features
    projected to RGB by PCA over the clip's patches (`pca_rgb`): patches with similar features
    get similar colours. The backbone saw each frame squashed to a square, so the patch grid
    is stretched back over the frame."""
    import cv2

    from tats.stores import FEATURES

    out = check_picture_path(out, (".png",))
    stored = open_stored_row(features, FEATURES, manifest, video_id)
    data = stored.data
    images, _ = decode_time_base(stored, data["frames"], side)
    grids = pca_rgb(data["features"][0])  # [S, h, w, 3]
    h, w = images.shape[1:3]
    maps = [cv2.resize(g, (w, h), interpolation=cv2.INTER_NEAREST) for g in grids]
    tiles = [image.copy() for image in images]
    for tile, t in zip(tiles, data["frames"], strict=True):
        _text(tile, [f"t={t}"], size=max(10, side // 22))
    backbone = stored.store.provenance.get("backbone", {})
    name = backbone.get("name", "?") if isinstance(backbone, dict) else str(backbone)
    grid = data["features"].shape[2:]
    header = [
        f"{video_id} ({stored.video.label}): stored frames, and below each its {grid[0]}x"
        f"{grid[1]}x{grid[2]} {name} patch features",
        "projected to RGB by PCA (first 3 components over the clip's patches)",
    ]
    return write_picture(tiles + maps, out, VIDEO_FPS_STORED, len(tiles), header)


# ---------------------------------------------------------------------------------------------
# An episode's matching


@dataclass(frozen=True)
class EpisodeMatch:
    """What `render_episode` drew: the query, its true and predicted classes, the distance to
    every class of the episode (the metric's; lower is nearer), and the picture."""

    path: Path
    query_video: str
    true_class: str
    predicted_class: str
    distances: dict[str, float]


def render_episode(
    checkpoint: str | Path,
    tracks: str | Path,
    features: str | Path,
    manifest,
    out: str | Path,
    episode: int = 0,
    query: int = 0,
    split: str = "test",
    points: int = 12,
    side: int = 192,
    device: str = "auto",
) -> EpisodeMatch:
    """A PNG of how a checkpoint classified one query of one few-shot episode.

    The episode is episode `episode` of `split` exactly as evaluation draws it (the run's
    seed, way, shot and queries, clips read as evaluation reads them); `query` picks one of
    its queries. The Hausdorff metric matches frames, not points: every frame of a clip is one
    embedding, its tokens through ReLU averaged over the points, and each query frame is paired
    with the class frame nearest to it by d = 1 - cosine (the distance to the class sums these
    minima and those of the class frames to the query). The picture shows, for the predicted
    class and for the true class (the runner-up where the prediction is right), each query
    frame beside its nearest frame of the class's support clip, and within each pair lines from
    `points` query points (spread over the points present) to the support point most similar
    to each by token cosine (the ReLU'd tokens the metric averages). The metric itself never
    pairs points: these lines show which parts of the matched frames look alike to the model.
    With several shots, frames are matched to the class prototype (the shots' tokens averaged)
    and points to its first shot.
    """
    import cv2
    import torch

    from tats.checkpoints import check_stores_match, load_checkpoint
    from tats.episodes import EpisodeData, EpisodeSpec
    from tats.evaluate import check_model_fits, embed, evaluation_options, load_model
    from tats.fewshot import class_prototypes, frame_distances, frame_embeddings
    from tats.model import MODEL_INPUTS, ModelConfig
    from tats.runtime import resolve_device

    out = check_picture_path(out, (".png",))
    state = load_checkpoint(checkpoint)
    saved = state["config"]
    data = EpisodeData.open(tracks, features, manifest)
    check_stores_match(state, data.tracks, data.features, Path(checkpoint))
    check_model_fits(ModelConfig(**state["model_config"]), data, Path(checkpoint))
    spec = EpisodeSpec(saved["way"], saved["shot"], saved["test_queries"])
    if not 0 <= query < spec.way * spec.queries:
        raise ValueError(f"query {query}: an episode has {spec.way * spec.queries} queries")
    if episode < 0:
        raise ValueError(f"episode must be at least 0, not {episode}")
    classes = data.classes(split, spec.per_class, spec.way)
    options = evaluation_options(saved)
    batch = data.dataset(split, spec, options, saved["seed"], classes=classes)[(0, episode)]
    dev = resolve_device(device)
    model = load_model(state, dev)
    with torch.no_grad():
        inputs = {k: batch[k].to(dev) for k in MODEL_INPUTS}
        tokens = embed(model, inputs).float().cpu()
    n, labels = spec.num_support, batch["labels"]
    q = n + query
    prototypes = class_prototypes(tokens[:n], labels[:n], spec.way, spec.shot)
    dist = frame_distances(frame_embeddings(tokens[q : q + 1]), frame_embeddings(prototypes))[0]
    distance = dist.min(dim=-1).values.sum(dim=-1) + dist.min(dim=-2).values.sum(dim=-1)
    nearest = distance.argsort().tolist()
    true, predicted = int(labels[q]), nearest[0]
    other = true if predicted != true else nearest[1]
    name = [classes.names[int(c)] for c in batch["classes"][:n].view(spec.way, spec.shot)[:, 0]]
    rows = batch["rows"].tolist()
    query_video = data.manifest.rows[rows[q]].video_id

    def clip(i: int, size: tuple[int, int] | None = None):
        """Clip i of the episode: its row, stored frames, images (`size` = (w, h): resized to
        it), its points in pixels of the images, its mask."""
        row = data.manifest.rows[rows[i]]
        data_row = data.tracks.read_row(row.row, ("frames", "num_frames"))
        stored = StoredRow(data.tracks, row, data_row)
        images, scale = decode_time_base(stored, stored.data["frames"], side)
        if size is not None and (images.shape[2], images.shape[1]) != size:
            scale = scale * np.array([size[0] / images.shape[2], size[1] / images.shape[1]])
            images = np.stack([cv2.resize(im, size, interpolation=cv2.INTER_AREA) for im in images])
        height, width = data.frame_size[row.row]
        xy = (batch["positions"][i].numpy() + 1) / 2 * np.array([width, height], np.float32)
        return row, stored.data["frames"], images, to_display(xy, scale), batch["mask"][i].numpy()

    _, query_t, query_images, query_xy, query_mask = clip(q)
    relu = torch.relu(tokens)
    colours = _categorical(min(points, 20))
    blocks, summary = [], ", ".join(f"{name[c]} {distance[c]:.2f}" for c in nearest)
    for rank, c in enumerate((predicted, other)):
        s = int(np.flatnonzero(labels[:n].numpy() == c)[0])
        size = (query_images.shape[2], query_images.shape[1])
        support_row, support_t, support_images, support_xy, support_mask = clip(s, size)
        pairs = []
        for i in range(len(query_images)):
            j = int(dist[c, i].argmin())
            a = np.flatnonzero(query_mask[i])
            a = a[np.unique(np.linspace(0, len(a) - 1, min(points, len(a))).astype(int))]
            b = np.flatnonzero(support_mask[j])
            pair = np.full((query_images.shape[1], 2 * query_images.shape[2] + GAP, 3), 255,
                           np.uint8)  # fmt: skip
            w = query_images.shape[2]
            pair[:, :w], pair[:, w + GAP :] = query_images[i], support_images[j]
            if len(a) and len(b):
                x = torch.nn.functional.normalize(relu[q, i, a], dim=-1, eps=1e-6)
                y = torch.nn.functional.normalize(relu[s, j, b], dim=-1, eps=1e-6)
                match = b[(x @ y.T).argmax(dim=1).numpy()]
                start, end = query_xy[i, a], support_xy[j, match] + [w + GAP, 0]
                _draw_matches(pair, start, end, colours[np.arange(len(a)) % len(colours)])
            _text(pair, [f"t={query_t[i]} -> t={support_t[j]}  d={float(dist[c, i, j]):.3f}"],
                  size=max(8, side // 17))  # fmt: skip
            pairs.append(pair)
        role = "predicted" if rank == 0 else ("true class" if c == true else "runner-up")
        header = [
            f"{role}: {name[c]} (distance {distance[c]:.2f}); left: query {query_video}, right: "
            f"support {support_row.video_id}",
            f"each query frame beside its nearest support frame (d = 1 - cosine); lines: "
            f"{min(points, len(a))} query points to their most similar support point",
        ]
        blocks.append(sheet(pairs, 2, header))
    title = np.full((HEADER, blocks[0].shape[1], 3), 255, np.uint8)
    _text(title, [f"episode {episode} of {split}, query {query}: {query_video}, true class "
                  f"{name[true]}, predicted {name[predicted]}",
                  f"distance to each class: {summary}"], xy=(4, 2), size=12, box=False)  # fmt: skip
    gap = np.full((GAP * 4, blocks[0].shape[1], 3), 255, np.uint8)
    picture = np.concatenate([title, blocks[0], gap, blocks[1]])
    out.parent.mkdir(parents=True, exist_ok=True)
    from PIL import Image

    Image.fromarray(picture).save(out, optimize=True)
    return EpisodeMatch(out, query_video, name[true], name[predicted],
                        {name[c]: float(distance[c]) for c in range(spec.way)})  # fmt: skip


def _draw_matches(image: np.ndarray, start: np.ndarray, end: np.ndarray, colours) -> None:
    import cv2

    scale = 16
    for p, q, colour in zip(start, end, colours, strict=True):
        a = tuple(int(v) for v in np.round(p * scale))
        b = tuple(int(v) for v in np.round(q * scale))
        cv2.line(image, a, b, colour.tolist(), 1, cv2.LINE_AA, 4)
        for centre in (a, b):
            cv2.circle(image, centre, 3 * scale, colour.tolist(), -1, cv2.LINE_AA, 4)
            cv2.circle(image, centre, 3 * scale, (0, 0, 0), 1, cv2.LINE_AA, 4)


# ---------------------------------------------------------------------------------------------
# Semantic queries


@dataclass(frozen=True)
class QueriesPicture:
    """What `render_queries` drew: the file, the clusters and points, the frames shown."""

    path: Path
    clusters: int
    points: int
    frames: list[int]


def render_queries(
    video: str | Path,
    out: str | Path,
    config=None,
    weights: str | Path | None = None,
    device: str = "auto",
    fps: float | None = 10.0,
    max_side: int | None = 512,
    side: int = 256,
    columns: int = 4,
) -> QueriesPicture:
    """A PNG of the semantic query points of `video` (`tats-extract tracks --queries
    semantic` with `config`, a SemanticConfig; `weights` of its backbone): one tile per query
    frame, each patch tinted with its cluster's colour, and the query points of the clusters
    whose peak frame it is marked (filled, black edge, in their cluster's colour).

    The clip is decoded as the tracks stage decodes it (time base `fps`, native for .webm;
    longer side at most `max_side`), and tiles are drawn with their longer side `side` px.
    """
    import cv2

    from tats.pipeline import semantic as S
    from tats.video import decode_size, probe, read_frames, timeline

    config = config or S.SemanticConfig()
    out = check_picture_path(out, (".png",))
    info = probe(video)
    size = decode_size(info.width, info.height, max_side)
    frames = read_frames(video, timeline(info, fps, (".webm",)), size=size)
    t, h, w = frames.shape[:3]
    from tats.runtime import pick_device

    backbone = S.clustering_backbone(config.backbone, weights, pick_device(device))
    chosen = S.clustering_frames(t, config.frames)
    features = backbone.encode([frames[chosen]]).cpu()
    queries, clusters, labels = S.select_queries(features, chosen, h, w, config)
    count = int(labels.max()) + 1 if len(clusters) else 0
    colours = _cluster_colours(count)
    width, height = display_size(w, h, side)
    scale = np.array([width / w, height / h], np.float32)
    shown = sorted({int(q) for q in queries[:, 0]})
    tiles = []
    for frame in shown:
        image = cv2.resize(frames[frame], (width, height), interpolation=cv2.INTER_AREA)
        patches = labels[int(np.flatnonzero(chosen == frame)[0])]
        tint = cv2.resize(patches.astype(np.int32), (width, height),
                          interpolation=cv2.INTER_NEAREST)  # fmt: skip
        coloured = tint >= 0
        image[coloured] = (0.55 * image[coloured] + 0.45 * colours[tint[coloured]]).astype(np.uint8)
        mine = np.flatnonzero(queries[:, 0] == frame)
        draw_points(image, to_display(queries[mine, 1:], scale), np.ones(len(mine), bool),
                    colours[clusters[mine]], radius=max(2.5, side / 70))  # fmt: skip
        peaking = sorted({int(c) for c in clusters[mine]})
        _text(image, [f"t={frame}: clusters {', '.join(map(str, peaking))}"],
              size=max(10, side // 22))  # fmt: skip
        tiles.append(image)
    if not tiles:
        raise ValueError(f"{video}: no semantic query points (no clusters were found)")
    identity = backbone.identity
    weights_note = identity["weights_sha256"][:12] if identity["weights_sha256"] else "none"
    header = [
        f"{Path(video).name}: {count} clusters ({config.method}, {config.frames} frames, "
        f"{config.backbone} weights {weights_note}), {len(queries)} query points",
        "patches tinted by cluster; points: the queries of the clusters that peak in that frame",
    ]
    from PIL import Image

    out.parent.mkdir(parents=True, exist_ok=True)
    # A 256-colour palette: the tints are flat, and the file a third of the size.
    Image.fromarray(sheet(tiles, columns, header)).quantize(256).save(out, optimize=True)
    return QueriesPicture(out, count, len(queries), shown)


def _cluster_colours(count: int) -> np.ndarray:
    """`count` uint8 RGB colours, the ten distinct hues of tab20 first, then their light
    twins, then repeated."""
    cmap = plt.get_cmap("tab20")
    order = [*range(0, 20, 2), *range(1, 20, 2)]
    return (np.array([cmap(order[i % 20])[:3] for i in range(max(count, 1))]) * 255).astype(
        np.uint8
    )

