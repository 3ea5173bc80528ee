"""`tats viz`: pictures of what the tracker, the backbone and the model saw."""

from __future__ import annotations

from pathlib import Path

import typer

from tats.cli import options as opt
from tats.cli.common import Command, input_errors, renamed

app = typer.Typer(
    help="Pictures of a video's stored tracks (tracks), its patch features (features), a "
    "model's matching in one few-shot episode (episode): drawn from what the stores and the "
    "checkpoint hold, nothing is tracked or encoded again; and the semantic query points "
    "that --queries semantic would choose for a video (queries).",
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode=None,
)

VIDEO_ID = typer.Option(..., "--video-id", help="The video to draw.", show_default=False)


@app.command(cls=Command)
def tracks(
    tracks: Path = typer.Option(..., "--tracks", help="The tracks store.", show_default=False),
    manifest: Path = opt.MANIFEST,
    video_id: str = VIDEO_ID,
    out: Path = typer.Option(
        ..., "--out", "-o", help="x.png (contact sheet), x.mp4 or x.gif.", show_default=False
    ),
    all_frames: bool = typer.Option(
        False,
        "--all-frames",
        help="Every frame of the time base, each with the points of the latest stored frame "
        "(nothing is tracked again).",
        show_default="the stored frames",
    ),
    points: str = typer.Option(
        "subset",
        help="Which points: subset (the stored subset that training reads) or all (every "
        "point the redundancy filter kept).",
    ),
    max_points: int | None = typer.Option(
        None,
        help="Draw at most this many of them, evenly spread over the query frames (or "
        "clusters).",
        show_default="no limit",
    ),
    trail: int = typer.Option(3, help="Trail length in stored frames."),
    size: int = typer.Option(256, help="Longer side of each frame in px."),
    columns: int = typer.Option(4, help="Frames per row of the contact sheet."),
    video_root: Path | None = opt.VIDEO_ROOT,
) -> None:
    """Draw the stored points over the video's frames: colour = query frame (or cluster),
    filled = visible, hollow = not visible, with trails; points the filter dropped are left
    out."""
    from tats.manifest import read_manifest
    from tats.viz import check_point_choice, render_tracks

    with input_errors():
        check_point_choice(points, max_points)
        rows = read_manifest(manifest, video_root)
        path = render_tracks(tracks, rows, video_id, out, all_frames, trail, size, columns,
                             points, max_points)  # fmt: skip
    typer.echo(f"wrote {path}")


@app.command(cls=Command)
def features(
    features: Path = typer.Option(
        ..., "--features", help="The features store.", show_default=False
    ),
    manifest: Path = opt.MANIFEST,
    video_id: str = VIDEO_ID,
    out: Path = typer.Option(..., "--out", "-o", help="x.png", show_default=False),
    size: int = typer.Option(192, help="Longer side of each frame in px."),
    video_root: Path | None = opt.VIDEO_ROOT,
) -> None:
    """Draw the video's stored frames and, under each, its patch features projected to RGB by
    PCA (the first three components over the clip's patches)."""
    from tats.manifest import read_manifest
    from tats.viz import render_features

    with input_errors():
        rows = read_manifest(manifest, video_root)
        path = render_features(features, rows, video_id, out, size)
    typer.echo(f"wrote {path}")


@app.command(cls=Command)
def episode(
    checkpoint: Path = typer.Option(
        ..., "--checkpoint", help="A tats-train checkpoint (best.pt).", show_default=False
    ),
    tracks: Path = typer.Option(..., "--tracks", help="The tracks store.", show_default=False),
    features: Path = typer.Option(
        ..., "--features", help="The features store.", show_default=False
    ),
    manifest: Path = opt.MANIFEST,
    out: Path = typer.Option(..., "--out", "-o", help="x.png", show_default=False),
    episode: int = typer.Option(0, help="Which episode of the split, as evaluation draws it."),
    query: int = typer.Option(0, help="Which query of the episode."),
    split: str = typer.Option("test", help="train, val or test."),
    points: int = typer.Option(12, help="Query points whose matches are drawn per frame pair."),
    size: int = typer.Option(192, help="Longer side of each frame in px."),
    device: str = typer.Option(
        "auto", help="Where the model runs: auto (CUDA where there is one), cpu, cuda, cuda:1, ..."
    ),
) -> None:
    """Draw how the checkpoint classified one query of one episode: for the predicted class
    and the true class (the runner-up where the prediction is right), each query frame beside
    the support frame the Hausdorff matching paired it with, and lines from query points to
    their most similar support points (token cosine). The metric matches frames by their
    point-averaged embeddings; the point lines show what the matched frames share."""
    from tats.viz import render_episode

    with input_errors():
        result = render_episode(checkpoint, tracks, features, manifest, out, episode, query,
                                split, points, size, device)  # fmt: skip
    nearest = ", ".join(f"{k} {v:.3f}" for k, v in sorted(result.distances.items(),
                                                             key=lambda kv: kv[1]))  # fmt: skip
    typer.echo(
        f"query {result.query_video}: true {result.true_class}, predicted "
        f"{result.predicted_class}; distances: {nearest}"
    )
    typer.echo(f"wrote {result.path}")


@app.command(cls=renamed(**opt.RENAMED["viz queries"]))
def queries(
    video: Path = typer.Option(..., "--video", help="A video file.", show_default=False),
    out: Path = typer.Option(..., "--out", "-o", help="x.png", show_default=False),
    cluster_backbone: str = typer.Option(
        "dinov2_vitb14", help="The features clustered (pixels: weight-free)."
    ),
    cluster_weights: Path | None = opt.CLUSTER_WEIGHTS,
    cluster_method: str = typer.Option("bipartite", help="bipartite (token merging) or kmeans."),
    cluster_frames: int = typer.Option(32, help="Frames clustered, uniformly spread."),
    merge_threshold: float = typer.Option(
        0.2, help="bipartite: a later frame's centroid is a new cluster below this cosine."
    ),
    kmeans_clusters: int = typer.Option(32, help="kmeans: the number of clusters."),
    points_per_cluster: int = typer.Option(16, help="Query points per cluster."),
    max_clusters: int = typer.Option(32, help="Clusters kept, the largest."),
    fps: float = opt.FPS,
    max_side: int = typer.Option(
        512, help="Decode frames with their longer side at most this many px (0: native size)."
    ),
    size: int = typer.Option(256, help="Longer side of each frame drawn in px."),
    columns: int = typer.Option(4, help="Frames per row."),
    device: str = typer.Option(
        "auto", help="Where the backbone runs: auto (CUDA where there is one), cpu, cuda, ..."
    ),
) -> None:
    """Draw the semantic query points of `tats-extract tracks --queries semantic` on a video:
    a tile per query frame, patches tinted by cluster, and the query points of the clusters
    whose peak frame it is."""
    from tats.pipeline.semantic import SemanticConfig
    from tats.viz import render_queries

    with input_errors():
        config = SemanticConfig(
            method=cluster_method, frames=cluster_frames, threshold=merge_threshold,
            kmeans_clusters=kmeans_clusters, points_per_cluster=points_per_cluster,
            max_clusters=max_clusters, backbone=cluster_backbone,
        )  # fmt: skip
        result = render_queries(video, out, config, cluster_weights, device, fps or None,
                                max_side or None, size, columns)  # fmt: skip
    typer.echo(
        f"{result.clusters} clusters, {result.points} query points at frames "
        f"{', '.join(map(str, result.frames))}"
    )
    typer.echo(f"wrote {result.path}")
