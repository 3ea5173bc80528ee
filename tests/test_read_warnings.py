"""Training warns, naming the remedy, where what it reads cannot be what the user meant: most
of the points padding, or augmented views of `pixels` features most of the time (the demo's
data with the default --views 5 kept the model at chance)."""

import warnings

import pytest

from tats.episodes import EpisodeData, EpisodeSpec, EpisodeWarning, ReadOptions
from tats.manifest import read_manifest
from tats.pipeline.backbones import Preprocess
from tats.pipeline.features import FeaturesConfig, extract_features
from tats.pipeline.tracks import TracksConfig, extract_tracks
from tats.train import train
from tats.train_config import config_from_dict

pytestmark = pytest.mark.usefixtures("one_torch_thread")
TINY = dict(
    way=3, shot=1, train_queries=1, episodes=1, epochs=1, val_episodes=0, test_episodes=0,
    width=16, heads=2, warmup_epochs=0, lr_steps=[], workers=0,
)  # fmt: skip


def test_training_on_mostly_padding_warns_and_names_the_subset_that_fits(
    synth_dataset, synth_stores, tmp_path
):
    # 4 x 4 grids: clips keep 16 points and some more; a 128-point subset is mostly padding.
    tracks = tmp_path / "tracks.zarr"
    config = TracksConfig(tracker="lk", grid=4, subset=128, shard_size=16)
    extract_tracks(read_manifest(synth_dataset), tracks, config, workers=0, progress=False)
    data = EpisodeData.open(tracks, synth_stores.features, synth_stores.manifest)
    classes = data.classes("train", 2, 3)
    share = data.padding_share(classes, ReadOptions())
    assert share > 0.5
    # The share counts the points a read pads: what the reader returns unmasked and at zero.
    batch = data.dataset("train", EpisodeSpec(3, 1, 1), ReadOptions(), seed=0)[(0, 0)]
    padding = ~(batch["mask"].any(dim=1) | batch["visible"].any(dim=1))
    assert abs(padding.float().mean().item() - share) < 0.25
    options = dict(tracks=str(tracks), features=str(synth_stores.features),
                   manifest=str(synth_stores.manifest), **TINY)  # fmt: skip
    with pytest.warns(EpisodeWarning, match=r"are padding.*--subset (8|16|32)\b") as caught:
        train(config_from_dict({**options, "out": str(tmp_path / "run")}))
    [message] = [str(w.message) for w in caught if "padding" in str(w.message)]
    assert f"{share:.0%} of the 128 points" in message and "tracks.zarr" in message
    # The frozen baseline reads one grid per clip: 16 of 128 points, the rest padding.
    frozen = data.padding_share(classes, ReadOptions(tracks_mode="frozen"))
    assert frozen == pytest.approx(1 - 16 / 128)


def test_training_on_a_subset_the_clips_fill_does_not_warn(synth_stores, tmp_path):
    data = EpisodeData.open(synth_stores.tracks, synth_stores.features, synth_stores.manifest)
    assert data.padding_share(data.classes("train", 2, 3), ReadOptions()) < 0.5
    options = dict(tracks=str(synth_stores.tracks), features=str(synth_stores.features),
                   manifest=str(synth_stores.manifest), out=str(tmp_path / "run"),
                   **TINY)  # fmt: skip
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train(config_from_dict(options))
    assert not [w for w in caught if "padding" in str(w.message) or "augment" in str(w.message)]


def test_training_on_mostly_augmented_pixels_features_warns(synth_dataset, synth_stores, tmp_path):
    features = tmp_path / "features.zarr"
    config = FeaturesConfig(backbone="pixels", views=3, preprocess=Preprocess(size=112),
                            shard_size=16)  # fmt: skip
    extract_features(read_manifest(synth_dataset), features, config, workers=0, progress=False)
    options = dict(tracks=str(synth_stores.tracks), features=str(features),
                   manifest=str(synth_stores.manifest), **TINY)  # fmt: skip
    with pytest.warns(EpisodeWarning, match=r"augmented view for 2 of every 3 .*--views 2"):
        train(config_from_dict({**options, "out": str(tmp_path / "run")}))
    with warnings.catch_warnings(record=True) as caught:  # view 0 only: nothing augmented
        warnings.simplefilter("always")
        train(config_from_dict({**options, "out": str(tmp_path / "plain"), "augment": False}))
    assert not [w for w in caught if "augment" in str(w.message)]
