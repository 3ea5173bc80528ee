"""Shared fixtures: real synthetic videos (rendered once per session) and their manifests."""

from dataclasses import dataclass
from pathlib import Path

import pytest

from tats.synth import SynthConfig, generate

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def synth_small(tmp_path_factory) -> Path:
    """A small `tats synth` dataset: every motion class, 2 videos each, default video size."""
    out = tmp_path_factory.mktemp("synth_small")
    return generate(SynthConfig(videos_per_class=2), out, progress=False)


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


@pytest.fixture(scope="session")
def synth_stores(synth_dataset, tmp_path_factory) -> SynthStores:
    """Stores of `synth_dataset`: LK tracks (6 x 6 grids, 48-point subsets: some clips have
    fewer points and are padded, some more) and `pixels` features (2 views, 8 x 8 x 64 grids).
    Read-only: copy a store before changing it."""
    from tats.manifest import read_manifest
    from tats.pipeline.backbones import Preprocess
    from tats.pipeline.features import FeaturesConfig, extract_features
    from tats.pipeline.tracks import TracksConfig, extract_tracks

    out = tmp_path_factory.mktemp("synth_stores")
    manifest = read_manifest(synth_dataset)
    tracks_config = TracksConfig(tracker="lk", grid=6, min_distance=4, subset=48, shard_size=16)
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
    return SynthStores(synth_dataset, out / "tracks.zarr", out / "features.zarr")
