"""CoTracker2 through the `official` adapter: stage one reproduces the original TATs extraction
(pulkitkumar95/tats, `point_tracking/extract_points.py`) run with CoTracker2 as the official
torch hub builds it (facebookresearch/co-tracker, `hubconf.py` `cotracker2`:
`CoTrackerPredictor(window_len=8, v2=True)`), under the same random weights.

Needs the official `cotracker` package (an optional install from git; it is not on PyPI);
skipped without it:

    PYTHONPATH=/path/to/co-tracker-checkout .venv/bin/pytest tests/test_cotracker2_parity.py -rs
"""

import numpy as np
import pytest
import torch
from test_cotracker2 import cotracker2_shapes

from tats.manifest import read_manifest, write_manifest
from tats.pipeline.trackers.cotracker3 import CheckpointError, build_model, check_state_dict
from tats.pipeline.tracks import ClipLoader, TracksConfig, extract_tracks, tracks_row
from tats.stores import RowStore
from tats.synth import SynthConfig, generate

cotracker = pytest.importorskip(
    "cotracker",
    reason="the official CoTracker package `cotracker` is not importable (pip install "
    "git+https://github.com/facebookresearch/co-tracker, or a checkout on PYTHONPATH): "
    "CoTracker2 through the official adapter was not checked",
)
from cotracker.models.core.cotracker.cotracker import CoTracker2  # noqa: E402
from cotracker.predictor import CoTrackerPredictor  # noqa: E402

GRID = 4


@pytest.fixture(autouse=True)
def empty_hub_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> tuple[dict, str]:
    """Random CoTracker2 weights; the visibility head biased to 2.2 (sigmoid 0.900, the
    predictor's threshold) so that visibility goes both ways."""
    torch.manual_seed(7)
    state = CoTracker2(stride=4, window_len=8).state_dict()
    state["vis_predictor.0.bias"] = torch.full((1,), 2.2)
    path = tmp_path_factory.mktemp("cotracker2") / "cotracker2.pth"
    torch.save(state, path)
    return state, str(path)


def test_the_official_cotracker2_layout_is_the_one_tats_names():
    for window, name in ((8, "cotracker2"), (16, "cotracker2v1")):
        official = CoTracker2(stride=4, window_len=window).state_dict()
        assert {k: tuple(v.shape) for k, v in official.items()} == cotracker2_shapes(window)
        with pytest.raises(CheckpointError, match=rf"a CoTracker2 checkpoint \({name}\)"):
            check_state_dict(build_model("offline"), official, f"{name}.pth")


def original_extraction(frames: np.ndarray, query_frames, state: dict):
    """`extract_points.py`'s loop with the hub's CoTracker2: one grid-mode call per query
    frame, visibility cleared before it; (T, N, 2) tracks, (T, N) visibility, (N,) frames."""
    predictor = CoTrackerPredictor(checkpoint=None, window_len=8, v2=True)
    predictor.model.load_state_dict(state)
    video = torch.from_numpy(frames).permute(0, 3, 1, 2)[None].float()
    tracks, visible, queried = [], [], []
    for q in query_frames:
        t, v = predictor(video, grid_size=GRID, grid_query_frame=int(q))
        v[:, :q] = False
        tracks.append(t[0].numpy())
        visible.append(v[0].numpy())
        queried.append(np.full(t.shape[2], q, np.int32))
    return np.concatenate(tracks, 1), np.concatenate(visible, 1), np.concatenate(queried)


def test_stage_one_with_cotracker2_reproduces_the_original_tats_extraction(weights, tmp_path):
    """At the model resolution of the checkpoints (384x512), where stage one's grid is the
    official grid mode's; one short clip, two query frames (the CPU time of a few seconds)."""
    state, path = weights
    synth = SynthConfig(classes=3, videos_per_class=1, frames=8, width=64, height=48)
    rows = read_manifest(generate(synth, tmp_path / "synth", progress=False)).rows
    write_manifest(list(rows)[:1], tmp_path / "one.csv")
    manifest = read_manifest(tmp_path / "one.csv")
    config = TracksConfig(tracker="official", grid=GRID, queries="uniform:3", min_distance=4,
                          subset=16, shard_size=3)  # fmt: skip
    options = {"model": "cotracker2", "passes": "per_query_frame", "support_grid": False}
    summary = extract_tracks(manifest, tmp_path / "tracks.zarr", config, checkpoint=path,
                             tracker_options=options, workers=0, progress=False)  # fmt: skip
    assert not summary.failures and summary.videos_done == 1
    store = RowStore.open(tmp_path / "tracks.zarr")
    assert store.provenance["tracker"]["mode"].endswith("model=cotracker2")
    loader = ClipLoader(config.fps, config.native_suffixes, config.max_side)
    visible_share = []
    for row in manifest.rows:
        clip = loader(row)
        t = len(clip.frames)
        tracks, visible, queried = original_extraction(clip.frames, [0, (t - 1) // 2], state)
        expected = tracks_row(clip.to_source(tracks), visible, queried,
                              (t, *clip.source_size), config, row.video_id)  # fmt: skip
        stored = store.read_row(row.row)
        for name, value in expected.items():
            if name == "positions":
                np.testing.assert_allclose(stored[name], value, atol=1e-4, err_msg=name)
            else:
                np.testing.assert_array_equal(stored[name], value, err_msg=name)
        visible_share.append(stored["visible"][1:, stored["valid"]].mean())
    assert 0 < np.mean(visible_share) < 1, "visibility should go both ways"
