"""`tats-extract features` end to end: DINOv2 equals timm, views, resume, bad videos."""

import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from stage_helpers import (
    EXTRACT,
    arrays,
    assert_same,
    break_two_videos,
    finish,
    kill_repeatedly,
    records,
    start,
)
from test_backbones import official_forward, official_state_dict, original_preprocess, random_vit

from tats.manifest import read_manifest, write_manifest
from tats.pipeline.augment import AugmentConfig, augment_clip, view_seed
from tats.pipeline.features import FeaturesConfig, extract_features
from tats.pipeline.status import store_status, verify_store
from tats.pipeline.weights import file_sha256
from tats.stores import RowStore
from tats.synth import SynthConfig, generate
from tats.video import probe, read_frames, stored_frames, timeline

PIXELS = ["--backbone", "pixels", "--views", "2", "--shard-size", "3", "--no-progress"]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("features_stage") / "synth"
    return generate(SynthConfig(classes=6, videos_per_class=3), out, progress=False)


@pytest.fixture(scope="module")
def reference(dataset, tmp_path_factory) -> dict[str, np.ndarray]:
    out = tmp_path_factory.mktemp("reference") / "features.zarr"
    config = FeaturesConfig(backbone="pixels", views=2, shard_size=3)
    summary = extract_features(read_manifest(dataset), out, config, workers=0, progress=False)
    assert not summary.failures and summary.videos_done == 18
    return arrays(out)


def _stored_clip(row) -> np.ndarray:
    """The S frames of a video that training uses, decoded directly."""
    native = timeline(probe(row.path))
    return read_frames(row.path, native[stored_frames(len(native), 8)])


def _two_videos(dataset: Path, tmp_path: Path) -> Path:
    manifest = tmp_path / "two.csv"
    rows = read_manifest(dataset).rows
    write_manifest([rows[0], rows[9]], manifest)
    return manifest


def test_dinov2_through_the_command_equals_a_direct_timm_forward(dataset, tmp_path):
    model = random_vit("vit_small_patch14_dinov2", 224)
    weights = tmp_path / "vits14.pth"
    torch.save(model.state_dict(), weights)
    manifest = _two_videos(dataset, tmp_path)
    out = tmp_path / "features.zarr"
    options = ["--backbone", "dinov2_vits14", "--backbone-weights", str(weights), "--views", "2"]
    code, _, stderr = finish(start("features", manifest, out, *options, "--no-progress"))
    assert code == 0, stderr
    store = RowStore.open(out)
    assert store.provenance["backbone"]["weights_sha256"] == file_sha256(weights)
    rows = read_manifest(manifest).rows
    assert [row.split for row in rows] == ["train", "val"]
    for row in rows:
        data = store.read_row(row.row)
        clip = _stored_clip(row)
        assert data["features"].shape == (2, 8, 16, 16, 384)
        train = row.split == "train"  # only training reads augmented views: else view 0 alone
        seeds = [-1, view_seed(row.video_id, 1) if train else -1]
        assert data["view_seed"].tolist() == seeds
        assert data["features"][1].any() == train
        for view in range(2 if train else 1):
            frames = augment_clip(clip, int(data["view_seed"][view]), AugmentConfig())
            with torch.no_grad():
                expected = model.forward_features(original_preprocess(frames))[:, 1:]
            got = torch.from_numpy(data["features"][view].astype(np.float32))
            torch.testing.assert_close(got, expected.reshape(8, 16, 16, 384), rtol=0, atol=2e-2)


def test_official_dinov2_weights_load_through_the_command(dataset, tmp_path):
    model = random_vit("vit_small_patch14_dinov2", 518)
    state = official_state_dict(model)
    weights = tmp_path / "dinov2_vits14_pretrain.pth"
    torch.save(state, weights)
    manifest = _two_videos(dataset, tmp_path)
    out = tmp_path / "features.zarr"
    options = ["--backbone", "dinov2_vits14", "--backbone-weights", str(weights), "--no-progress"]
    code, _, stderr = finish(start("features", manifest, out, *options))
    assert code == 0, stderr
    row = read_manifest(manifest).rows[1]
    with torch.no_grad():
        expected = official_forward(model, state, original_preprocess(_stored_clip(row)))
    got = torch.from_numpy(RowStore.open(out).read_row(1)["features"][0].astype(np.float32))
    torch.testing.assert_close(got, expected, rtol=0, atol=2e-2)


def test_features_agree_with_the_tracks_stage_frames(dataset, reference):
    from tats.pipeline.tracks import TracksConfig

    for row in read_manifest(dataset).rows[:3]:
        T = len(timeline(probe(row.path)))
        assert reference["num_frames"][row.row] == T
        frames = stored_frames(T, TracksConfig().frames)
        np.testing.assert_array_equal(reference["frames"][row.row], frames)


def test_killed_runs_resume_to_the_uninterrupted_result(dataset, reference, tmp_path):
    options = [*PIXELS, "--workers", "1"]
    out = tmp_path / "features.zarr"
    kills = kill_repeatedly("features", dataset, out, options, seed=19)
    assert kills == 5, "a run finished before the point it was to be killed at"
    before = records(out)
    code, _, stderr = finish(start("features", dataset, out, *options))
    assert code == 0, stderr
    after = records(out)
    assert all(after[name] == text for name, text in before.items()), "a unit was redone"
    assert_same(arrays(out), reference)
    assert verify_store(out, progress=False) == []
    assert store_status(out).complete


def test_corrupt_and_missing_videos_fail_alone(dataset, reference, tmp_path):
    manifest = break_two_videos(dataset, tmp_path, corrupt_row=2, missing_row=13)
    out = tmp_path / "features.zarr"
    code, _, stderr = finish(start("features", manifest, out, *PIXELS, "--workers", "1"))
    assert code == 1, stderr
    status = subprocess.run([EXTRACT, "status", str(out)], capture_output=True, text=True)
    assert "16 done, 2 failed, 0 pending" in status.stdout
    assert "failed row 2" in status.stdout and "failed row 13" in status.stdout
    assert verify_store(out, progress=False) == []
    good = [r for r in range(18) if r not in (2, 13)]
    assert_same(arrays(out), reference, rows=good)


def test_a_store_made_before_max_side_existed_resumes_with_it_off(dataset, tmp_path):
    import zarr

    manifest, out = _two_videos(dataset, tmp_path), tmp_path / "features.zarr"
    code, _, stderr = finish(start("features", manifest, out, *PIXELS, "--max-side", "0"))
    assert code == 0, stderr
    group = zarr.open_group(str(out), mode="r+")
    provenance = group.attrs.asdict()["provenance"]
    del provenance["config"]["max_side"]  # as a store made by tats before the setting
    group.attrs["provenance"] = provenance
    code, _, stderr = finish(start("features", manifest, out, *PIXELS))
    assert code == 2 and "max_side: not recorded" in stderr and "--max-side 0" in stderr
    code, _, stderr = finish(start("features", manifest, out, *PIXELS, "--max-side", "0"))
    assert code == 0, stderr
