"""Evaluation that embeds each clip once agrees with embedding the clips of every episode."""

import numpy as np
import pytest
import torch

from tats.episodes import EpisodeData, EpisodeSpec, ReadOptions
from tats.evaluate import episode_predictions, eval_result, share_classes
from tats.model import ModelConfig, TATsModel
from tats.runtime import Runtime

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def data(synth_stores):
    return EpisodeData.open(synth_stores.tracks, synth_stores.features, synth_stores.manifest)


def small_model(data: EpisodeData, seed: int = 0) -> TATsModel:
    """A model of random weights: the two paths must agree whatever the weights."""
    torch.manual_seed(seed)
    cfg = ModelConfig(
        feature_dim=data.feature_dim, width=16, depth=2, num_heads=2,
        num_frames=data.num_frames, grid_size=data.grid[0], num_classes=6,
    )  # fmt: skip
    return TATsModel(cfg)


@pytest.mark.parametrize(
    ("way", "shot", "queries", "options"),
    [
        (4, 1, 1, ReadOptions()),
        (4, 5, 1, ReadOptions()),
        (3, 2, 3, ReadOptions(mask="visible")),
        (3, 1, 2, ReadOptions(tracks_mode="frozen")),
    ],
)
def test_embedding_once_predicts_as_episode_by_episode(data, way, shot, queries, options):
    model = small_model(data)
    model.train()  # evaluation switches drop path off, and back on after
    rt = Runtime.setup("cpu", "off", workers=0, prefetch=2)
    spec = EpisodeSpec(way, shot, queries)
    classes = data.classes("test", spec.per_class, way)
    # 7 clips per forward: batches span the classes that the clips are grouped by.
    args = (model, data, classes, spec, options, 40, 3, rt)
    once = episode_predictions(*args, embed_once=True, batch_clips=7)
    each = episode_predictions(*args, embed_once=False)
    assert model.training
    assert once.scores.shape == each.scores.shape == (40, way * queries, way)
    np.testing.assert_array_equal(once.true, each.true)  # the same episodes
    np.testing.assert_allclose(once.scores, each.scores, rtol=1e-5, atol=1e-5)
    # Batched and episode by episode are different computations: a prediction may differ only
    # where two classes score the same within that tolerance (on some CPU's rounding).
    top = np.take_along_axis(each.scores, once.scores.argmax(axis=2)[..., None], axis=2)[..., 0]
    differ = once.predicted != each.predicted
    assert (np.abs(top - each.scores.max(axis=2))[differ] <= 2e-5).all()
    assert differ.mean() < 0.01
    # Not a degenerate case: the scores tell the classes apart, predictions vary.
    assert (once.scores.std(axis=2) > 1e-3).all()
    assert len(np.unique(once.predicted)) == len(classes.names)
    a, b = eval_result(classes, spec, once), eval_result(classes, spec, each)
    assert a.classes == b.classes and a.episodes == b.episodes
    assert abs(a.accuracy - b.accuracy) <= 100 * differ.mean() + 1e-9


def test_episode_dependent_clips_are_embedded_per_episode(data):
    model = small_model(data)
    rt = Runtime.setup("cpu", "off", workers=0, prefetch=2)
    spec = EpisodeSpec(3, 1, 1)
    classes = data.classes("test", spec.per_class, 3)
    fresh = ReadOptions(fresh_subset=True)
    with pytest.raises(ValueError, match="depend on the episode"):
        episode_predictions(model, data, classes, spec, fresh, 4, 0, rt, embed_once=True)
    # The default takes the per-episode path: each episode draws its own point subsets.
    default = episode_predictions(model, data, classes, spec, fresh, 4, 0, rt)
    each = episode_predictions(model, data, classes, spec, fresh, 4, 0, rt, embed_once=False)
    np.testing.assert_array_equal(default.scores, each.scores)
    stored = episode_predictions(model, data, classes, spec, ReadOptions(), 4, 0, rt)
    assert not np.allclose(default.scores, stored.scores)


def test_classes_are_shared_out_whole_and_evenly():
    sizes = {0: 10, 1: 9, 2: 6, 3: 5, 4: 4, 5: 1}
    shares = [share_classes(sizes, rank, 3) for rank in range(3)]
    assert sorted(c for share in shares for c in share) == list(sizes)
    loads = [sum(sizes[c] for c in share) for share in shares]
    assert all(loads) and max(loads) - min(loads) <= max(sizes.values()), loads
    assert share_classes(sizes, 0, 1) == list(sizes)
    assert share_classes({0: 3}, 1, 2) == []  # more ranks than classes: some embed nothing
