import hashlib
from collections import Counter

import av
import cv2
import numpy as np
import pytest
import typer
from typer.testing import CliRunner

from tats.cli.synth import synth as synth_command
from tats.manifest import read_manifest
from tats.synth import (
    MOTIONS,
    GroundTruth,
    SynthConfig,
    generate,
    ground_truth_path,
    load_ground_truth,
    make_video,
    object_points,
    render_frame,
    true_tracks,
)

try:  # an extra (pip install 'tats[decord]'): the videos are checked with it where installed
    import decord
except ImportError:
    decord = None

SMALL = SynthConfig(classes=4, videos_per_class=2, frames=12, width=64, height=48, seed=3)


@pytest.fixture(scope="module")
def small_dataset(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth")
    return generate(SMALL, out, progress=False)


def _sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_registry_and_splits():
    assert len(MOTIONS) >= 24
    assert all(m.objects == 2 for name, m in MOTIONS.items() if name in ("approach", "separate"))
    assert Counter(SynthConfig().class_splits().values()) == {"train": 12, "val": 4, "test": 8}
    assert Counter(SynthConfig(classes=3).class_splits().values()) == {
        "train": 1,
        "val": 1,
        "test": 1,
    }
    assert Counter(SynthConfig(classes=12).class_splits().values()) == {
        "train": 6,
        "val": 2,
        "test": 4,
    }


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"classes": 2}, "classes"),
        ({"width": 65}, "width"),
        ({"frames": 1}, "frames"),
        ({"fps": 0}, "fps"),
        ({"seed": -1}, "seed"),
        ({"videos_per_class": 0}, "videos_per_class"),
    ],
)
def test_config_rejects_bad_values(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SynthConfig(**kwargs)


def test_manifest_videos_and_ground_truth_files(small_dataset):
    manifest = read_manifest(small_dataset, check_files=True)
    assert [r.video_id for r in manifest.rows] == [
        f"{c}_{k:03d}" for c in list(MOTIONS)[:4] for k in range(2)
    ]
    assert len(set(r.video_id for r in manifest.rows)) == 8
    by_split = {s: set(manifest.classes(s)) for s in ("train", "val", "test")}
    assert [len(by_split[s]) for s in ("train", "val", "test")] == [2, 1, 1]
    assert not (by_split["train"] & by_split["val"] or by_split["train"] & by_split["test"])
    for row in manifest.rows:
        with av.open(str(row.path)) as container:
            stream = container.streams.video[0]
            assert stream.codec_context.name == "h264"
            assert stream.average_rate == 10
            decoded = [f.to_ndarray(format="rgb24") for f in container.decode(stream)]
        assert len(decoded) == SMALL.frames
        assert decoded[0].shape == (SMALL.height, SMALL.width, 3)
        if decord is not None:
            reader = decord.VideoReader(str(row.path))
            assert len(reader) == SMALL.frames
            assert reader[0].shape == (SMALL.height, SMALL.width, 3)
        # The video is the ground truth's rendering, up to H.264 / yuv420p losses.
        gt = load_ground_truth(ground_truth_path(small_dataset.parent, row.video_id))
        assert (gt.video_id, gt.label, gt.num_frames) == (row.video_id, row.label, SMALL.frames)
        rendered = np.stack([render_frame(gt, t) for t in range(gt.num_frames)])
        assert np.abs(rendered.astype(int) - np.stack(decoded)).mean() < 4


def _frames(path) -> np.ndarray:
    with av.open(str(path)) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])


def _same_video(a, b) -> bool:
    """The same rendered video: identical ground truth, and decoded frames that differ at most
    by the encoder's rounding (x264 rarely encodes the same frames into another stream here:
    mean difference under half a level then)."""
    truth = [_sha(ground_truth_path(v.parent.parent, v.stem)) for v in (a, b)]
    if truth[0] != truth[1]:
        return False
    fa, fb = _frames(a).astype(np.int16), _frames(b).astype(np.int16)
    return fa.shape == fb.shape and float(np.abs(fa - fb).mean()) < 1.0


def test_same_seed_same_videos_and_subsets_agree(small_dataset, tmp_path):
    again = generate(SMALL, tmp_path / "again", progress=False)
    assert _sha(again) == _sha(small_dataset)
    fewer = generate(
        SynthConfig(**{**SMALL.__dict__, "classes": 3}), tmp_path / "fewer", progress=False
    )
    other_seed = generate(
        SynthConfig(**{**SMALL.__dict__, "seed": 4}), tmp_path / "seed4", progress=False
    )
    for row in read_manifest(small_dataset).rows:
        assert _same_video(again.parent / "videos" / row.path.name, row.path)
        assert not _same_video(other_seed.parent / "videos" / row.path.name, row.path)
    for row in read_manifest(fewer).rows:  # a class's videos do not depend on the other classes
        assert _same_video(small_dataset.parent / "videos" / row.path.name, row.path)


def _sample(image: np.ndarray, xy: np.ndarray) -> np.ndarray:
    """Bilinear colour of image [H, W, 3] at points [N, 2] (x, y)."""
    xy = xy.astype(np.float32)
    return cv2.remap(image.astype(np.float32), xy[:, None, 0], xy[:, None, 1], cv2.INTER_LINEAR)[
        :, 0
    ]


def _queries_on(gt: GroundTruth, obj: int, t: int, n: int, rng, margin: float = 2.0):
    candidates = rng.uniform(0, [gt.width - 1, gt.height - 1], (20 * n, 2))
    on_object = candidates[object_points(gt, t, candidates, margin=margin) == obj][:n]
    assert len(on_object) > 0
    return np.column_stack([np.full(len(on_object), t), on_object])


@pytest.mark.parametrize("label", list(MOTIONS))
def test_true_tracks_follow_the_texture(label):
    """A material point keeps its colour along its true track; a point left behind does not."""
    config = SynthConfig(frames=16, width=96, height=80)
    frames, gt = make_video(config, label, 0)
    assert frames.shape == (16, 80, 96, 3)
    rng = np.random.default_rng(0)
    t0 = 5
    for obj in range(gt.num_objects):
        queries = _queries_on(gt, obj, t0, 40, rng)
        positions, visible = true_tracks(gt, queries)
        assert np.allclose(positions[t0], queries[:, 1:], atol=1e-3)
        assert visible[t0].all()
        start = _sample(frames[t0], queries[:, 1:])
        followed, left_behind = [], []
        for t in range(gt.num_frames):
            seen = visible[t]
            if t == t0 or not seen.any():
                continue
            followed.append(np.abs(_sample(frames[t], positions[t, seen]) - start[seen]).mean())
            moved = np.linalg.norm(positions[t] - positions[t0], axis=-1) > 3
            if moved.any():
                still = _sample(frames[t], queries[moved, 1:])
                left_behind.append(np.abs(still - start[moved]).mean())
        assert np.mean(followed) < 6, label
        if left_behind:
            assert np.mean(left_behind) > 3 * np.mean(followed), label


def test_exit_points_leave_the_frame_and_become_invisible():
    config = SynthConfig(frames=24, width=64, height=64)
    for index in range(3):
        _, gt = make_video(config, "exit", index)
        queries = _queries_on(gt, 0, 0, 30, np.random.default_rng(index))
        positions, visible = true_tracks(gt, queries)
        inside = ((positions >= -0.5) & (positions < 63.5)).all(-1)
        assert visible[0].all() and not visible[-1].any()
        assert np.array_equal(visible, inside)  # one object: only the frame border hides it


def _two_squares() -> GroundTruth:
    """Object 1 (16 px square, on top) slides over object 0 (12 px square, static)."""
    frames = 9
    affine = np.zeros((2, frames, 2, 3))
    affine[:, :, 0, 0] = affine[:, :, 1, 1] = 1
    affine[0, :, :, 2] = [32, 24]
    affine[1, :, 0, 2] = np.linspace(4, 60, frames)
    affine[1, :, 1, 2] = 24
    square = np.array([[-1.0, -1], [1, -1], [1, 1], [-1, 1]])
    sprites = np.zeros((2, 17, 17, 4), np.uint8)
    return GroundTruth(
        "occlusion",
        "test",
        10.0,
        affine,
        (6 * square, 8 * square),
        sprites,
        np.zeros((48, 64, 3), np.uint8),
    )


def test_occlusion_and_background_points():
    gt = _two_squares()
    assert list(object_points(gt, 0, [[32, 24], [4, 24], [50, 40]])) == [0, 1, -1]
    assert list(object_points(gt, 4, [[32, 24], [50, 40], [39.5, 24]], margin=1.0)) == [1, -1, -2]
    queries = np.array([[0, 32, 24], [0, 4, 24], [0, 20, 24]])  # object 0, object 1, background
    positions, visible = true_tracks(gt, queries)
    assert np.allclose(positions[:, 0], [32, 24]) and np.allclose(positions[:, 2], [20, 24])
    assert np.allclose(positions[:, 1, 0], np.linspace(4, 60, 9))
    # Object 1 (centre x = 4, 11, 18, 25, ...) covers x = 32 at frames 3-5, x = 20 at 2-3.
    assert list(np.flatnonzero(~visible[:, 0])) == [3, 4, 5]
    assert visible[:, 1].all()
    assert list(np.flatnonzero(~visible[:, 2])) == [2, 3]


def test_cli_writes_dataset_and_rejects_bad_size(tmp_path):
    app = typer.Typer()
    app.command()(synth_command)
    runner = CliRunner()
    assert "--videos-per-class" in runner.invoke(app, ["--help"]).output
    bad = runner.invoke(app, ["--out", str(tmp_path / "bad"), "--size", "64x47"])
    assert bad.exit_code != 0 and "height" in bad.output
    result = runner.invoke(
        app,
        [
            "--out",
            str(tmp_path / "d"),
            "--classes",
            "3",
            "--videos-per-class",
            "1",
            "--frames",
            "6",
            "--size",
            "64x48",
            "--no-progress",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "3 videos" in result.output
    manifest = read_manifest(tmp_path / "d" / "manifest.csv", check_files=True)
    assert len(manifest.rows) == 3
    with av.open(str(manifest.rows[0].path)) as container:
        assert next(container.decode(video=0)).to_ndarray(format="rgb24").shape == (48, 64, 3)
