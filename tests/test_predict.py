"""`tats predict` on `tats synth` videos: a model trained on the training classes classifies
clips of held-out classes from a few labelled ones, extracted as its training stores were."""

import csv
import json
import shutil
from itertools import pairwise
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from typer.testing import CliRunner

from tats.checkpoints import check_identity, load_checkpoint, save_checkpoint
from tats.cli import app
from tats.episodes import EpisodeData, EpisodeSpec, SplitClasses
from tats.evaluate import (
    embed,
    episode_predictions,
    eval_result,
    evaluation_options,
    load_model,
)
from tats.fewshot import frame_embeddings, hausdorff_distances, prototype_frames
from tats.manifest import read_manifest, write_manifest
from tats.pipeline.backbones import Preprocess
from tats.pipeline.features import FeaturesConfig, extract_features
from tats.pipeline.tracks import TracksConfig, extract_tracks
from tats.pipeline.weights import file_sha256
from tats.predict import Prototypes, match
from tats.runtime import Runtime
from tats.train import train
from tats.train_config import config_from_dict

TRAIN = dict(
    way=5, shot=1, train_queries=3, episodes=40, epochs=4, val_episodes=0, test_episodes=0,
    width=32, heads=4, lr=1e-3, weight_decay=0.05, warmup_epochs=0, lr_steps=[], workers=0,
    log_every=40,
)  # fmt: skip


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def checkpoint(synth_stores, tmp_path_factory) -> Path:
    """A model trained briefly on the 6 training classes of the synth stores."""
    out = tmp_path_factory.mktemp("predict_model") / "run"
    stores = dict(
        tracks=str(synth_stores.tracks), features=str(synth_stores.features),
        manifest=str(synth_stores.manifest), out=str(out),
    )  # fmt: skip
    torch.set_num_threads(1)
    return train(config_from_dict({**stores, **TRAIN})).best_checkpoint


@pytest.fixture(scope="module")
def held_out(synth_stores) -> dict[str, list]:
    """5 classes the model never saw (all of val and test but one), 6 videos each."""
    rows = read_manifest(synth_stores.manifest).rows
    names = sorted({r.label for r in rows if r.split != "train"})[:5]
    return {name: [r for r in rows if r.label == name] for name in names}


def write_list(path: Path, videos, labels: bool = True) -> Path:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["video_id", "path", "label"] if labels else ["video_id", "path"])
        for v in videos:
            writer.writerow([v.video_id, v.path, v.label] if labels else [v.video_id, v.path])
    return path


def invoke(*args) -> tuple[int, str, str]:
    result = CliRunner().invoke(app, ["predict", *map(str, args), "--workers", "0",
                                      "--no-progress"])  # fmt: skip
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.stdout, result.stderr


def read_predictions(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def frames_of(tokens: np.ndarray) -> np.ndarray:
    """The matching's frame embeddings, from its definition: ReLU, mean over points."""
    return np.maximum(tokens, 0).mean(axis=-2)


def hausdorff(a: np.ndarray, b: np.ndarray, eps: float = 0.01) -> float:
    d = 1 - (a @ b.T) / (np.linalg.norm(a, axis=1)[:, None] * np.linalg.norm(b, axis=1) + eps)
    return float(d.min(axis=1).sum() + d.min(axis=0).sum())


def ledger_files(out: Path) -> dict[str, tuple[bytes, int]]:
    return {
        str(p.relative_to(out)): (p.read_bytes(), p.stat().st_mtime_ns)
        for store in ("tracks.zarr", "features.zarr")
        for p in sorted((out / store / "ledger").rglob("*"))
        if p.is_file()
    }


@pytest.mark.parametrize("shot", [1, 5])
def test_predict_agrees_with_the_model_and_with_episode_evaluation(
    synth_stores, checkpoint, held_out, tmp_path, shot
):
    support = [v for videos in held_out.values() for v in videos[:shot]]
    query = [v for videos in held_out.values() for v in videos[shot:]]
    support_csv = write_list(tmp_path / "support.csv", support)
    query_csv = write_list(tmp_path / "query.csv", query)
    out = tmp_path / "out"
    code, stdout, stderr = invoke(
        "--checkpoint", checkpoint, "--support", support_csv, "--query", query_csv, "--out", out
    )
    assert code == 0, stdout + stderr
    assert "tracks: 30 videos extracted, 0 failed" in stdout
    rows = read_predictions(out / "predictions.csv")
    classes = sorted(held_out)
    assert [r["video_id"] for r in rows] == [v.video_id for v in query]
    assert list(rows[0]) == ["video_id", "label", "predicted",
                             *(f"distance_{c}" for c in classes),
                             *(f"score_{c}" for c in classes)]  # fmt: skip

    # Every number again, from the model and the training stores: predict extracted the clips
    # exactly as those were made, so the model sees the same inputs.
    state = load_checkpoint(checkpoint)
    model = load_model(state, torch.device("cpu"))
    data = EpisodeData.open(synth_stores.tracks, synth_stores.features, synth_stores.manifest)
    made = EpisodeData.open(out / "tracks.zarr", out / "features.zarr", out / "videos.csv")
    reader = data.dataset("test", EpisodeSpec(2, 1, 1), evaluation_options(state["config"]), 0)
    made_reader = made.clips(np.arange(len(made.manifest.rows)), reader.options)

    def tokens(video) -> np.ndarray:
        clip = reader.read_clip(video.row, view=0, subset_seed=0)
        made_row = next(r.row for r in made.manifest.rows if r.video_id == video.video_id)
        for name, value in made_reader.read_clip(made_row, 0, 0).items():
            np.testing.assert_array_equal(value, clip[name], err_msg=name)
        inputs = [torch.from_numpy(clip[k])[None] for k in ("features", "positions", "mask")]
        with torch.no_grad():
            return model(*inputs)[0][0].double().numpy()

    prototypes = {
        c: frames_of(np.mean([tokens(v) for v in videos[:shot]], axis=0))
        for c, videos in held_out.items()
    }
    for video, row in zip(query, rows, strict=True):
        distances = np.array([hausdorff(frames_of(tokens(video)), prototypes[c]) for c in classes])
        scores = np.exp(-distances) / np.exp(-distances).sum()
        written = np.array([float(row[f"distance_{c}"]) for c in classes])
        np.testing.assert_allclose(written, distances, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose([float(row[f"score_{c}"]) for c in classes], scores,
                                   rtol=1e-4, atol=1e-6)  # fmt: skip
        assert row["predicted"] == classes[int(np.argmin(distances))]
        assert row["label"] == video.label

    # Accuracy, per class and confused, from the rows; the summary printed.
    correct = np.array([r["predicted"] == r["label"] for r in rows]) * 100.0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["accuracy"] == pytest.approx(correct.mean())
    # The Wilson interval: the accuracies p whose normal test does not reject the observed
    # share, i.e. the roots of (share - p)^2 = z^2 p (1 - p) / n.
    n, share, z2 = len(correct), correct.mean() / 100, 1.96**2
    roots = np.roots([1 + z2 / n, -(2 * share + z2 / n), share**2])
    assert metrics["ci95"] == pytest.approx(sorted(100 * roots.real), abs=1e-9)
    assert metrics["support"] == {c: shot for c in classes}
    confusion = np.array(metrics["confusion"])
    assert confusion.sum() == len(query) and np.trace(confusion) == correct.sum() / 100
    assert (out / "confusion.png").is_file() and not (out / "failed.csv").exists()
    low, high = metrics["ci95"]
    assert f"accuracy {metrics['accuracy']:.1f}% (95% interval {low:.1f} to {high:.1f})" in stdout
    for c in classes:
        assert stdout.count(f"\n{c} ") == 1  # a table row per class

    # The episode evaluation of the same checkpoint on the same 5 classes agrees within CIs.
    split_classes = SplitClasses(
        "test", tuple(classes),
        tuple(np.array([v.row for v in held_out[c]]) for c in classes), np.arange(5),
    )  # fmt: skip
    rt = Runtime.setup("cpu", "off", workers=0, prefetch=2)
    spec = EpisodeSpec(5, shot, 1)
    episodes = eval_result(split_classes, spec, episode_predictions(
        model, data, split_classes, spec, reader.options, 300, 0, rt
    ))  # fmt: skip
    # The two intervals overlap.
    e_low, e_high = episodes.accuracy - episodes.ci95, episodes.accuracy + episodes.ci95
    assert max(low, e_low) <= min(high, e_high)
    # Not asserted: that this tiny model beats chance on classes it never saw. Across runs it
    # scored 19% to 37% here (chance 20%), as rare one-video differences of the synthetic
    # data (see test_synth) change its training; the agreement above holds either way.

    # Run again: the stores are reused, nothing is extracted, the ledgers are untouched.
    ledgers = ledger_files(out)
    assert len(ledgers) >= 2
    again = invoke(
        "--checkpoint", checkpoint, "--support", support_csv, "--query", query_csv, "--out", out
    )
    assert again[0] == 0, again
    assert "tracks: 0 videos extracted, 0 failed, 2 units already done" in again[1]
    assert "features: 0 videos extracted, 0 failed, 2 units already done" in again[1]
    assert ledger_files(out) == ledgers
    assert read_predictions(out / "predictions.csv") == rows


def test_unreadable_videos_are_listed_and_the_rest_predicted(checkpoint, held_out, tmp_path):
    names = sorted(held_out)[:3]
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(b"\x00\x00\x00\x18ftypmp42 not a video" * 50)
    support = write_list(tmp_path / "support.csv", [held_out[c][0] for c in names]
                         + [held_out[names[0]][1]])  # fmt: skip
    readable = [held_out[names[1]][2], held_out[names[2]][3]]
    query = tmp_path / "query.csv"
    query.write_text(
        "video_id,path\n" + "".join(f"{v.video_id},{v.path}\n" for v in readable)
        + f"broken,{broken}\n"
    )  # fmt: skip
    out = tmp_path / "out"
    code, stdout, stderr = invoke(
        "--checkpoint", checkpoint, "--support", support, "--query", query, "--out", out
    )
    assert code == 1, stdout + stderr
    failed = [line for line in stderr.splitlines() if line.startswith("failed")]
    assert len(failed) == 1 and failed[0].startswith(f"failed query broken ({broken}): tracks:")
    predicted = read_predictions(out / "predictions.csv")
    assert [r["video_id"] for r in predicted] == [v.video_id for v in readable]
    listed = list(csv.DictReader(open(out / "failed.csv")))
    assert [(f["video_id"], f["role"]) for f in listed] == [("broken", "query")]
    assert json.loads((out / "metrics.json").read_text())["accuracy"] is None  # no labels
    assert not (out / "confusion.png").exists()

    # A support video that cannot be read: its class still has a clip, so the run goes on.
    support.write_text(support.read_text() + f"broken_support,{broken},{names[0]}\n")
    code, stdout, stderr = invoke(
        "--checkpoint", checkpoint, "--support", support, "--query", query, "--out",
        tmp_path / "out2",
    )  # fmt: skip
    assert code == 1 and "failed support broken_support" in stderr
    table = {line.split()[0]: line.split()[1:] for line in stdout.splitlines()}
    assert table["class"] == ["support", "predicted", "labelled", "accuracy"]
    assert table[names[0]][0] == "2"  # its two readable clips


def one_line_error(code: int, stderr: str) -> str:
    assert code == 2, stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    return lines[0]


def test_bad_inputs_exit_2_with_one_line(checkpoint, held_out, tmp_path):
    names = sorted(held_out)[:2]
    videos = [held_out[c][i] for c in names for i in range(2)]
    support = write_list(tmp_path / "support.csv", videos[0::2])
    query = write_list(tmp_path / "query.csv", videos[1::2], labels=False)

    def run(support_csv=support, query_csv=query, model=checkpoint, out=tmp_path / "out"):
        out, *more = out if isinstance(out, tuple) else (out,)
        return invoke("--checkpoint", model, "--support", support_csv, "--query", query_csv,
                      "--out", out, *more)  # fmt: skip

    # A class whose only support clip cannot be read.
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(b"not a video")
    lonely = tmp_path / "lonely.csv"
    lonely.write_text(support.read_text() + f"b1,{broken},lonely_class\n")
    code, _, stderr = run(support_csv=lonely, out=tmp_path / "lonely")
    line = one_line_error(code, stderr)
    assert f"{lonely}: class 'lonely_class' has no readable clip (b1: tracks:" in line
    made = sorted(p.name for p in (tmp_path / "lonely").iterdir())
    assert made == ["features.zarr", "tracks.zarr", "videos.csv"]  # extracted, not predicted
    # That folder holds the stores of those lists: other lists are refused there.
    line = one_line_error(*run(out=tmp_path / "lonely")[::2])
    assert line == (f"error: {tmp_path / 'lonely'} holds the stores of other support and query "
                    f"lists ({tmp_path / 'lonely' / 'videos.csv'}); use a new --out")  # fmt: skip

    # The same video id in both lists; a query label with no support clip; a missing column.
    twice = tmp_path / "twice.csv"
    twice.write_text(query.read_text() + f"{videos[0].video_id},{videos[0].path}\n")
    line = one_line_error(*run(query_csv=twice)[::2])
    assert line == (f"error: {twice}:4: duplicate video_id {videos[0].video_id!r} "
                    f"(first at {support}:2)")  # fmt: skip
    unknown = tmp_path / "unknown.csv"
    unknown.write_text(f"video_id,path,label\n{videos[1].video_id},{videos[1].path},jump\n")
    line = one_line_error(*run(query_csv=unknown)[::2])
    assert line == f"error: {unknown}:2: label 'jump' has no clip in {support}"
    headless = tmp_path / "headless.csv"
    headless.write_text(f"video_id,path\n{videos[0].video_id},{videos[0].path}\n")
    line = one_line_error(*run(support_csv=headless)[::2])
    assert f"{headless}:1: missing column 'label'" in line

    # Options that cannot run: refused before anything is extracted.
    line = one_line_error(*run(out=(tmp_path / "out", "--batch-clips", "0"))[::2])
    assert line == "error: batch_clips must be at least 1, not 0"
    line = one_line_error(*run(out=(tmp_path / "out", "--device", "gpu"))[::2])
    assert line == "error: unknown device 'gpu'; use auto, cpu, cuda or cuda:N"

    # A checkpoint that does not record its stores' provenance (an older tats).
    state = load_checkpoint(checkpoint)
    del state["data"]
    old = tmp_path / "old.pt"
    save_checkpoint(old, state)
    line = one_line_error(*run(model=old)[::2])
    assert line.startswith(f"error: {old}: the checkpoint does not record the stores it was")
    assert not (tmp_path / "out").exists()  # refused before anything was written


def test_a_model_trained_with_fp16_autocast_predicts_on_the_cpu(checkpoint, held_out, tmp_path):
    # fp16 autocast exists only on CUDA: such a model runs in full precision elsewhere.
    state = load_checkpoint(checkpoint)
    state["config"]["amp"] = "fp16"
    fp16 = tmp_path / "fp16.pt"
    save_checkpoint(fp16, state)
    names = sorted(held_out)[:2]
    support = write_list(tmp_path / "support.csv", [held_out[c][0] for c in names])
    query = write_list(tmp_path / "query.csv", [held_out[c][1] for c in names])
    code, stdout, stderr = invoke("--checkpoint", fp16, "--support", support, "--query", query,
                                  "--out", tmp_path / "out", "--device", "cpu")  # fmt: skip
    assert code == 0, stderr
    assert len(read_predictions(tmp_path / "out" / "predictions.csv")) == 2


def random_dinov2(path: Path, seed: int) -> Path:
    torch.manual_seed(seed)
    model = timm.create_model("vit_small_patch14_dinov2", pretrained=False, img_size=112,
                              num_classes=0)  # fmt: skip
    torch.save(model.state_dict(), path)
    return path


def test_backbone_weights_must_be_the_training_stores(synth_dataset, tmp_path):
    """A model trained on DINOv2 features (random ViT-S/14 weights) predicts with those
    weights, and refuses any others, naming both digests."""
    rows = [r for r in read_manifest(synth_dataset).rows if r.split == "train"]
    rows = [r for label in sorted({r.label for r in rows})[:2] for r in rows if r.label == label]
    manifest_path = tmp_path / "train.csv"
    write_manifest(rows[:2] + rows[6:8], manifest_path)  # 2 classes, 2 videos each
    manifest = read_manifest(manifest_path)
    weights, other = random_dinov2(tmp_path / "a.pth", 0), random_dinov2(tmp_path / "b.pth", 1)
    extract_tracks(manifest, tmp_path / "tracks.zarr",
                   TracksConfig(tracker="lk", grid=4, min_distance=4, subset=16),
                   workers=0, progress=False)  # fmt: skip
    extract_features(
        manifest, tmp_path / "features.zarr",
        FeaturesConfig(backbone="dinov2_vits14", preprocess=Preprocess(size=112)),
        weights=weights, workers=0, progress=False,
    )  # fmt: skip
    run = train(config_from_dict(dict(
        tracks=str(tmp_path / "tracks.zarr"), features=str(tmp_path / "features.zarr"),
        manifest=str(manifest_path), out=str(tmp_path / "run"), way=2, shot=1, train_queries=1,
        episodes=2, epochs=1, val_episodes=0, test_episodes=0, width=16, heads=2, workers=0,
    )))  # fmt: skip
    clips = read_manifest(synth_dataset).rows
    support = write_list(tmp_path / "support.csv", [clips[0], clips[6]])
    query = write_list(tmp_path / "query.csv", [clips[1]])
    args = ["--checkpoint", run.best_checkpoint, "--support", support, "--query", query]

    code, _, stderr = invoke(*args, "--out", tmp_path / "other", "--backbone-weights", other)
    line = one_line_error(code, stderr)
    assert (f"the backbone weights here (sha256 {file_sha256(other)}) are not those of the "
            f"stores {run.best_checkpoint} was trained on (sha256 {file_sha256(weights)})"
            ) in line  # fmt: skip
    assert not (tmp_path / "other").exists()  # refused before anything was written
    code, stdout, stderr = invoke(*args, "--out", tmp_path / "same", "--backbone-weights", weights)
    assert code == 0, stdout + stderr
    assert len(read_predictions(tmp_path / "same" / "predictions.csv")) == 1
    shutil.rmtree(tmp_path / "same")


def test_a_tracker_on_another_device_is_a_warning_other_settings_an_error(tmp_path):
    # CoTracker3 names its precision inside its mode: bf16 on CUDA, fp32 on a CPU.
    def identity(precision: str, passes: int = 1) -> dict:
        mode = f"offline; passes={passes}; precision={precision}; resolution=384x512"
        return {"name": "cotracker3", "checkpoint_sha256": "ab" * 32, "mode": mode}

    checkpoint = tmp_path / "best.pt"
    with pytest.warns(UserWarning, match="precision here is 'fp32', the stores .* have 'bf16'"):
        check_identity("tracker", identity("fp32"), identity("bf16"), checkpoint)
    with pytest.raises(ValueError, match="mode here is 'offline; passes=7; resolution"):
        check_identity("tracker", identity("bf16", passes=7), identity("bf16"), checkpoint)


def test_running_sum_prototypes_equal_the_stacked_ones():
    # 3 classes of 9, 1 and 13 support clips, fed in batches that split and join classes.
    tokens = torch.randn(23, 4, 6, 8, generator=torch.Generator().manual_seed(0))
    classes = [range(0, 9), range(9, 10), range(10, 23)]
    for dtype in (torch.float32, torch.bfloat16):  # bf16: tokens of a CUDA autocast
        prototypes = Prototypes()
        for start, stop in [(0, 4), (4, 11), (11, 12), (12, 23)]:
            for c, rows in enumerate(classes):
                mine = range(max(start, rows.start), min(stop, rows.stop))
                if len(mine):
                    prototypes.add(c, tokens[mine.start : mine.stop].to(dtype))
        stacked = [
            prototype_frames(tokens.to(dtype), torch.tensor([list(rows)]))[0] for rows in classes
        ]
        assert torch.equal(prototypes.frames(3), torch.stack(stacked))


def test_predict_matches_the_stacked_prototypes_batch_by_batch(synth_stores, checkpoint):
    state = load_checkpoint(checkpoint)
    model = load_model(state, torch.device("cpu"))
    data = EpisodeData.open(synth_stores.tracks, synth_stores.features, synth_stores.manifest)
    options = evaluation_options(state["config"])
    rt = Runtime.setup("cpu", "off", 0, 2)
    test = data.classes("test", 6, 2)
    class_rows = [test.rows[0][:5].tolist(), test.rows[1][:1].tolist(), test.rows[2][:4].tolist()]
    query_rows = [int(r[-1]) for r in test.rows[:3]]
    distances = match(model, data, class_rows, query_rows, options, rt, batch_clips=3)
    # The same batches of clips, their tokens stacked, each prototype from its stack.
    rows = np.array([r for c in class_rows for r in c] + query_rows)
    with torch.no_grad():
        tokens = torch.cat(
            [embed(model, b) for b in rt.loader(data.clips(rows, options), batch_size=3)]
        )
        first = np.cumsum([0] + [len(c) for c in class_rows])
        class_frames = torch.cat(
            [prototype_frames(tokens, torch.arange(a, b)[None]) for a, b in pairwise(first)]
        )
        expected = hausdorff_distances(frame_embeddings(tokens[first[-1] :]), class_frames)
    assert distances.shape == (3, 3) and torch.equal(distances, expected)


def test_one_support_class_warns_and_no_cell_starts_a_formula(checkpoint, held_out, tmp_path):
    """One support class: every query gets it with score 1.0, so the run warns (exit 0, as
    before). Ids and labels that a spreadsheet would run as formulas (=, +, -, @) are written
    with a ' in front in predictions.csv and failed.csv; other cells are as given."""
    name = sorted(held_out)[0]
    clips = held_out[name]
    label = '=HYPERLINK("http://example.com","open")'
    support = tmp_path / "support.csv"
    with open(support, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["video_id", "path", "label"])
        writer.writerows([["+1", clips[0].path, label], ["plain", clips[1].path, label]])
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(b"not a video")
    query = tmp_path / "query.csv"
    query.write_text(f"video_id,path\n-2+3,{clips[2].path}\n@SUM(1),{clips[3].path}\n"
                     f"ok_id,{clips[4].path}\n=broken,{broken}\n")  # fmt: skip
    out = tmp_path / "out"
    with pytest.warns(UserWarning, match="one class") as caught:  # printed as "warning: ..."
        code, stdout, stderr = invoke(
            "--checkpoint", checkpoint, "--support", support, "--query", query, "--out", out
        )
    assert code == 1, stdout + stderr  # the broken query
    assert [str(w.message) for w in caught if "one class" in str(w.message)] == [
        f"{support}: one class ({label!r}): every query is predicted as it, with score 1.0; "
        f"list clips of two or more classes to tell them apart"
    ]
    rows = read_predictions(out / "predictions.csv")
    assert [r["video_id"] for r in rows] == ["'-2+3", "'@SUM(1)", "ok_id"]
    assert {r["predicted"] for r in rows} == {"'" + label}
    assert [float(r[f"score_{label}"]) for r in rows] == [1.0, 1.0, 1.0]
    failed = list(csv.DictReader(open(out / "failed.csv")))
    assert [f["video_id"] for f in failed] == ["'=broken"]
