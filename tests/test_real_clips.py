"""Clips as phones and screen recorders write them, through both stages: a display rotation
(stored sideways, shown upright) and frames that are not evenly spaced in time. The clips are
made here with PyAV (see test_video.py); the stores are real."""

from pathlib import Path

import numpy as np
import pytest
import torch
from stage_helpers import arrays, assert_same
from test_video import upright_frames, write_frames

from tats.manifest import VideoRow, read_manifest, write_manifest
from tats.pipeline.backbones import create_backbone
from tats.pipeline.features import FeaturesConfig, extract_features
from tats.pipeline.ledger import Ledger
from tats.pipeline.tracks import TracksConfig, extract_tracks
from tats.video import decode_size, probe, read_frames, stored_frames

TRACKS = TracksConfig(tracker="lk", grid=8, shard_size=2)
FEATURES = FeaturesConfig(backbone="pixels", views=2, shard_size=2)


def _manifest(tmp_path: Path, name: str, paths: list[Path]) -> Path:
    rows = [VideoRow(i, f"clip{i}", path, "x", "train") for i, path in enumerate(paths)]
    write_manifest(rows, tmp_path / f"{name}.csv")
    return tmp_path / f"{name}.csv"


def _stores(manifest: Path, out: Path) -> tuple[dict, dict]:
    rows = read_manifest(manifest)
    tracks = extract_tracks(rows, out / "tracks.zarr", TRACKS, workers=0, progress=False)
    features = extract_features(rows, out / "features.zarr", FEATURES, workers=0, progress=False)
    assert not tracks.failures and not features.failures
    return arrays(out / "tracks.zarr"), arrays(out / "features.zarr")


@pytest.mark.parametrize("rotation", [90, 270])
def test_a_phone_clip_held_upright_gives_the_stores_of_its_upright_frames(tmp_path, rotation):
    shown = upright_frames(30)  # 1 s of portrait frames: 10 on the time base
    upright = _manifest(tmp_path, "upright", [write_frames(tmp_path / "upright.mp4", shown)])
    phone = write_frames(tmp_path / "phone.mp4", shown, rotation)
    expected_tracks, expected_features = _stores(upright, tmp_path / "upright")
    tracks, features = _stores(_manifest(tmp_path, "phone", [phone]), tmp_path / "phone")
    assert expected_tracks["frame_size"][0].tolist() == [160, 128]  # (height, width) shown
    assert expected_tracks["valid"][0].sum() > 20  # LK found points to track
    assert_same(tracks, expected_tracks)
    assert_same(features, expected_features)
    # The row's record says by how much its frames were turned; an upright row says nothing.
    for store in ("tracks.zarr", "features.zarr"):
        (record,) = Ledger(tmp_path / "phone" / store / "ledger").records().values()
        assert record.rotations == {0: rotation}
        (record,) = Ledger(tmp_path / "upright" / store / "ledger").records().values()
        assert record.rotations == {}


def test_variable_and_constant_rate_clips_are_read_on_the_time_base(tmp_path):
    # Constant rate: frames by index, as always. Variable rate (a still second in the middle):
    # the frame shown at each instant of the 10 fps time base.
    times = [i / 30 for i in range(30)] + [1.0, 1.5] + [2.0 + i / 15 for i in range(15)]
    cfr = write_frames(tmp_path / "cfr.mp4", upright_frames(47))
    vfr = write_frames(tmp_path / "vfr.mp4", upright_frames(47), times=times)
    tracks, features = _stores(_manifest(tmp_path, "clips", [cfr, vfr]), tmp_path / "out")
    T = round(probe(cfr).duration * 10)
    by_index = np.linspace(0, 46, T).astype(int)
    instants = np.linspace(0, times[-1], round(probe(vfr).duration * 10))
    by_time = np.searchsorted(times, instants + 1e-6, side="right") - 1
    assert not np.array_equal(by_time, np.linspace(0, 46, len(by_time)).astype(int))
    backbone = create_backbone("pixels")
    for row, (path, native) in enumerate([(cfr, by_index), (vfr, by_time)]):
        assert tracks["num_frames"][row] == features["num_frames"][row] == len(native)
        stored = stored_frames(len(native))
        np.testing.assert_array_equal(features["frames"][row], stored)
        clip = read_frames(path, native[stored])
        with torch.no_grad():
            expected = backbone(clip[None])[0].to(torch.float16).numpy()
        # alone here, batched with the other clip there: equal up to rounding (float16)
        np.testing.assert_allclose(features["features"][row, 0], expected, rtol=2e-3, atol=1e-3)


@pytest.mark.parametrize(
    ("size", "decoded"),
    [((3840, 2160), (512, 288)), ((3840, 720), (1195, 224)), ((400, 300), (400, 300))],
)
def test_the_features_stage_decodes_at_a_bounded_size(size, decoded):
    # The longer side at most max_side, the shorter one no smaller than the backbone's input
    # (its resize to 224 x 224 then only shrinks); a clip the bound does not bite as it is.
    assert decode_size(*size, FEATURES.max_side, FEATURES.preprocess.size) == decoded
