"""Interop: the original releases' pickles in, HDF5 and NPZ out and back, on real stores."""

import json
import pickle
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from stage_helpers import arrays, assert_same, records
from typer.testing import CliRunner

from tats.cli.extract import app
from tats.interop import OriginalPoints, export_h5, export_npz, import_h5, resample
from tats.manifest import read_manifest
from tats.pipeline import queries as Q
from tats.pipeline import semantic as S
from tats.pipeline.backbones import create_backbone
from tats.pipeline.status import store_status, verify_store
from tats.pipeline.trackers import list_trackers, register_tracker
from tats.pipeline.trackers.lk import LKTracker
from tats.pipeline.tracks import ClipLoader, TracksConfig, extract_tracks, semantic_queries
from tats.stores import RowStore
from tats.synth import SynthConfig, generate


class HalfPrecisionLK(LKTracker):
    """LK whose positions are rounded to float16, the precision both releases store tracks in,
    so that a direct extraction and the pickles hold the same tracks."""

    def track(self, frames, queries, **kwargs):
        tracks, visible = super().track(frames, queries, **kwargs)
        return tracks.astype(np.float16).astype(np.float32), visible


if "lk-half" not in list_trackers():
    register_tracker("lk-half")(HalfPrecisionLK)

# A 16 px filter would keep little of 64 px clips: a 4 px filter keeps points
# from every query frame, and 48-point subsets leave some clips padded and some not.
CONFIG = TracksConfig(tracker="lk-half", grid=6, min_distance=4, subset=48, shard_size=4)
# Trokens' semantic points: clusters of the weight-free pixels features, 4 points each.
SEMANTIC = TracksConfig(
    tracker="lk-half", queries="semantic", subset=48, shard_size=4,
    semantic=S.SemanticConfig(frames=8, points_per_cluster=4, max_clusters=8, backbone="pixels"),
)  # fmt: skip
IMPORT_OPTIONS = ["--grid", "6", "--min-distance", "4", "--subset", "48", "--shard-size", "4",
                  "--points-per-cluster", "4", "--max-clusters", "8", "--workers", "0",
                  "--no-progress"]  # fmt: skip


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    """A small synth dataset."""
    config = SynthConfig(classes=4, videos_per_class=2, frames=20, width=64, height=64)
    return generate(config, tmp_path_factory.mktemp("interop") / "synth", progress=False)


def extracted(manifest: Path, config: TracksConfig, out: Path) -> Path:
    summary = extract_tracks(read_manifest(manifest), out, config, workers=0, progress=False)
    assert summary.videos_done == 8 and not summary.failures
    return out


@pytest.fixture(scope="module")
def direct(dataset, tmp_path_factory):
    """The dataset and the tracks store of a direct extraction of its grid points."""
    return dataset, extracted(dataset, CONFIG, tmp_path_factory.mktemp("grid") / "tracks.zarr")


@pytest.fixture(scope="module")
def direct_semantic(dataset, tmp_path_factory):
    """The dataset and the tracks store of a direct extraction of its semantic points."""
    out = tmp_path_factory.mktemp("semantic") / "tracks.zarr"
    return dataset, extracted(dataset, SEMANTIC, out)


def full_tracks(row, config: TracksConfig):
    """What the tracks stage tracked for one video, whole: tracks [T, N, 2] in pixels of the
    video, raw visibility, query frames, the points to store (grid queries: those the filter
    kept) and their clusters (semantic queries; else None)."""
    clip = ClipLoader(config.fps, config.native_suffixes, config.max_side)(row)
    T, H, W = clip.frames.shape[:3]
    clusters = None
    if config.semantic is None:
        queries = Q.make_queries(Q.QueryStrategy.parse(config.queries), config.grid, T, H, W)
    else:
        backbone = create_backbone(config.semantic.backbone, preprocess=S.PREPROCESS)
        (queries,), (clusters,) = semantic_queries([clip.frames], config.semantic, backbone)
    tracks, visible = HalfPrecisionLK().track(clip.frames, queries, backward=clusters is not None)
    tracks = clip.to_source(tracks)
    query = queries[:, 0].astype(np.int64)
    if clusters is not None:
        return tracks, visible, query, np.ones(len(query), bool), clusters
    hidden = Q.hide_before_query(visible, query)
    x, y = tracks[..., 0], tracks[..., 1]
    inside = (x >= 0) & (x <= W - 1) & (y >= 0) & (y <= H - 1)
    keep = Q.filter_redundant(tracks, hidden & inside, query, config.min_distance)
    return tracks, hidden, query, keep, None


def write_pickles(manifest: Path, store: Path, layout: str, folder: Path) -> Path:
    """Per-video pickles in an original release's layout (TATs: the grid points, Trokens: the
    semantic points and their clusters) of the tracks that made `store` (torch tensors,
    float16 positions, named after the video file)."""
    folder.mkdir(parents=True)
    stored = arrays(store)
    config = CONFIG if layout == "tats-pkl" else SEMANTIC
    for row in read_manifest(manifest).rows:
        tracks, hidden, query, keep, clusters = full_tracks(row, config)
        tracks, hidden, query = tracks[:, keep], hidden[:, keep], query[keep]
        if layout == "tats-pkl":
            subset = stored["subset"][row.row]
            if (subset < 0).any():  # the release cannot sample 48 of fewer points: any draw
                subset = np.random.default_rng(row.row).permutation(48)
            data = {
                "pred_tracks": torch.from_numpy(tracks)[None].half(),
                "pred_visibility": torch.from_numpy(hidden)[None],
                "per_point_queries": query.astype(int),
                "total_points": len(keep),
                "random": {48: {"sampled_indices": subset.astype(int), "ids_to_consider": None}},
            }
        else:
            data = {
                "pred_tracks": torch.from_numpy(tracks).half(),
                "pred_visibility": torch.from_numpy(hidden).bool(),
                "obj_ids": torch.from_numpy(clusters).long(),
                "point_queries": torch.from_numpy(query).long(),
            }
        with open(folder / f"{Path(row.path).name.split('.')[0]}.pkl", "wb") as f:
            pickle.dump(data, f)
    return folder


def invoke(*args) -> tuple[int, str]:
    result = CliRunner().invoke(app, [str(a) for a in args])
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.stdout + result.stderr


def run_import(layout: str, folder: Path, manifest: Path, out: Path, *extra) -> tuple[int, str]:
    return invoke("import-tracks", "--from", layout, folder, "--manifest", manifest, "--out", out,
                  "--trust-pickles", *IMPORT_OPTIONS, *extra)  # fmt: skip


@pytest.mark.parametrize("layout", ["tats-pkl", "trokens-pkl"])
def test_original_pickles_import_to_the_direct_extraction(request, layout, tmp_path):
    manifest, store = request.getfixturevalue("direct" if layout == "tats-pkl" else
                                              "direct_semantic")  # fmt: skip
    write_pickles(manifest, store, layout, tmp_path / "pickles" / "cotracker3_6")
    out = tmp_path / "imported.zarr"
    code, output = run_import(layout, tmp_path / "pickles", manifest, out)
    assert code == 0, output
    assert "import: 8 videos done, 0 failed" in output
    assert_same(arrays(out), arrays(store))
    if layout == "trokens-pkl":
        assert (arrays(out)["cluster"][arrays(out)["valid"]] >= 0).all()
    assert verify_store(out, progress=False) == []
    provenance = RowStore.open(out).provenance
    assert provenance["tracker"]["name"] == f"import:{layout}"
    # A rerun resumes: nothing is read again.
    before = records(out)
    code, output = run_import(layout, tmp_path / "pickles", manifest, out)
    assert code == 0 and "2 units already done" in output and records(out) == before


def test_a_tats_pickle_keeps_its_own_subset_where_it_fits(direct, tmp_path):
    manifest, store = direct
    folder = write_pickles(manifest, store, "tats-pkl", tmp_path / "pickles")
    extracted = arrays(store)
    own = {}
    for row in read_manifest(manifest).rows:  # another draw than the seeded one
        path = folder / f"{row.video_id}.pkl"
        data = pickle.loads(path.read_bytes())
        kept = data["pred_tracks"].shape[2]
        own[row.row] = np.random.default_rng(100 + row.row).permutation(kept)[:48]
        data["random"][48]["sampled_indices"] = own[row.row]
        path.write_bytes(pickle.dumps(data))
    out = tmp_path / "imported.zarr"
    code, output = run_import("tats-pkl", folder, manifest, out)
    assert code == 0, output
    subset = arrays(out)["subset"]
    fits = [r for r, s in own.items() if len(s) == 48]
    unfit = [r for r, s in own.items() if len(s) < 48]
    assert fits and unfit  # clips with more and with fewer kept points than the subset
    for row in fits:
        np.testing.assert_array_equal(subset[row], own[row])
        assert not np.array_equal(subset[row], extracted["subset"][row])
    np.testing.assert_array_equal(subset[unfit], extracted["subset"][unfit])


def test_without_trust_nothing_is_unpickled(direct, tmp_path):
    manifest, store = direct
    folder = tmp_path / "pickles"
    folder.mkdir()
    canary = tmp_path / "ran"
    for row in read_manifest(manifest).rows:  # a pickle that runs code when loaded
        (folder / f"{row.video_id}.pkl").write_bytes(
            pickle.dumps(type("Evil", (), {"__reduce__": lambda s: (canary.touch, ())})())
        )
    out = tmp_path / "imported.zarr"
    code, output = invoke("import-tracks", "--from", "tats-pkl", folder, "--manifest", manifest,
                          "--out", out, "--no-progress")  # fmt: skip
    assert code == 2
    assert "unpickling runs whatever code a pickle names" in output
    assert "--trust-pickles" in output and len(output.strip().splitlines()) == 1
    assert not canary.exists() and not out.exists()


def test_bad_pickles_fail_their_videos_alone(direct, tmp_path):
    manifest, store = direct
    folder = write_pickles(manifest, store, "tats-pkl", tmp_path / "pickles")
    rows = read_manifest(manifest).rows
    (folder / f"{rows[1].video_id}.pkl").write_bytes(pickle.dumps({"tracks": [1, 2]}))
    (folder / f"{rows[6].video_id}.pkl").unlink()
    out = tmp_path / "imported.zarr"
    code, output = invoke("import-tracks", "--from", "tats-pkl", folder, "--manifest", manifest,
                          "--out", out, "--trust-pickles", *IMPORT_OPTIONS)  # fmt: skip
    assert code == 1, output
    assert f"failed row 1 ({rows[1].video_id})" in output and "not a tats-pkl pickle" in output
    assert f"failed row 6 ({rows[6].video_id})" in output and "no pickle for" in output
    assert store_status(out).videos_done == 6
    good = [r for r in range(8) if r not in (1, 6)]
    assert_same(arrays(out), arrays(store), rows=good)


def test_a_pickle_on_another_time_base_is_resampled():
    # 11 frames of a point moving 2 px a frame, queried at frame 5, onto 21 frames.
    t = np.arange(11, dtype=np.float32)
    tracks = np.stack([10 + 2 * t, np.full(11, 7.0)], axis=-1)[:, None]
    visible = (t >= 5)[:, None]
    points = resample(OriginalPoints(tracks, visible, np.array([5])), 21)
    np.testing.assert_allclose(points.tracks[:, 0, 0], 10 + np.arange(21, dtype=np.float32))
    np.testing.assert_array_equal(points.query_frame, [10])
    assert points.visible[:, 0].tolist() == [f >= 10 for f in range(21)]
    assert resample(points, 21) is points


@pytest.mark.parametrize("which", ["tracks", "features"])
def test_hdf5_export_imports_back_to_the_same_store(synth_stores, which, tmp_path):
    store = getattr(synth_stores, which)
    manifest = read_manifest(synth_stores.manifest)
    h5_path = tmp_path / f"{which}.h5"
    code, output = invoke("export", store, h5_path, "--format", "h5", "--manifest",
                          synth_stores.manifest)  # fmt: skip
    assert code == 0, output
    with h5py.File(h5_path, "r") as h5:  # readable without tats
        original = RowStore.open(store)
        for name, field in original.fields.items():
            assert h5[name].shape == (original.num_rows, *field.shape)
            assert h5[name].compression == "gzip" and h5[name].chunks is not None
        assert h5.attrs["schema"] == original.schema
        assert json.loads(h5.attrs["provenance"]) == original.provenance
        assert list(h5["manifest/video_id"].asstr()) == [r.video_id for r in manifest.rows]
        assert h5["done"][:].all()
    back = tmp_path / "back.zarr"
    code, output = invoke("import-h5", h5_path, "--out", back, "--manifest-out",
                          tmp_path / "manifest.csv")  # fmt: skip
    assert code == 0, output
    assert_same(arrays(back), arrays(store))
    assert dict(RowStore.open(back).attrs) == dict(RowStore.open(store).attrs)
    assert records(back) == records(store)
    assert read_manifest(tmp_path / "manifest.csv").sha256 == manifest.sha256
    assert verify_store(back, progress=False) == []
    # The way back refuses to overwrite.
    code, output = invoke("import-h5", h5_path, "--out", back)
    assert code == 2 and "exists" in output


V2_EXPORT = Path(__file__).parent / "data" / "v2_tracks.h5"  # tests/data/make_v2_export.sh


def test_an_export_of_a_version_2_store_imports_as_this_version(tmp_path):
    # Exports made before schema version 3 hold the same values; importing one makes a store
    # of this version (small arrays one chunk per shard), its rows and ledger checked.
    code, output = invoke("import-h5", V2_EXPORT, "--out", tmp_path / "back.zarr",
                          "--manifest-out", tmp_path / "manifest.csv")  # fmt: skip
    assert code == 0, output
    back = RowStore.open(tmp_path / "back.zarr")
    assert back.version == 3 and back.attrs["created_by"].startswith("tats ")
    assert back.fields["subset"].per_shard and not back.fields["positions"].per_shard
    assert back.group["subset"].chunks == (back.shard_size, *back.fields["subset"].shape)
    with h5py.File(V2_EXPORT, "r") as h5:
        assert h5.attrs["schema_version"] == 2
        assert json.loads(h5.attrs["provenance"]) == back.provenance
        assert_same(arrays(back.path), {name: h5[name][...] for name in back.fields})
        assert len(records(back.path)) == len(h5["ledger"]) == 2
    assert verify_store(back.path, progress=False) == []
    assert store_status(back.path).videos_done == len(read_manifest(tmp_path / "manifest.csv"))


def test_hdf5_with_changed_data_is_refused(synth_stores, tmp_path):
    manifest = read_manifest(synth_stores.manifest)
    h5_path = export_h5(synth_stores.tracks, manifest, tmp_path / "tracks.h5")
    with h5py.File(h5_path, "r+") as h5:
        h5["positions"][3, 0, 0, 0] += 1
    with pytest.raises(ValueError, match="row 3 differs from its ledger record"):
        import_h5(h5_path, tmp_path / "back.zarr")
    assert not (tmp_path / "back.zarr").exists()
    assert not list(tmp_path.glob(".back.zarr*"))


def test_hdf5_with_a_missing_array_exits_2_naming_it(synth_stores, tmp_path):
    manifest = read_manifest(synth_stores.manifest)
    h5_path = export_h5(synth_stores.tracks, manifest, tmp_path / "tracks.h5")
    with h5py.File(h5_path, "r+") as h5:
        del h5["visible"]
    code, output = invoke("import-h5", h5_path, "--out", tmp_path / "back.zarr")
    assert code == 2
    points = RowStore.open(synth_stores.tracks).fields["visible"].shape[1]
    assert output.strip() == (f"error: {h5_path}: dataset 'visible' should have shape "
                              f"({len(manifest.rows)}, 8, {points}), found no such dataset: the "
                              f"export is damaged")  # fmt: skip
    assert not (tmp_path / "back.zarr").exists()


def test_npz_export_writes_each_video(synth_stores, tmp_path):
    manifest = read_manifest(synth_stores.manifest)
    paths = export_npz(synth_stores.tracks, manifest, tmp_path / "npz")
    assert len(paths) == len(manifest.rows)
    stored = arrays(synth_stores.tracks)
    for path in paths[:3] + paths[-2:]:
        with np.load(path) as data:
            row = int(data["row"])
            assert str(data["video_id"]) == manifest.rows[row].video_id == path.stem
            for name in stored:
                np.testing.assert_array_equal(data[name], stored[name][row], err_msg=name)
    attributes = json.loads((tmp_path / "npz" / "attributes.json").read_text())
    assert attributes["schema"] == "tats.tracks"


def rewrite(path: Path, change) -> None:
    """Unpickle `path`, change its dict in place, pickle it back."""
    data = pickle.loads(path.read_bytes())
    change(data)
    path.write_bytes(pickle.dumps(data))


def set_item(key, value):
    return lambda data: data.__setitem__(key, value)


def no_points(data):
    T = data["pred_tracks"].shape[1]
    data.update(pred_tracks=torch.zeros(1, T, 0, 2).half(), per_point_queries=np.zeros(0, int),
                pred_visibility=torch.zeros(1, T, 0, dtype=torch.bool), total_points=0,
                random={48: {"sampled_indices": np.zeros(0, int)}})  # fmt: skip


def far_away(data):
    tracks = data["pred_tracks"].float()  # the releases store float16; float32 holds 1e30
    tracks.view(-1, tracks.shape[-2], 2)[3, 0, 0] = 1e30
    data["pred_tracks"] = tracks


def a_fraction(data):
    query = data["per_point_queries"].astype(float)
    query[0] += 0.5
    data["per_point_queries"] = query


def nan_visibility(data):
    visible = data["pred_visibility"].float()
    visible.view(-1, visible.shape[-1])[2, 1] = float("nan")
    data["pred_visibility"] = visible


def huge_cluster(data):
    ids = data["obj_ids"].clone()
    ids[0] = 2**31 + 5  # int32 would wrap it to a negative number
    data["obj_ids"] = ids


def nan_cluster(data):
    ids = data["obj_ids"].double()
    ids[1] = float("nan")
    data["obj_ids"] = ids


@pytest.mark.parametrize("layout", ["tats-pkl", "trokens-pkl"])
def test_bad_values_in_pickles_fail_their_videos_alone(request, layout, tmp_path):
    """Values no release writes are refused per video, naming the pickle and the problem (they
    were stored: positions of 1e30, obj_ids wrapped or cast from NaN, NaN visibility, query
    frames truncated); the other videos import."""
    manifest, store = request.getfixturevalue("direct" if layout == "tats-pkl" else
                                              "direct_semantic")  # fmt: skip
    folder = write_pickles(manifest, store, layout, tmp_path / "pickles")
    rows = read_manifest(manifest).rows
    query = "per_point_queries" if layout == "tats-pkl" else "point_queries"
    bad = {
        0: (set_item("pred_tracks", "tensor([[[1.5, 2.0]]])"), "pred_tracks holds text, not "
            "numbers"),
        1: (far_away, "track positions up to 1e+30 px, the video is 64x64: more than 10 frame "
            "sides outside"),
        2: (lambda d: d.__setitem__(query, np.ones(len(d[query]), bool)),
            f"{query} holds true/false values, not numbers"),
        3: (lambda d: d.__setitem__(query, np.asarray(d[query], float) + 0.5),
            f"{query} holds fractions ("),
        4: (nan_visibility, "pred_visibility holds nan, expected true/false (1/0)"),
    }  # fmt: skip
    if layout == "tats-pkl":
        bad[5] = (no_points, "no points (pred_tracks has shape (")
    else:
        bad[5] = (huge_cluster, f"obj_ids holds {2**31 + 5}, outside 0..2147483647 (cluster "
                                "numbers)")  # fmt: skip
        bad[6] = (nan_cluster, "obj_ids holds NaN or infinity, expected cluster numbers")
    paths = {}
    for row, (change, _) in bad.items():
        paths[row] = folder / f"{Path(rows[row].path).name.split('.')[0]}.pkl"
        rewrite(paths[row], change)
    out = tmp_path / "imported.zarr"
    code, output = run_import(layout, folder, manifest, out)
    assert code == 1, output
    failed = {int(line.split()[2]): line for line in output.splitlines() if "failed row" in line}
    assert sorted(failed) == sorted(bad), output
    for row, (_, problem) in bad.items():
        assert failed[row].startswith(f"  failed row {row} ({rows[row].video_id}): "), failed[row]
        assert f"{paths[row]}: {problem}" in failed[row], failed[row]
    good = [r for r in range(8) if r not in bad]
    assert store_status(out).videos_done == len(good)
    assert_same(arrays(out), arrays(store), rows=good)


@pytest.fixture
def exported(synth_stores, tmp_path) -> Path:
    """An HDF5 export of the synth tracks store (5 units of 16 rows, every row done)."""
    return export_h5(synth_stores.tracks, read_manifest(synth_stores.manifest),
                     tmp_path / "tracks.h5")  # fmt: skip


def import_line(h5_path: Path, out: Path) -> str:
    """The one line of an import-h5 that exits 2 (and leaves no store and no debris)."""
    code, output = invoke("import-h5", h5_path, "--out", out)
    assert code == 2, output
    lines = output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), output
    assert not out.exists() and not list(out.parent.glob(f".{out.name}*"))
    return lines[0].removeprefix("error: ")


def test_damaged_hdf5_attributes_are_named(exported, tmp_path):
    out = tmp_path / "back.zarr"
    with h5py.File(exported, "r+") as h5:
        good = h5.attrs["provenance"]
        h5.attrs["provenance"] = good[:-1]  # its closing brace lost
    assert import_line(exported, out) == (
        f"{exported}: attribute provenance is not valid JSON (Expecting ',' delimiter)"
    )
    with h5py.File(exported, "r+") as h5:
        h5.attrs["provenance"] = good
        h5.attrs["shard_size"] = 0
    assert import_line(exported, out) == (
        f"{exported}: attribute shard_size is 0, expected a whole number of rows of at least 1: "
        f"the export is damaged"
    )
    with h5py.File(exported, "r+") as h5:
        h5.attrs["shard_size"] = 16
        del h5["done"]
    assert import_line(exported, out) == f"{exported}: not a tats-extract export: no /done"


def test_hdf5_rows_must_be_those_the_ledger_records(exported, tmp_path):
    """/done is checked against the ledger, and rows outside it must hold nothing: an export
    whose ledger was lost, or whose data spills into rows not done, is refused (it imported,
    exit 0, and failed verify afterwards)."""
    out = tmp_path / "back.zarr"
    with h5py.File(exported, "r+") as h5:
        ledger = list(h5["ledger"].asstr()[...])
        del h5["ledger"]
        h5.create_dataset("ledger", data=[], dtype=h5py.string_dtype())
    assert import_line(exported, out) == (
        f"{exported}: /done marks 72 rows done, the ledger records 0 (row 0 is done in /done but "
        f"in no ledger record): the export is damaged"
    )
    # Unit 1 (rows 16..31) left out of the ledger and of /done: its rows still hold data.
    with h5py.File(exported, "r+") as h5:
        del h5["ledger"]
        h5.create_dataset("ledger", data=ledger[:1] + ledger[2:], dtype=h5py.string_dtype())
        h5["done"][16:32] = False
    assert import_line(exported, out) == (
        f"{exported}: row 16 holds data in positions, visible, valid, query_frame, subset, "
        f"frames, num_frames, frame_size but is not done (no ledger record has it): the export "
        f"is damaged"
    )


def test_export_and_import_paths_are_checked_before_any_work(synth_stores, exported, tmp_path):
    """A folder where the HDF5 file goes, a file where a folder goes: exit 2 first (they were
    exit 3 after the whole export or import)."""
    folder = tmp_path / "exports"
    folder.mkdir()
    code, output = invoke("export", synth_stores.tracks, folder, "--format", "h5", "--manifest",
                          synth_stores.manifest)  # fmt: skip
    assert code == 2 and output.strip() == (
        f"error: {folder}: a folder; the HDF5 export is one file: give its path (e.g. "
        f"{folder / 'store.h5'})"
    ), output
    assert not list(folder.iterdir())
    code, output = invoke("export", synth_stores.tracks, exported, "--format", "npz",
                          "--manifest", synth_stores.manifest)  # fmt: skip
    assert code == 2 and output.strip() == (
        f"error: {exported}: a file; the NPZ export is a folder of files: give a folder"
    ), output
    assert import_line(exported, exported / "sub.zarr") == (
        f"{exported / 'sub.zarr'}: {exported} is a file, not a folder"
    )
