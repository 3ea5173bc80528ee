import json
import re
import shutil
from collections import Counter

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from tats.episodes import (
    EpisodeData,
    EpisodeKeys,
    EpisodeSpec,
    EpisodeWarning,
    ReadOptions,
)
from tats.evaluate import evaluation_options
from tats.manifest import read_manifest
from tats.pipeline.queries import canonical_order, cluster_subset
from tats.stores import StoreError

SPEC = EpisodeSpec(way=3, shot=2, queries=2)


@pytest.fixture(scope="module")
def data(synth_stores):
    return EpisodeData.open(synth_stores.tracks, synth_stores.features, synth_stores.manifest)


def test_spec_rejects_bad_values():
    with pytest.raises(ValueError, match="way"):
        EpisodeSpec(1, 1, 1)
    with pytest.raises(ValueError, match="shot"):
        EpisodeSpec(5, 0, 1)
    with pytest.raises(ValueError, match="queries"):
        EpisodeSpec(5, 1, 0)
    with pytest.raises(ValueError, match="tracks mode"):
        ReadOptions(tracks_mode="grid")
    with pytest.raises(ValueError, match="mask"):
        ReadOptions(mask="every")


def test_store_facts(data):
    assert (data.num_frames, data.grid, data.feature_dim, data.views, data.points) == (
        8, (8, 8), 64, 2, 48,
    )  # fmt: skip
    assert len(data.usable) == len(data.manifest.rows) == 72


def test_episode_layout_and_classes(data):
    manifest = data.manifest
    dataset = data.dataset("train", SPEC, ReadOptions(), seed=0)
    for index in range(20):
        episode = dataset.episode(0, index)
        assert len(episode.rows) == 3 * (2 + 2)
        n = SPEC.num_support
        np.testing.assert_array_equal(episode.labels[:n], [0, 0, 1, 1, 2, 2])
        np.testing.assert_array_equal(episode.labels[n:], [0, 0, 1, 1, 2, 2])
        assert len(set(episode.rows.tolist())) == len(episode.rows)  # no clip twice
        assert len(set(episode.classes.tolist())) == 3
        names = dataset.classes.names
        for row, label, cls in zip(episode.rows, episode.labels, episode.classes, strict=True):
            video = manifest.rows[row]
            assert video.split == "train" and video.label == names[cls]
            assert episode.classes[episode.labels == label].tolist().count(cls) == 4
    assert names == tuple(manifest.classes("train"))


def test_episodes_are_deterministic_and_distinct_by_key_and_rank(data):
    a = data.dataset("train", SPEC, ReadOptions(random_view=True), seed=0)
    b = data.dataset("train", SPEC, ReadOptions(random_view=True), seed=0)
    rank1 = data.dataset("train", SPEC, ReadOptions(random_view=True), seed=0, rank=1)
    other_seed = data.dataset("train", SPEC, ReadOptions(random_view=True), seed=1)
    first, again = a[(2, 5)], b[(2, 5)]
    for name in first:
        assert torch.equal(first[name], again[name]), name
    rows = {k: a.episode(*k).rows.tobytes() for k in [(e, i) for e in range(3) for i in range(10)]}
    assert len(set(rows.values())) == len(rows)  # every (epoch, index) its own episode
    assert all(rank1.episode(*k).rows.tobytes() != r for k, r in rows.items())
    assert all(other_seed.episode(*k).rows.tobytes() != r for k, r in rows.items())


def test_clip_inputs_match_the_stores(data, synth_stores):
    dataset = data.dataset("test", SPEC, ReadOptions(), seed=0)
    batch = dataset[(0, 3)]
    features, positions, mask = batch["features"], batch["positions"], batch["mask"]
    visible = batch["visible"]
    assert features.dtype == torch.float16 and features.shape == (12, 8, 8, 8, 64)
    assert positions.dtype == torch.float32 and positions.shape == (12, 8, 48, 2)
    assert mask.dtype == torch.bool and mask.shape == (12, 8, 48)
    assert visible.dtype == torch.bool and visible.shape == (12, 8, 48)
    padded, reordered = 0, 0
    for i, row in enumerate(batch["rows"].tolist()):
        t = data.tracks.read_row(row)
        stored = data.features.read_row(row)["features"][0]
        assert torch.equal(features[i], torch.from_numpy(stored))
        subset = t["subset"]
        real = subset >= 0  # padding comes last in the store and in the clip
        points = np.sort(subset[real])  # the canonical order: ascending point index
        reordered += not np.array_equal(points, subset[real])
        height, width = t["frame_size"]
        expected = t["positions"][:, points] / np.array([width, height]) * 2 - 1
        np.testing.assert_allclose(positions[i, :, real].numpy(), expected, rtol=1e-6)
        exists = t["frames"][:, None] >= t["query_frame"][points][None]
        np.testing.assert_array_equal(mask[i, :, real].numpy(), exists)
        np.testing.assert_array_equal(visible[i, :, real].numpy(), t["visible"][:, points])
        assert mask[i, -1, real].all()  # every real point exists at the last stored frame
        # Padding: finite, at 0, masked and invisible at every frame.
        assert (positions[i, :, ~real] == 0).all() and not mask[i, :, ~real].any()
        assert not visible[i, :, ~real].any()
        padded += int((~real).sum())
    assert reordered > 0  # the stored subsets are in draw order: the test can fail
    assert padded > 0  # the fixture has clips with fewer points than the subset
    assert torch.isfinite(positions).all()
    visible = mask & (positions.abs() <= 1).all(-1)
    assert visible.sum() > 0.9 * mask.sum()


def test_frozen_tracks_are_a_fixed_grid(data):
    moving = data.dataset("train", SPEC, ReadOptions(), seed=0)[(0, 0)]
    frozen = data.dataset("train", SPEC, ReadOptions(tracks_mode="frozen"), seed=0)[(0, 0)]
    assert torch.equal(frozen["features"], moving["features"])
    positions, mask = frozen["positions"], frozen["mask"]
    # The first query frame's 6 x 6 grid, the same in every clip (all are 64 x 64 px), fixed in
    # place and present at every frame; the rest is padding.
    assert (positions == positions[:, :1]).all() and (positions == positions[:1]).all()
    assert mask[:, :, :36].all() and not mask[:, :, 36:].any()
    assert torch.equal(frozen["visible"], mask)  # a fixed point is present everywhere
    assert (positions[:, :, 36:] == 0).all()
    row = int(frozen["rows"][0])
    t = data.tracks.read_row(row)
    assert (t["query_frame"][:36] == 0).all() and t["query_frame"][36] > 0
    expected = t["positions"][0, :36] / 64 * 2 - 1
    np.testing.assert_allclose(positions[0, 0, :36].numpy(), expected, rtol=1e-6)
    xs, ys = np.unique(expected[:, 0]), np.unique(expected[:, 1])
    assert len(xs) == len(ys) == 6  # a regular grid
    assert (moving["positions"] != moving["positions"][:, :1]).any()  # the tracks do move


def test_visible_mask_and_fresh_subsets(data):
    key = (0, 1)
    stored = data.dataset("train", SPEC, ReadOptions(), seed=0)
    fresh = data.dataset("train", SPEC, ReadOptions(fresh_subset=True), seed=0)
    visible = data.dataset("train", SPEC, ReadOptions(mask="visible"), seed=0)
    episode = stored.episode(*key)
    row = int(episode.rows[0])
    t = data.tracks.read_row(row)
    subset = t["subset"]
    real = subset >= 0
    np.testing.assert_array_equal(
        visible[key]["mask"][0, :, real].numpy(), t["visible"][:, np.sort(subset[real])]
    )
    a = fresh.read_tracks(row, subset_seed=1)[0]
    b = fresh.read_tracks(row, subset_seed=2)[0]
    assert not np.array_equal(a, b)
    np.testing.assert_array_equal(a, fresh.read_tracks(row, subset_seed=1)[0])
    # A fresh subset takes min(P, kept) distinct kept points.
    kept = int(t["valid"].sum())
    scale = np.array(t["frame_size"][::-1], np.float32)
    points = {tuple(np.round(p, 5)) for p in (t["positions"][0, :kept] / scale * 2 - 1)}
    drawn = [tuple(np.round(p, 5)) for p in a[0, : min(48, kept)]]
    assert set(drawn) <= points and len(set(drawn)) == min(48, kept)
    assert fresh[key]["positions"].shape == stored[key]["positions"].shape


def test_random_views_in_training_view_zero_in_evaluation(data):
    train = data.dataset("train", SPEC, ReadOptions(random_view=True), seed=0)
    views = np.concatenate([train.episode(0, i).views for i in range(10)])
    assert set(views.tolist()) == {0, 1}
    test = data.dataset("test", SPEC, ReadOptions(), seed=0)
    assert not np.concatenate([test.episode(0, i).views for i in range(10)]).any()
    batch = train[(0, 0)]
    episode = train.episode(0, 0)
    for i, (row, view) in enumerate(zip(episode.rows, episode.views, strict=True)):
        stored = data.features.read_row(int(row))["features"][view]
        assert torch.equal(batch["features"][i], torch.from_numpy(stored))


def test_dataloader_workers_read_the_same_episodes(data):
    dataset = data.dataset("train", SPEC, ReadOptions(random_view=True), seed=0)
    keys = EpisodeKeys(range(4), epoch=1)
    loader = DataLoader(dataset, batch_size=None, sampler=keys, num_workers=2)
    batches = list(loader)
    assert [b["key"].tolist() for b in batches] == [[1, i] for i in range(4)]
    for i, batch in enumerate(batches):
        direct = dataset[(1, i)]
        for name in direct:
            assert torch.equal(batch[name], direct[name]), name
    keys.set_epoch(2)
    assert [k for k in keys] == [(2, i) for i in range(4)]
    shares = [list(EpisodeKeys(range(r, 10, 3))) for r in range(3)]
    assert sorted(i for share in shares for _, i in share) == list(range(10))


def test_refuses_stores_of_another_manifest(synth_stores, tmp_path):
    other = tmp_path / "manifest.csv"
    text = synth_stores.manifest.read_text()
    assert "translate_right_000," in text
    other.write_text(text.replace("translate_right_000,", "renamed_000,"))
    with pytest.raises(StoreError, match="made for another manifest"):
        EpisodeData.open(synth_stores.tracks, synth_stores.features, other)
    with pytest.raises(StoreError, match="holds tats.tracks, not tats.features"):
        EpisodeData.open(synth_stores.tracks, synth_stores.tracks, synth_stores.manifest)


def test_refuses_stores_whose_rows_disagree(synth_stores, tmp_path):
    features = tmp_path / "features.zarr"
    shutil.copytree(synth_stores.features, features)
    import zarr

    group = zarr.open_group(str(features), mode="r+")
    frames = group["frames"][16:32]
    frames[5] = frames[5][::-1]
    group["frames"][16:32] = frames  # a whole shard
    video = read_manifest(synth_stores.manifest).rows[21].video_id
    with pytest.raises(StoreError, match=f"row 21 \\({video}\\): frames differ"):
        EpisodeData.open(synth_stores.tracks, features, synth_stores.manifest)


def fail_rows(store, rows):
    """Turn `rows` from done into failed in a store's ledger, as a failed video leaves them."""
    for path in (store / "ledger").glob("unit-*.json"):
        record = json.loads(path.read_text())
        for row in rows:
            if str(row) in record["done"]:
                del record["done"][str(row)]
                record["failed"].append({"row": row, "video_id": "x", "error": "test"})
        path.write_text(json.dumps(record))


def test_failed_videos_are_left_out(synth_stores, tmp_path):
    manifest = read_manifest(synth_stores.manifest)
    tracks = tmp_path / "tracks.zarr"
    shutil.copytree(synth_stores.tracks, tracks)
    train_rows = [r.row for r in manifest.split_rows("train")]
    failed = train_rows[:1]  # one video of the first train class
    fail_rows(tracks, failed)
    with pytest.warns(EpisodeWarning, match="1 videos are done in only one"):
        data = EpisodeData.open(tracks, synth_stores.features, synth_stores.manifest)
    assert failed[0] not in data.usable
    dataset = data.dataset("train", EpisodeSpec(6, 1, 4), ReadOptions(), seed=0)
    seen = np.concatenate([dataset.episode(0, i).rows for i in range(30)])
    assert failed[0] not in seen
    # That class now has 5 usable videos: 1 + 5 per class leaves it out, 6-way is then impossible.
    with pytest.warns(EpisodeWarning, match=f"{manifest.rows[failed[0]].label} \\(5\\)"):
        with pytest.raises(StoreError, match="5 classes with at least 6 usable videos; 6-way"):
            data.classes("train", per_class=6, way=6)
    with pytest.warns(EpisodeWarning, match="left out"):
        classes = data.classes("train", per_class=6, way=5)
    assert len(classes.drawable) == 5


def test_no_common_done_rows_is_an_error(synth_stores, tmp_path):
    tracks = tmp_path / "tracks.zarr"
    shutil.copytree(synth_stores.tracks, tracks)
    fail_rows(tracks, range(72))
    with pytest.raises(StoreError, match="no video is done in both"), pytest.warns(EpisodeWarning):
        EpisodeData.open(tracks, synth_stores.features, synth_stores.manifest)


def count_reads(monkeypatch) -> tuple[Counter, Counter]:
    """What reading stores costs from now on: Zstd chunk decodes, and reads by store key, counted
    by wrappers around zarr's own codec and local store."""
    from zarr.codecs import ZstdCodec
    from zarr.storage import LocalStore

    decodes, keys = Counter(), Counter()
    decode, get = ZstdCodec._decode_sync, LocalStore.get

    def counted_decode(self, *args, **kwargs):
        decodes["chunks"] += 1
        return decode(self, *args, **kwargs)

    async def counted_get(self, key, *args, **kwargs):
        keys[key] += 1
        return await get(self, key, *args, **kwargs)

    monkeypatch.setattr(ZstdCodec, "_decode_sync", counted_decode)
    monkeypatch.setattr(LocalStore, "get", counted_get)
    return decodes, keys


def test_opening_reads_the_shards_of_done_rows_only_a_chunk_each(
    synth_stores, tmp_path, monkeypatch
):
    # Shard 1 (rows 16..31) done in both stores, the other four failed.
    paths = {}
    for name in ("tracks", "features"):
        paths[name] = tmp_path / f"{name}.zarr"
        shutil.copytree(getattr(synth_stores, name), paths[name])
        fail_rows(paths[name], [r for r in range(72) if not 16 <= r < 32])
    decodes, keys = count_reads(monkeypatch)
    data = EpisodeData.open(paths["tracks"], paths["features"], synth_stores.manifest)
    assert data.usable.tolist() == list(range(16, 32))
    chunks = [re.match(r"(\w+)/c[./](\d+)", key) for key in keys]
    assert {m.group(2) for m in chunks if m} == {"1"}  # no other shard's file is read
    # Frames, frame sizes and frame counts of tracks, frames and counts of features: one chunk
    # decode each for the 16 rows, none per row.
    assert decodes["chunks"] == 5
    monkeypatch.undo()
    whole = EpisodeData.open(synth_stores.tracks, synth_stores.features, synth_stores.manifest)
    np.testing.assert_array_equal(data.frames[16:32], whole.frames[16:32])
    np.testing.assert_array_equal(data.frame_size[16:32], whole.frame_size[16:32])
    assert (data.frames[:16] == -1).all() and (data.frame_size[32:] == 0).all()  # not read
    with pytest.warns(EpisodeWarning, match="fewer than 2 usable videos"):
        train = data.dataset("train", EpisodeSpec(2, 1, 1), ReadOptions(), seed=0)
    assert set(train[(0, 0)]["rows"].tolist()) <= set(range(16, 32))


def test_padded_cluster_subsets_are_seeded_and_sample_every_cluster():
    # fill "pad" (Trokens' own fill: tests/test_queries.py)
    rng = np.random.default_rng(0)
    sizes = [120, 60, 30, 12, 5, 1, 1]  # clusters of very different sizes, two of one point
    ids = rng.permutation(np.repeat([7, 3, 11, 0, 5, 2, 9], sizes))  # ids in no order
    draws = [cluster_subset(ids, 48, seed, "pad") for seed in range(20)]
    assert all(np.array_equal(cluster_subset(ids, 48, s, "pad"), d) for s, d in enumerate(draws))
    assert len({d.tobytes() for d in draws}) == 20  # each seed its own draw
    for subset in draws:
        assert subset.dtype == np.int32 and len(subset) == 48
        assert (np.diff(subset) > 0).all()  # distinct, ascending: the canonical order
        counts = np.array([np.sum(ids[subset] == c) for c in [7, 3, 11, 0, 5, 2, 9]])
        assert (counts >= 1).all()  # every cluster, the one-point ones too
        # The rest in proportion to size: 1 + (48 - 7) * size / 229, rounded down, +- the
        # points left over after rounding (fewer than the 7 clusters).
        floor = 1 + (48 - 7) * np.array(sizes) // sum(sizes)
        assert (counts >= floor).all() and (counts - floor).sum() == 48 - floor.sum()
    few = cluster_subset(ids[:10], 16, 0, "pad")  # fewer points than the subset: all, then padding
    np.testing.assert_array_equal(few, list(range(10)) + [-1] * 6)
    many = cluster_subset(np.arange(40) % 20, 8, 1, "pad")  # more clusters than points to draw
    assert len(np.unique(many % 20)) == 8


def test_cluster_sampling_reads_seeded_draws_of_every_cluster(semantic_stores):
    data = EpisodeData.open(
        semantic_stores.tracks, semantic_stores.features, semantic_stores.manifest
    )
    spec = EpisodeSpec(way=3, shot=1, queries=1)
    sampled = ReadOptions(cluster_sampling=True, mask="visible")
    train = data.dataset("train", spec, sampled, seed=0)
    again = data.dataset("train", spec, sampled, seed=0)
    first = train[(1, 2)]
    for name, value in again[(1, 2)].items():  # a resumed run reads the same clips
        assert torch.equal(value, first[name]), name
    assert not sampled.per_clip  # so evaluation cannot embed such clips once
    draws = 0
    for key in [(1, 2), (1, 3), (2, 2)]:
        episode = train.episode(*key)
        batch = train[key]
        for i, (row, seed) in enumerate(zip(episode.rows, episode.subset_seeds, strict=True)):
            t = data.tracks.read_row(int(row))
            kept = int(t["valid"].sum())
            subset = cluster_subset(t["cluster"][:kept], 24, int(seed))  # what was read
            real = subset >= 0
            scale = np.array(t["frame_size"][::-1], np.float32)
            expected = t["positions"][:, subset[real]] / scale * 2 - 1
            np.testing.assert_allclose(batch["positions"][i, :, real].numpy(), expected,
                                       rtol=1e-6)  # fmt: skip
            visible = t["visible"][:, subset[real]]
            np.testing.assert_array_equal(batch["visible"][i, :, real].numpy(), visible)
            np.testing.assert_array_equal(batch["mask"][i, :, real].numpy(), visible)
            clusters = set(t["cluster"][:kept].tolist())
            assert set(t["cluster"][subset[real]].tolist()) == clusters  # every cluster
            draws += kept > 24 and not np.array_equal(subset, t["subset"])
    assert draws > 0  # the draws are not the stored subset
    # The same video in another episode or epoch gets another draw.
    row = int(train.episode(1, 2).rows[0])
    seeds = [s for k in [(1, 2), (1, 3), (2, 2), (3, 0), (3, 1), (4, 4)]
             for r, s in zip(train.episode(*k).rows, train.episode(*k).subset_seeds, strict=True)
             if r == row] + [1, 2]  # fmt: skip
    reads = {train.read_tracks(row, int(s))[0].tobytes() for s in seeds}
    assert len(reads) > 1
    # Evaluation reads the stored subset (drawn by cluster once per video), in point order.
    test = data.dataset("test", spec, evaluation_options({
        "fresh_subset": False, "tracks_mode": "tracks", "mask": "visible",
        "cluster_sampling": True,
    }), seed=0)  # fmt: skip
    batch = test[(0, 0)]
    for i, row in enumerate(batch["rows"].tolist()):
        t = data.tracks.read_row(row)
        subset = t["subset"]
        real = subset >= 0
        scale = np.array(t["frame_size"][::-1], np.float32)
        expected = t["positions"][:, canonical_order(subset)[real]] / scale * 2 - 1
        np.testing.assert_allclose(batch["positions"][i, :, real].numpy(), expected, rtol=1e-6)
    with pytest.raises(ValueError, match="exclude each other"):
        ReadOptions(fresh_subset=True, cluster_sampling=True)
