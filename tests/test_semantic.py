"""Semantic queries (Trokens): clustering, peak frames, points in masks, and the tracks stage
with `--queries semantic` end to end (real videos, the weight-free `pixels` backbone, LK)."""

import subprocess
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from safetensors.torch import save_file
from stage_helpers import EXTRACT, arrays

from tats.manifest import read_manifest
from tats.pipeline import queries as Q
from tats.pipeline import semantic as S
from tats.pipeline.backbones import create_backbone
from tats.pipeline.status import verify_store
from tats.pipeline.trackers import create_tracker
from tats.pipeline.tracks import TracksConfig, open_tracks_store
from tats.stores import RowStore
from tats.synth import SynthConfig, generate

RED, BLUE = (220, 30, 30), (30, 40, 200)


def patch_colours(frames: np.ndarray, patch: int = 14) -> torch.Tensor:
    """The simplest patch features of frames [F, H, W, 3]: each patch's mean colour, centred
    (so that different colours have low cosine similarity, as different objects do)."""
    f, h, w = frames.shape[:3]
    grid = frames.reshape(f, h // patch, patch, w // patch, patch, 3).mean(axis=(2, 4))
    return torch.from_numpy(grid).float() - 128


def two_colour_frames(red_columns: list[int], size: int = 224, patch: int = 14) -> np.ndarray:
    """Frames [F, size, size, 3]: the first `red_columns[i]` patch columns of frame i red, the
    rest blue."""
    frames = np.empty((len(red_columns), size, size, 3), np.uint8)
    for frame, columns in zip(frames, red_columns, strict=True):
        frame[:] = BLUE
        frame[:, : columns * patch] = RED
    return frames


def test_bipartite_merging_of_two_flat_colour_regions_gives_two_clusters():
    frames = two_colour_frames([5])  # one frame: 5 of 16 patch columns red
    labels = S.cluster_patches(patch_colours(frames), S.SemanticConfig())
    assert sorted(np.unique(labels).tolist()) == [0, 1]
    assert (labels[0, :, :5] == 1).all() and (labels[0, :, 5:] == 0).all()  # 0 = the largest
    # the merging itself: 11 iterations take 256 tokens to 12 centroids, each of one colour
    tokens = patch_colours(frames).reshape(1, 256, 3)
    centroids = S.bipartite_merge(tokens, 11)[0]
    assert centroids.shape == (12, 3)
    colours = torch.tensor([RED, BLUE], dtype=torch.float32) - 128
    assert torch.cdist(centroids, colours).min(dim=1).values.max() < 1e-3


def test_temporal_merge_adds_only_centroids_unlike_those_kept():
    frames = two_colour_frames([5, 9, 16])  # a later frame adds nothing new: still two clusters
    labels = S.cluster_patches(patch_colours(frames), S.SemanticConfig())
    assert sorted(np.unique(labels).tolist()) == [0, 1]
    green = two_colour_frames([5, 5])
    green[1, :, 210:] = (20, 200, 40)  # a colour frame 0 lacks: a third cluster
    labels = S.cluster_patches(patch_colours(green), S.SemanticConfig())
    assert len(np.unique(labels)) == 3
    assert len(np.unique(S.cluster_patches(patch_colours(green), S.SemanticConfig(threshold=-1))))\
        == 2  # fmt: skip
    capped = S.cluster_patches(patch_colours(green), S.SemanticConfig(max_clusters=2))
    assert sorted(np.unique(capped).tolist()) == [-1, 0, 1]  # the smallest (green) dropped
    assert (capped[1, :, 15] == -1).all()


def test_the_query_frame_of_each_cluster_is_its_peak_frame():
    # Red covers most patches in clustering frame 4, blue in frame 1; the release took the
    # frame of the list position instead (blue at frame_ids[0], red at frame_ids[1]).
    frames = two_colour_frames([6, 2, 5, 7, 14, 9])
    frame_ids = np.array([0, 7, 14, 21, 28, 35])
    queries, clusters, labels = S.select_queries(patch_colours(frames), frame_ids, 224, 224,
                                                 S.SemanticConfig())  # fmt: skip
    red = labels[4, 0, 0]
    assert {int(c): int(t) for c, t in zip(clusters, queries[:, 0], strict=True)} == {
        int(red): 28, int(1 - red): 7
    }
    assert S.peak_frames(labels).tolist() == ([4, 1] if red == 0 else [1, 4])
    # 16 points per cluster, each inside its cluster's mask at its peak frame: red covers 14
    # patch columns at frame 28, blue all but 2 at frame 7
    assert np.bincount(clusters).tolist() == [16, 16]
    x, y = queries[:, 1].astype(int), queries[:, 2].astype(int)
    assert (x[clusters == red] < 14 * 14).all() and (x[clusters != red] >= 2 * 14).all()
    assert (np.diff(clusters) >= 0).all()  # grouped by cluster id
    assert len({(a, b) for a, b in zip(x, y, strict=True)}) == 32


def test_mask_points_spread_over_the_mask_and_are_seeded():
    mask = np.zeros((60, 80), bool)
    mask[10:50, 5:25] = True  # two blocks: k-means puts centres in both
    mask[30:40, 50:78] = True
    points = S.mask_points(mask, 16)
    assert points.shape == (16, 2)
    assert mask[points[:, 1].astype(int), points[:, 0].astype(int)].all()
    assert (points[:, 0] > 45).sum() >= 3 and (points[:, 0] < 30).sum() >= 8
    np.testing.assert_array_equal(points, S.mask_points(mask, 16))  # seed 42
    assert not np.array_equal(points, S.mask_points(mask, 16, seed=1))
    small = np.zeros((10, 10), bool)
    small[2, 3] = small[5, 7] = True
    assert S.mask_points(small, 16).tolist() == [[3, 2], [7, 5]]  # fewer pixels: all of them


def test_kmeans_clustering_alternative():
    frames = two_colour_frames([5, 9])
    config = S.SemanticConfig(method="kmeans", kmeans_clusters=4)
    labels = S.cluster_patches(patch_colours(frames), config)
    assert labels.max() < 4 and (labels >= 0).all()
    # k-means on two colours: no cluster holds both
    colour = (patch_colours(frames)[..., 0] > 0).numpy()
    for c in np.unique(labels):
        assert len(np.unique(colour[labels == c])) == 1
    np.testing.assert_array_equal(labels, S.cluster_patches(patch_colours(frames), config))


def test_clustering_frames_spread_over_the_clip():
    assert S.clustering_frames(100, 32).tolist() == np.linspace(0, 99, 32).astype(int).tolist()
    assert S.clustering_frames(20, 32).tolist() == list(range(20))


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    out = tmp_path_factory.mktemp("semantic")
    return generate(SynthConfig(classes=3, videos_per_class=2), out / "synth", progress=False)


def extract(manifest, out, *options):
    return subprocess.run(
        [EXTRACT, "tracks", "--manifest", str(manifest), "--out", str(out), "--tracker", "lk",
         "--workers", "0", "--no-progress", *options],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip


def test_semantic_extraction_writes_a_sound_store_with_cluster_ids(dataset, tmp_path):
    out = tmp_path / "tracks.zarr"
    options = ["--queries", "semantic", "--cluster-backbone", "pixels", "--subset", "64"]
    run = extract(dataset, out, *options, "--points-per-cluster", "8", "--max-clusters", "10")
    assert run.returncode == 0, run.stderr
    assert verify_store(out, progress=False) == []
    stored = arrays(out)
    store = RowStore.open(out)
    assert store.fields["cluster"].shape == (80,)  # 10 clusters x 8 points
    provenance = store.provenance
    assert provenance["config"]["queries"] == "semantic"
    assert provenance["config"]["semantic"]["points_per_cluster"] == 8
    assert provenance["clustering_backbone"]["name"] == "pixels"
    assert provenance["clustering_backbone"]["preprocess"]["mean"] == list(S.IMAGENET_MEAN)
    before_query = 0
    for row in range(store.num_rows):
        n = int(stored["valid"][row].sum())
        cluster = stored["cluster"][row]
        assert n == 80 and (cluster[:n] >= 0).all()  # 10 clusters found in each clip
        assert (np.bincount(cluster[:n]) == 8).all()
        subset = stored["subset"][row]
        assert (subset >= 0).all() and (subset < n).all()  # 64 points of the 80: no padding
        np.testing.assert_array_equal(Q.canonical_order(subset), subset)  # drawn, ascending
        assert provenance["clustering_backbone"]["precision"] == "fp32"
        assert set(cluster[subset].tolist()) == set(range(10))  # every cluster sampled
        frames = stored["frames"][row]
        query = stored["query_frame"][row][:n]
        clustered = S.clustering_frames(int(stored["num_frames"][row]), 32)
        assert set(query.tolist()) <= set(clustered.tolist())
        # visibility is not hidden before the query frame: points were tracked backwards
        before_query += (stored["visible"][row][:, :n] & (frames[:, None] < query)).sum()
    assert before_query > 0
    again = extract(dataset, out, *options, "--points-per-cluster", "4")  # another config
    assert again.returncode == 2 and "points_per_cluster: store has 8" in again.stderr


def test_semantic_options_need_semantic_queries(dataset, tmp_path):
    run = extract(dataset, tmp_path / "t.zarr", "--cluster-method", "kmeans", "--max-clusters",
                  "4")  # fmt: skip
    assert run.returncode == 2
    assert run.stderr.strip().splitlines()[-1].endswith(
        "--cluster-method, --max-clusters: only with --queries semantic"
    )
    run = extract(dataset, tmp_path / "t.zarr", "--queries", "semantic", "--cluster-method", "x")
    assert run.returncode == 2 and "clustering method 'x'" in run.stderr
    assert not (tmp_path / "t.zarr").exists()


def test_tats_viz_queries_draws_the_clusters_and_points_of_a_real_clip(real_clip, tmp_path):
    from PIL import Image

    from tats.viz import HEADER, display_size

    out = tmp_path / "queries.png"
    run = subprocess.run(
        [str(Path(EXTRACT).parent / "tats"), "viz", "queries", "--video", str(real_clip),
         "--out", str(out), "--cluster-backbone", "pixels", "--size", "128", "--max-clusters", "5"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert run.stdout.startswith("5 clusters, 80 query points at frames ")
    shown = run.stdout.split(" at frames ")[1].splitlines()[0].split(", ")
    tile_w, tile_h = display_size(176, 144, 128)  # the clip's 176 x 144 at 128 px
    width, height = Image.open(out).size  # a tile per query frame, 4 to a row, 2 px apart
    assert width == min(4, len(shown)) * (tile_w + 2) - 2
    assert height == HEADER + -(-len(shown) // 4) * (tile_h + 2) - 2
    bad = subprocess.run(
        [str(Path(EXTRACT).parent / "tats"), "viz", "queries", "--video", str(tmp_path / "no.mp4"),
         "--out", str(out), "--cluster-backbone", "pixels"], capture_output=True, text=True,
    )  # fmt: skip
    assert bad.returncode == 2 and "no.mp4" in bad.stderr


def test_the_clustering_backbone_runs_in_fp32_on_cuda_too(tmp_path, monkeypatch):
    # The release clusters fp32 DINOv2 features (`point_tracking/feat_extractor.py`); the
    # features stage's bf16 autocast on CUDA could flip the 0.2-threshold merges.
    torch.manual_seed(0)
    vit = timm.create_model("vit_small_patch14_dinov2", pretrained=False, img_size=224,
                            num_classes=0, depth=1)  # fmt: skip
    weights = tmp_path / "vits14_depth1.safetensors"
    save_file(vit.state_dict(), str(weights))
    clustering = S.clustering_backbone("dinov2_vits14", str(weights), depth=1)
    features = create_backbone("dinov2_vits14", weights, preprocess=S.PREPROCESS, depth=1)
    assert clustering.preprocess == S.PREPROCESS
    images = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    on_cpu = clustering.forward(images)
    # What each would do on CUDA (the model stays here, so the forward can run on this CPU).
    autocasts = []
    real_autocast = torch.autocast
    monkeypatch.setattr(torch, "autocast",
                        lambda *a, **k: autocasts.append(k.get("dtype")) or real_autocast(*a, **k))
    from tats import runtime

    monkeypatch.setattr(runtime, "bf16_units", lambda device: torch.device(device).type == "cuda")
    for backbone in (clustering, features):
        backbone.device = torch.device("cuda")
    assert features.precision == "bf16" and clustering.precision == "fp32"
    assert clustering.identity["precision"] == "fp32"
    torch.testing.assert_close(clustering.forward(images), on_cpu, rtol=0, atol=0)
    assert autocasts == []  # no autocast around the clustering features
    with pytest.warns(UserWarning):  # CUDA autocast on a CPU tensor: disabled, with a warning
        features.forward(images)
    assert autocasts == [torch.bfloat16]  # the features stage's backbone would enter it
    # The tracks store records the clustering precision.
    config = TracksConfig(tracker="lk", queries="semantic")
    manifest = read_manifest(generate(SynthConfig(classes=3, videos_per_class=1, frames=8),
                                      tmp_path / "synth", progress=False))  # fmt: skip
    store = open_tracks_store(tmp_path / "tracks.zarr", manifest, config, create_tracker("lk"),
                              clustering)  # fmt: skip
    assert store.provenance["clustering_backbone"]["precision"] == "fp32"
