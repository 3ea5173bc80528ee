"""The LK tracker on `tats synth` videos, against the generator's known motion."""

import numpy as np
import pytest

from tats.manifest import read_manifest
from tats.pipeline.queries import grid_points
from tats.pipeline.trackers import create_tracker
from tats.synth import ground_truth_path, load_ground_truth, object_points, true_tracks
from tats.video import probe, read_frames, timeline


def _clip(manifest_path, label):
    row = next(r for r in read_manifest(manifest_path).rows if r.label == label)
    frames = read_frames(row.path, timeline(probe(row.path)))
    return frames, load_ground_truth(ground_truth_path(manifest_path.parent, row.video_id))


def _queries_on_object(gt, t, height, width):
    """Points of a dense grid that lie well inside object 0 at frame t, as (t, x, y)."""
    xy = grid_points(48, height, width)
    on = object_points(gt, t, xy, margin=3.0) == 0
    assert on.sum() >= 10, "the test needs points on the shape"
    return np.concatenate([np.full((on.sum(), 1), t, np.float32), xy[on]], axis=1)


@pytest.mark.parametrize("label", ["translate_right", "zigzag", "circle_cw", "bounce"])
def test_lk_follows_a_moving_shape(synth_small, label):
    frames, gt = _clip(synth_small, label)
    T, H, W = frames.shape[:3]
    queries = np.concatenate(
        [_queries_on_object(gt, 0, H, W), _queries_on_object(gt, T // 2, H, W)]
    )
    tracks, visible = create_tracker("lk").track(frames, queries)
    truth, truly_visible = true_tracks(gt, queries)
    judged = truly_visible & visible
    assert judged.mean() > 0.8, "LK lost most points of a plainly visible shape"
    error = np.linalg.norm(tracks - truth, axis=-1)[judged]
    assert error.mean() < 1.5, f"mean error {error.mean():.2f} px"


def test_lk_marks_points_that_leave_the_frame_invisible(synth_small):
    frames, gt = _clip(synth_small, "exit")
    T, H, W = frames.shape[:3]
    queries = _queries_on_object(gt, 0, H, W)
    tracks, visible = create_tracker("lk").track(frames, queries)
    truth, _ = true_tracks(gt, queries)
    outside = (truth[..., 0] < -0.5) | (truth[..., 0] > W - 0.5)
    outside |= (truth[..., 1] < -0.5) | (truth[..., 1] > H - 0.5)
    assert outside.any(), "the exit clip must carry points out of the frame"
    assert not visible[outside].any()
    assert visible[0].all()  # at their query frame every point is visible


def test_lk_tracks_backwards_as_forwards_on_the_time_reversed_clip(synth_small):
    frames, gt = _clip(synth_small, "translate_right")
    T, H, W = frames.shape[:3]
    queries = _queries_on_object(gt, T // 2, H, W)
    lk = create_tracker("lk")
    tracks, visible = lk.track(frames, queries, backward=True)
    reversed_queries = np.concatenate([T - 1 - queries[:, :1], queries[:, 1:]], axis=1)
    back, back_visible = lk.track(np.ascontiguousarray(frames[::-1]), reversed_queries)
    np.testing.assert_array_equal(tracks[: T // 2], back[::-1][: T // 2])
    np.testing.assert_array_equal(visible[: T // 2], back_visible[::-1][: T // 2])
    # ... and those backward tracks follow the shape to the first frame
    truth, truly_visible = true_tracks(gt, queries)
    judged = (truly_visible & visible)[: T // 2]
    assert judged[0].mean() > 0.8, "most points should reach frame 0 backwards"
    error = np.linalg.norm(tracks - truth, axis=-1)[: T // 2][judged]
    assert error.mean() < 1.5, f"mean error {error.mean():.2f} px"
