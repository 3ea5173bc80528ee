"""`tats-extract diff`: real stores made by the stages, compared with themselves, with copies
changed by a known amount, across trackers, and across kinds."""

import json
import shutil
import subprocess

import numpy as np
import pytest
import torch
from stage_helpers import EXTRACT

from tats.manifest import read_manifest, write_manifest
from tats.pipeline.backbones import Preprocess
from tats.pipeline.diff import diff_stores
from tats.pipeline.features import FeaturesConfig, extract_features
from tats.pipeline.trackers.cotracker3 import build_model, moving_state_dict
from tats.pipeline.tracks import TracksConfig, extract_tracks
from tats.stores import RowStore
from tats.synth import SynthConfig, generate

# 3 clips of 8 frames: every query frame of uniform:8 is a stored frame; 3 units of 1 row.
SYNTH = SynthConfig(classes=3, videos_per_class=1, frames=8, width=64, height=48)
LK = TracksConfig(tracker="lk", grid=4, min_distance=4, subset=16, shard_size=1)
# CoTracker3 at its first frame only (a grid of 16 points): the slow tracker kept small.
COTRACKER3 = TracksConfig(
    tracker="cotracker3", grid=4, queries="beginning", subset=16, shard_size=2
)
OFFSET = np.array([3.0, 4.0], np.float32)  # 5 px


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    """A manifest and its stores: LK tracks, CoTracker3 tracks of the same clips (random
    weights at a 64x96 model resolution, the visibility head biased so that points are
    visible), and `pixels` features."""
    out = tmp_path_factory.mktemp("diff")
    manifest_path = generate(SYNTH, out / "synth", progress=False)
    manifest = read_manifest(manifest_path)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a small model: threads cost more than they give
    torch.manual_seed(0)
    state = build_model("offline", (64, 96)).state_dict()
    state["updateformer.vis_conf_head.bias"][0] = 3.0  # sigmoid 0.95: above the 0.9 threshold
    torch.save(state, out / "cotracker3.pth")
    runs = {
        "lk": extract_tracks(manifest, out / "lk.zarr", LK, workers=0, progress=False),
        "cotracker3": extract_tracks(
            manifest,
            out / "cotracker3.zarr",
            COTRACKER3,
            checkpoint=out / "cotracker3.pth",
            tracker_options={"model_resolution": (64, 96)},
            workers=0,
            progress=False,
        ),
        "features": extract_features(
            manifest,
            out / "features.zarr",
            FeaturesConfig(backbone="pixels", views=2, preprocess=Preprocess(size=56)),
            workers=0,
            progress=False,
        ),
    }
    for summary in runs.values():
        assert not summary.failures and summary.videos_done == 3
    torch.set_num_threads(threads)
    return {"manifest": manifest_path, "root": out, **{k: out / f"{k}.zarr" for k in runs}}


def run_diff(*args) -> tuple[int, str, str]:
    run = subprocess.run(
        [EXTRACT, "diff", *map(str, args), "--no-progress"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    return run.returncode, run.stdout, run.stderr


def changed_copy(source, target, change) -> RowStore:
    """A copy of the store at `source`, every row passed through `change(row, arrays)`."""
    shutil.copytree(source, target)
    store = RowStore.open(target, writable=True)
    for shard in store.shards():
        data = store.read_rows(shard)
        for i, row in enumerate(shard):
            change(row, {name: value[i] for name, value in data.items()})
        store.write_rows(shard, data)
    return store


def test_a_tracks_store_and_itself_differ_by_nothing(stores):
    code, out, err = run_diff(stores["lk"], stores["lk"], "--max-px", 0, "--json")
    assert code == 0, err
    result = json.loads(out)
    summary = result["summary"]
    assert result["compared"] == 3 and result["skipped"]["done_in_neither"] == 0
    assert summary["count"] > 0
    assert summary["mean"] == summary["p99"] == summary["max"] == 0.0
    assert summary["visibility_agreement"] == 1.0
    matched, kept_a, kept_b = summary["points_matched"]
    assert matched == kept_a == kept_b >= 3 * 16  # every clip keeps its first query frame


def test_the_offset_of_a_perturbed_copy_is_reported(stores, tmp_path):
    def shift(row, data):  # every position but the query point itself moves by OFFSET
        own = data["frames"][:, None] == data["query_frame"][None, :]
        data["positions"][~own] += OFFSET

    changed_copy(stores["lk"], tmp_path / "shifted.zarr", shift)
    result = diff_stores(stores["lk"], tmp_path / "shifted.zarr", progress=False)
    assert result.compared == 3 and not result.problems and result.count > 0
    for value in (result.mean, result.tail, result.extreme):
        assert value == pytest.approx(5.0, abs=1e-4)
    assert result.agree == 1.0
    assert result.matched[0] == result.matched[1] == result.matched[2]

    code, out, err = run_diff(stores["lk"], tmp_path / "shifted.zarr", "--max-px", 4.9)
    assert code == 1
    assert "99th-percentile distance 5 px is above --max-px 4.9" in err
    assert "distance px" in out and "5.0000" in out
    assert run_diff(stores["lk"], tmp_path / "shifted.zarr", "--max-px", 5.1)[0] == 0


def test_visibility_disagreement_is_counted(stores, tmp_path):
    flipped = {}

    def hide_last_frame(row, data):  # the last stored frame of the first frame's points
        first = (data["query_frame"] == 0) & data["valid"]
        flipped[row] = int(first.sum())
        data["visible"][-1, first] = ~data["visible"][-1, first]

    changed_copy(stores["lk"], tmp_path / "flipped.zarr", hide_last_frame)
    same = diff_stores(stores["lk"], stores["lk"], progress=False)
    result = diff_stores(stores["lk"], tmp_path / "flipped.zarr", progress=False)
    assert result.agree_of == same.agree_of
    assert result.agree == pytest.approx(1 - sum(flipped.values()) / same.agree_of)
    assert result.extreme == 0.0  # positions are untouched


def test_only_rows_done_in_both_are_compared(stores, tmp_path):
    partial = tmp_path / "partial.zarr"
    shutil.copytree(stores["lk"], partial)
    (partial / "ledger" / "unit-000001.json").unlink()  # row 1 not done in B
    code, out, err = run_diff(stores["lk"], partial, "--json")
    assert code == 0, err
    result = json.loads(out)
    assert result["compared"] == 2 and {w["row"] for w in result["worst"]} == {0, 2}
    assert result["skipped"] == {"done_in_a_only": 1, "done_in_b_only": 0, "done_in_neither": 0}
    code, out, _ = run_diff(stores["lk"], partial)
    assert "rows: 2 of 3 compared; 1 skipped (1 done in A only" in out


def test_lk_against_cotracker3_gives_a_number(stores):
    code, out, err = run_diff(
        stores["lk"], stores["cotracker3"], "--json", "--manifest", stores["manifest"]
    )
    assert code == 0, err
    result = json.loads(out)
    summary = result["summary"]
    assert result["compared"] == 3 and not result["problems"]
    assert summary["count"] > 0 and 0 < summary["mean"] <= summary["p99"] <= summary["max"]
    assert 0 <= summary["visibility_agreement"] <= 1
    # CoTracker3 queried frame 0 only: the LK points of frame 0's grid are the ones matched
    matched, kept_lk, kept_cotracker3 = summary["points_matched"]
    assert matched == kept_cotracker3 == 3 * 16 < kept_lk
    videos = [r.video_id for r in read_manifest(stores["manifest"]).rows]
    assert sorted(w["video_id"] for w in result["worst"]) == sorted(videos)


def test_features_store_against_itself_and_a_changed_copy(stores, tmp_path):
    code, out, err = run_diff(stores["features"], stores["features"], "--min-cosine", 0.999999)
    assert code == 0, err
    assert "cosine" in out and "1.000000" in out

    def change(row, data):
        if row == 1:  # two of its 16 (view, frame) grids reversed: cosine -1 there
            data["features"][0, :2] = -data["features"][0, :2]
        if row == 2:  # scaled: cosine 1 all the same
            data["features"] *= 2

    changed_copy(stores["features"], tmp_path / "changed.zarr", change)
    result = diff_stores(stores["features"], tmp_path / "changed.zarr", progress=False)
    reversed_share = 2 / (3 * 2 * 8)  # 2 of the 48 grids of 3 rows x 2 views x 8 frames
    assert result.mean == pytest.approx(1 - 2 * reversed_share, abs=1e-6)
    assert result.extreme == pytest.approx(-1.0) and result.tail == pytest.approx(-1.0)
    worst = result.worst(2)
    assert worst[0].row == 1 and worst[0].extreme == pytest.approx(-1.0)
    assert worst[1].extreme == pytest.approx(1.0, abs=1e-6)
    code, _, err = run_diff(stores["features"], tmp_path / "changed.zarr", "--min-cosine", 0.9)
    assert code == 1 and "below --min-cosine 0.9" in err


def test_stores_that_cannot_be_compared_exit_2_with_one_line(stores, tmp_path):
    code, out, err = run_diff(stores["lk"], stores["features"])
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and "holds tracks" in err and "holds features" in err

    manifest = read_manifest(stores["manifest"])
    write_manifest(list(manifest.rows)[:2], tmp_path / "two.csv")
    two = read_manifest(tmp_path / "two.csv")
    extract_tracks(two, tmp_path / "two.zarr", LK, workers=0, progress=False)
    code, _, err = run_diff(stores["lk"], tmp_path / "two.zarr")
    assert code == 2 and err.count("\n") == 1 and "have 3 and 2 rows" in err

    code, _, err = run_diff(stores["lk"], stores["lk"], "--min-cosine", 0.5)
    assert code == 2 and "--min-cosine applies to features stores" in err


def test_rows_that_cannot_be_compared_are_listed_and_fail(stores, tmp_path):
    def other_frames(row, data):
        if row == 1:
            data["frames"][1] += 1

    changed_copy(stores["lk"], tmp_path / "other.zarr", other_frames)
    code, out, err = run_diff(stores["lk"], tmp_path / "other.zarr", "--worst", 1)
    assert code == 1 and "1 rows could not be compared" in err
    frames = RowStore.open(stores["lk"]).read_row(1, ("frames",))["frames"]
    changed = frames.copy()
    changed[1] += 1
    problem = f"different stored frames ({frames.tolist()} and {changed.tolist()})"
    assert f"1    -      {problem}" in out
    code, out, _ = run_diff(stores["lk"], tmp_path / "other.zarr", "--json")
    result = json.loads(out)
    assert result["compared"] == 3 and [p["row"] for p in result["problems"]] == [1]
    assert result["failures"] == ["1 rows could not be compared"]


def test_bf16_tracks_against_fp32_tracks_of_the_same_clips(stores, tmp_path):
    """What `precision auto` changes where the CPU or GPU has bf16 units: tracks of the TATs
    queries (uniform:8, moving test weights) made in bf16 and in fp32, compared by the
    command; the stores record their precision."""
    manifest = read_manifest(stores["manifest"])
    torch.save(moving_state_dict(model_resolution=(64, 96)), tmp_path / "moving.pth")
    config = TracksConfig(tracker="cotracker3", grid=4, subset=16, shard_size=2)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    for precision in ("fp32", "bf16"):
        summary = extract_tracks(
            manifest, tmp_path / f"{precision}.zarr", config, checkpoint=tmp_path / "moving.pth",
            tracker_options={"model_resolution": (64, 96), "precision": precision},
            workers=0, progress=False,
        )  # fmt: skip
        assert summary.videos_done == 3
        mode = RowStore.open(tmp_path / f"{precision}.zarr").provenance["tracker"]["mode"]
        assert f"precision={precision}" in mode
    torch.set_num_threads(threads)
    code, out, err = run_diff(tmp_path / "fp32.zarr", tmp_path / "bf16.zarr", "--json",
                              "--max-px", 0.5)  # fmt: skip
    assert code == 0, err
    summary = json.loads(out)["summary"]
    assert 0 < summary["mean"] <= 0.05 and summary["max"] <= 0.5, summary
    assert summary["visibility_agreement"] >= 0.99
