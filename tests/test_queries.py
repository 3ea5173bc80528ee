"""Query strategies, the redundancy filter and the subset, on constructed cases (the original:
`point_tracking/extract_points.py` in pulkitkumar95/tats)."""

import numpy as np
import pytest

from tats.pipeline import queries as Q
from tats.pipeline.tracks import TracksConfig, tracks_row


def test_query_frames_of_each_strategy():
    T = 48
    assert Q.QueryStrategy.parse("uniform:8").query_frames(T).tolist() == [0, 6, 13, 20, 26, 33, 40]
    assert Q.QueryStrategy.parse("beginning").query_frames(T).tolist() == [0]
    assert Q.QueryStrategy.parse("middle").query_frames(T).tolist() == [0, 24]
    assert Q.QueryStrategy.parse("interval:10").query_frames(T).tolist() == [0, 10, 20, 30, 40]


def test_short_clip_tracks_each_query_frame_once():
    # linspace(0, 3, 8).astype(int)[:-1] repeats frames 0, 1 and 2.
    assert Q.QueryStrategy.parse("uniform:8").query_frames(4).tolist() == [0, 1, 2]


@pytest.mark.parametrize("bad", ["uniform", "uniform:1", "interval:0", "random", "middle:3"])
def test_bad_strategy_is_refused(bad):
    with pytest.raises(ValueError, match="strategy"):
        Q.QueryStrategy.parse(bad)


def test_grid_is_cotrackers_grid_mapped_to_the_frame():
    at_model = Q.grid_points(16, 384, 512)
    assert at_model.shape == (256, 2)
    np.testing.assert_allclose(at_model[0], [8, 8])  # margin W/64
    np.testing.assert_allclose(at_model[15], [504, 8])  # row-major: x runs first
    np.testing.assert_allclose(at_model[-1], [504, 376])
    small = Q.grid_points(16, 128, 160)
    np.testing.assert_allclose(small, at_model * [159 / 511, 127 / 383], rtol=1e-6)


def test_queries_are_grouped_by_query_frame():
    queries = Q.make_queries(Q.QueryStrategy.parse("uniform:8"), 4, 48, 64, 64)
    assert queries.shape == (7 * 16, 3)
    assert queries[:16, 0].tolist() == [0] * 16 and queries[-16:, 0].tolist() == [40] * 16


def _tracks(*paths):
    """Tracks (T, N, 2) from per-point (x, y) functions of t."""
    T = 10
    return np.array([[p(t) for p in paths] for t in range(T)], np.float32)


def test_filter_keeps_first_frame_and_drops_close_later_points():
    def still(x):
        return lambda t: (x, 50.0)

    tracks = _tracks(still(10), still(100), still(13), still(60), still(116), still(84))
    query = np.array([0, 0, 5, 5, 5, 5])
    visible = np.ones(tracks.shape[:2], bool)
    keep = Q.filter_redundant(tracks, visible, query, min_distance=16)
    # 13 is 3 px from 10; 60 is 40 px away; 116 is exactly 16 px from 100 (not more); 84 too.
    assert keep.tolist() == [True, True, False, True, False, False]


def test_filter_averages_distance_from_the_query_frame_on_ignoring_visibility():
    # The new point starts on top of kept point 0 but drifts away: mean over frames 5..9 of
    # |x - 10| with x = 10 + 10 * (t - 5) is 20 > 16 (frames before 5 are not counted).
    tracks = _tracks(lambda t: (10.0, 0.0), lambda t: (10.0 + 10 * max(t - 5, 0), 0.0))
    query = np.array([0, 5])
    visible = np.ones((10, 2), bool)
    visible[6:, 0] = False  # invisible after the query frame: still compared
    assert Q.filter_redundant(tracks, visible, query).tolist() == [True, True]
    slower = _tracks(lambda t: (10.0, 0.0), lambda t: (10.0 + 6 * max(t - 5, 0), 0.0))
    assert Q.filter_redundant(slower, visible, query).tolist() == [True, False]


def test_filter_ignores_kept_points_hidden_at_the_query_frame():
    tracks = _tracks(lambda t: (10.0, 0.0), lambda t: (11.0, 0.0), lambda t: (10.0, 1.0))
    query = np.array([0, 5, 7])
    visible = np.ones((10, 3), bool)
    visible[5, 0] = False  # no kept point is visible at frame 5: all of its points are kept
    keep = Q.filter_redundant(tracks, visible, query)
    # Frame 7's point is 1 px from both kept points, which are visible there: dropped.
    assert keep.tolist() == [True, True, False]


def test_subset_is_seeded_by_video_id():
    a = Q.choose_subset(1000, 256, "video_a")
    assert np.array_equal(a, Q.choose_subset(1000, 256, "video_a"))
    assert not np.array_equal(a, Q.choose_subset(1000, 256, "video_b"))
    assert len(np.unique(a)) == 256 and a.min() >= 0 and a.max() < 1000
    short = Q.choose_subset(100, 256, "video_a")
    assert sorted(short[:100].tolist()) == list(range(100)) and (short[100:] == -1).all()


def test_row_hides_points_before_their_query_frame_and_keeps_the_stored_frames():
    T, H, W = 20, 64, 64
    config = TracksConfig(grid=2, queries="uniform:3", frames=4, subset=8)
    query = np.array([0, 0, 0, 0, 9, 9, 9, 9], np.int32)  # uniform:3 on 20 frames: 0 and 9
    start = [[5, 5], [5, 20], [20, 5], [20, 20]] * 2
    tracks = np.repeat(np.array([start], np.float32), T, axis=0)
    tracks[:, 4:] += 45  # frame 9's points are far away, three of them outside the frame
    visible = np.ones((T, 8), bool)
    row = tracks_row(tracks, visible, query, (T, H, W, 3), config, "clip")
    assert row["frames"].tolist() == [0, 6, 12, 19]
    n = int(row["valid"].sum())
    assert n == 8
    # Stored frame 6 comes before query frame 9: those points are hidden there.
    assert not row["visible"][1, 4:].any() and row["visible"][1, :4].all()
    outside = (tracks[0, :, 0] > W - 1) | (tracks[0, :, 1] > H - 1)
    assert (row["visible"][3] == ~outside).all()
    assert row["query_frame"][:n].tolist() == query.tolist()
    np.testing.assert_array_equal(row["positions"][2, :n], tracks[12])
    assert (row["cluster"] == -1).all()  # grid queries have no clusters


def test_a_semantic_row_keeps_every_point_visible_before_its_query_frame():
    T, H, W = 20, 64, 64
    config = TracksConfig(queries="semantic", frames=4, subset=3)
    cluster = np.array([0, 0, 0, 0, 1, 2], np.int32)
    query = np.array([9, 9, 9, 9, 0, 15], np.int32)
    tracks = np.full((T, 6, 2), 30.0, np.float32)
    tracks[:, 0] += 1  # two points 1 px apart: the redundancy filter would drop one
    tracks[:, 5, 0] = 70  # outside the frame: invisible all the same
    row = tracks_row(tracks, np.ones((T, 6), bool), query, (T, H, W, 3), config, "clip", cluster)
    assert row["valid"].sum() == 6 and row["valid"][:6].all()
    assert row["cluster"][:6].tolist() == cluster.tolist() and (row["cluster"][6:] == -1).all()
    assert row["visible"][:, :5].all() and not row["visible"][:, 5].any()  # frame 0 < 9 too
    assert sorted(set(cluster[row["subset"]].tolist())) == [0, 1, 2]  # one per cluster
    np.testing.assert_array_equal(row["subset"], Q.cluster_subset(cluster, 3,
                                                                  Q.video_seed("clip")))


# Trokens' cluster sample (`trokens/datasets/point_sampler.py` `cluster_sample`, then the
# loader's top-up in `trokens/datasets/base_ds.py` `__getitem__`), written out as the release
# runs it, with its global random state replaced by one generator.
def release_cluster_sample(obj_ids: np.ndarray, points_to_sample: int, rng) -> np.ndarray:
    unique_clusters, cluster_counts = np.unique(obj_ids, return_counts=True)
    num_clusters = len(unique_clusters)
    remaining_points = points_to_sample - num_clusters
    assert remaining_points >= 0  # this test's clips have fewer clusters than points
    total_points = cluster_counts.sum()
    points_per_cluster = [1 + int(remaining_points * count / total_points)
                          for count in cluster_counts]  # fmt: skip
    extra_needed = points_to_sample - sum(points_per_cluster)
    if extra_needed > 0:  # torch.multinomial(weights, extra_needed, replacement=True)
        for cluster_idx in rng.choice(num_clusters, extra_needed, p=cluster_counts / total_points):
            points_per_cluster[cluster_idx] += 1
    all_sampled_indices = []
    for i, cluster_id in enumerate(unique_clusters):
        cluster_indices = np.where(obj_ids == cluster_id)[0]
        replace = len(cluster_indices) < points_per_cluster[i]
        all_sampled_indices.extend(rng.choice(cluster_indices, points_per_cluster[i], replace))
    filtered_points = np.zeros(len(obj_ids), dtype=bool)  # point_sampler returns a mask
    filtered_points[np.array(all_sampled_indices)] = True
    taken = np.flatnonzero(filtered_points)  # pred_tracks[:, filtered_points]: ascending
    points_missing = points_to_sample - len(taken)
    all_indices = np.argwhere(filtered_points)[:, 0]
    try:
        random_indices = rng.choice(all_indices, points_missing, replace=False)
    except ValueError:
        random_indices = rng.choice(all_indices, points_missing, replace=True)
    return np.concatenate([taken, random_indices])  # torch.cat([to_take, tracks[:, random]])


def test_a_clip_of_13_clusters_is_filled_to_256_points_as_trokens_does():
    sizes = [40, 31, 25, 20, 16, 16, 16, 12, 9, 5, 3, 2, 1]  # 13 clusters, 196 points
    ids = np.random.default_rng(3).permutation(np.repeat(np.arange(13), sizes))
    for seed in range(5):
        subset = Q.cluster_subset(ids, 256, seed)
        expected = release_cluster_sample(ids, 256, np.random.default_rng(seed))
        np.testing.assert_array_equal(subset, expected)
        # Every read has 256 real points: no padding, repeats of the drawn points only.
        assert subset.dtype == np.int32 and len(subset) == 256 and (subset >= 0).all()
        distinct = len(np.unique(subset))
        assert (np.diff(subset[:distinct]) > 0).all()  # the drawn points, ascending
        assert np.isin(subset[distinct:], subset[:distinct]).all()  # then the top-up
        assert set(ids[subset].tolist()) == set(range(13))  # every cluster
        np.testing.assert_array_equal(Q.canonical_order(subset), subset)  # read as drawn
    assert not np.array_equal(Q.cluster_subset(ids, 256, 0), Q.cluster_subset(ids, 256, 1))


def test_the_padded_fill_keeps_every_point_once_and_pads():
    ids = np.repeat(np.arange(13), 16)  # 208 points
    padded = Q.cluster_subset(ids, 256, 0, fill="pad")
    np.testing.assert_array_equal(padded, list(range(208)) + [-1] * 48)
    # A stored (repeat-filled) subset read with fill "pad": the same, whatever the draw.
    np.testing.assert_array_equal(Q.padded(Q.cluster_subset(ids, 256, 0), 208), padded)
    many = Q.cluster_subset(ids, 64, 0)  # more points than the subset
    np.testing.assert_array_equal(Q.padded(many, 208), np.unique(many).tolist()
                                  + [-1] * (64 - len(np.unique(many))))  # fmt: skip
    assert Q.canonical_order(np.array([5, 3, -1, 3, 1, -1, 5])).tolist() == [1, 3, 5, 3, 5, -1, -1]
    with pytest.raises(ValueError, match="fill"):
        Q.cluster_subset(ids, 256, 0, fill="zeros")
