"""The exit codes every command shares: a command's own exit passes through, the library's
errors become one line and their code, anything unexpected is a bug (its traceback, exit 4)."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest
import typer

from tats.cli.common import BAD_INPUT, INFRASTRUCTURE, INTERNAL, OK, SOME_FAILED, input_errors
from tats.manifest import ManifestError
from tats.pipeline.executors import InfrastructureError
from tats.video import VideoError


def exit_code(error: BaseException) -> int:
    with pytest.raises(typer.Exit) as exited, input_errors():
        raise error
    return exited.value.exit_code


@pytest.mark.parametrize("code", [OK, SOME_FAILED])
def test_a_commands_own_exit_passes_through(code, capsys):
    assert exit_code(typer.Exit(code)) == code
    assert capsys.readouterr().err == ""


def test_library_errors_are_one_line_with_their_code(capsys):
    cases = [
        (ManifestError("m.csv:3: duplicate video_id 'a'"), BAD_INPUT),
        (VideoError("clip.mp4", "no video stream"), BAD_INPUT),
        (ValueError("episodes must be at least 1, not 0"), BAD_INPUT),
        (InfrastructureError("2 units did not finish on Dask"), INFRASTRUCTURE),
        (OSError(errno.ENOSPC, "No space left on device", "s.zarr/c/0"), INFRASTRUCTURE),
    ]
    for error, code in cases:
        assert exit_code(error) == code
        lines = capsys.readouterr().err.splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), lines
    assert lines == ["error: s.zarr/c/0: No space left on device; finished work is kept, "
                     "rerun to resume"]  # fmt: skip


def test_an_unexpected_error_is_a_bug_exit_4_with_its_traceback(capsys):
    assert exit_code(KeyError("holder")) == INTERNAL
    err = capsys.readouterr().err
    assert err.startswith("Traceback (most recent call last):")
    assert err.splitlines()[-1] == (
        "error: internal error (KeyError): please report it with its traceback"
    )


# ---------------------------------------------------------------------------------------------
# Bad input to the commands: exit 2 and one line naming the file and its problem, before any
# work (real checkpoints saved by the trainer, real stores, real files).

TINY = dict(
    way=3, shot=1, train_queries=1, episodes=2, epochs=1, val_episodes=0, test_episodes=4,
    width=16, heads=2, workers=0, log_every=1,
)  # fmt: skip


def invoke(*args) -> tuple[int, str, str]:
    from typer.testing import CliRunner

    from tats.cli import app

    result = CliRunner().invoke(app, [str(a) for a in args])
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.stdout, result.stderr


def one_line(code: int, stdout: str, stderr: str) -> str:
    """The one error line of a command that exited 2."""
    assert code == BAD_INPUT, stdout + stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    return lines[0].removeprefix("error: ")


def trained(stores, out: Path, **options) -> Path:
    """The best checkpoint of a tiny training run on `stores` (run folder `out`)."""
    from tats.train import train
    from tats.train_config import config_from_dict

    values = dict(tracks=str(stores.tracks), features=str(stores.features),
                  manifest=str(stores.manifest), out=str(out), **TINY, **options)  # fmt: skip
    return train(config_from_dict(values)).best_checkpoint


@pytest.fixture(scope="module")
def tats_run(synth_stores, tmp_path_factory) -> Path:
    """A run folder holding one tiny TATs model trained on the synth stores (folder `tats`)."""
    run = tmp_path_factory.mktemp("exit_codes") / "run"
    trained(synth_stores, run / "tats")
    return run


@pytest.fixture
def lists(synth_stores, tmp_path) -> tuple[Path, Path]:
    """Support (2 classes, 1 clip each) and query (2 clips) lists of test videos."""
    from tats.manifest import read_manifest

    rows = [r for r in read_manifest(synth_stores.manifest).rows if r.split == "test"]
    first, second = rows[0], next(r for r in rows if r.label != rows[0].label)
    support, query = tmp_path / "support.csv", tmp_path / "query.csv"
    support.write_text(f"video_id,path,label\n{first.video_id},{first.path},{first.label}\n"
                       f"{second.video_id},{second.path},{second.label}\n")  # fmt: skip
    query.write_text(f"video_id,path\n{rows[1].video_id},{rows[1].path}\n")
    return support, query


def checkpoint_commands(checkpoint: Path, stores, lists, tmp_path: Path) -> dict[str, list]:
    """`tats predict`, `tats-train --eval-only` and `tats viz episode` with `checkpoint`."""
    support, query = lists
    stored = ["--tracks", stores.tracks, "--features", stores.features,
              "--manifest", stores.manifest]  # fmt: skip
    return {
        "predict": ["predict", "--checkpoint", checkpoint, "--support", support, "--query",
                    query, "--out", tmp_path / "predicted", "--workers", "0", "--no-progress"],
        "eval-only": ["train", "--eval-only", "--checkpoint", checkpoint, *stored, "--out",
                      tmp_path / "evaluated", "--test-episodes", "4", "--workers", "0"],
        "viz episode": ["viz", "episode", "--checkpoint", checkpoint, *stored, "--out",
                        tmp_path / "episode.png"],
    }  # fmt: skip


def damaged_checkpoints(best: Path, folder: Path) -> dict[Path, str]:
    """Checkpoints that load but are damaged, each with the problem its line must name."""
    import torch

    from tats.checkpoints import load_checkpoint, save_checkpoint

    def save(name: str, change) -> Path:
        state = load_checkpoint(best)
        change(state)
        save_checkpoint(folder / name, state)
        return folder / name

    key = "proj.weight"
    shape = list(load_checkpoint(best)["model"][key].shape)
    return {
        save("no_model_config.pt", lambda s: s.pop("model_config")):
            "damaged checkpoint: no model_config",
        save("wrong_shape.pt", lambda s: s["model"].update({key: torch.zeros(3, 16)})):
            f"damaged checkpoint: the weights do not fit its model_config: wrong shape {key} "
            f"[3, 16] (the model's {shape})",
        save("bad_data.pt", lambda s: s["data"].update(tracks="tracks.zarr")):
            "damaged checkpoint: its data does not record the tracks store's config",
        save("bad_model_config.pt", lambda s: s["model_config"].update(depth="two")):
            "damaged checkpoint: its model_config:",
        save("bad_config.pt", lambda s: s["config"].update(way=0)):
            "damaged checkpoint: its training config:",
        save("nan_weights.pt", lambda s: s["model"][key].fill_(float("nan"))):
            f"damaged checkpoint: weights {key} hold NaN or infinity",
    }  # fmt: skip


def test_a_damaged_checkpoint_is_refused_before_any_work(synth_stores, tats_run, lists, tmp_path):
    """predict, eval-only and viz episode check the whole checkpoint (its configs, its weights
    loaded into the model, its record of the training stores) first: exit 2, one line, and
    predict extracts nothing (it found out after extracting both stores: a traceback, exit 4)."""
    best = tats_run / "tats" / "checkpoints" / "best.pt"
    for checkpoint, problem in damaged_checkpoints(best, tmp_path).items():
        for command, args in checkpoint_commands(checkpoint, synth_stores, lists,
                                                 tmp_path).items():  # fmt: skip
            line = one_line(*invoke(*args))
            assert line.startswith(f"{checkpoint}: {problem}"), (command, line)
        assert not (tmp_path / "predicted").exists()  # nothing extracted, nothing written


def test_files_that_are_not_checkpoints_say_what_they_are(synth_stores, tats_run, lists, tmp_path):
    best = tats_run / "tats" / "checkpoints" / "best.pt"
    empty, text = tmp_path / "empty.pt", tmp_path / "notes.pt"
    empty.write_bytes(b"")
    text.write_text("best epoch 3\n")
    cases = {
        best.parent: f"{best.parent}: is a folder, not a checkpoint file",
        empty: f"{empty}: empty file (0 bytes), not a checkpoint file",
        text: f"{text}: not a checkpoint file: it holds text ('best epoch 3'), neither a "
        "PyTorch file (torch.save) nor safetensors",
    }
    for checkpoint, expected in cases.items():
        for command, args in checkpoint_commands(checkpoint, synth_stores, lists,
                                                 tmp_path).items():  # fmt: skip
            assert one_line(*invoke(*args)) == expected, command


def test_eval_and_viz_refuse_stores_unlike_the_training_stores(
    synth_stores, semantic_stores, tats_run, lists, tmp_path
):
    """A Trokens checkpoint (semantic-query tracks) on TATs grid stores: refused as predict
    refuses, naming the setting that differs (it printed an accuracy, exit 0)."""
    trokens = trained(semantic_stores, tmp_path / "trokens", method="trokens")
    commands = checkpoint_commands(trokens, synth_stores, lists, tmp_path)
    for command in ("eval-only", "viz episode"):
        line = one_line(*invoke(*commands[command]))
        assert line.startswith(
            f"{synth_stores.tracks} was made with other tracks settings than the stores "
            f"{trokens} was trained on: grid is 6 (trained on 16); queries is 'uniform:8' "
            f"(trained on 'semantic'); "
        ), (command, line)
        assert "; semantic is None (trained on {'method': 'bipartite', " in line
    assert not (tmp_path / "evaluated").exists() and not (tmp_path / "episode.png").exists()
    # The other way round: the model (no relative offsets) would take any points, and a TATs
    # checkpoint printed an accuracy on Trokens' stores.
    tats = tats_run / "tats" / "checkpoints" / "best.pt"
    commands = checkpoint_commands(tats, semantic_stores, lists, tmp_path)
    for command in ("eval-only", "viz episode"):
        line = one_line(*invoke(*commands[command]))
        assert line.startswith(
            f"{semantic_stores.tracks} was made with other tracks settings than the stores "
            f"{tats} was trained on: grid is 16 (trained on 6); queries is 'semantic' (trained "
            f"on 'uniform:8'); "
        ), (command, line)
    # The stores it was trained on evaluate.
    commands = checkpoint_commands(trokens, semantic_stores, lists, tmp_path)
    code, stdout, stderr = invoke(*commands["eval-only"])
    assert code == OK and stdout.splitlines()[-1].startswith("test: "), stdout + stderr


def test_path_mistakes_exit_2_before_any_work(tats_run, lists, tmp_path):
    """`tats predict --out` an existing file, `tats report` where report.md is a folder: exit 2
    first (they were exit 3, "rerun to resume", after the work)."""
    support, query = lists
    best = tats_run / "tats" / "checkpoints" / "best.pt"
    taken = tmp_path / "results.txt"
    taken.write_text("my notes\n")
    line = one_line(*invoke("predict", "--checkpoint", best, "--support", support, "--query",
                            query, "--out", taken, "--workers", "0", "--no-progress"))  # fmt: skip
    assert line == (f"{taken}: a file, not a folder; --out is the folder the stores and "
                    f"predictions go to")  # fmt: skip
    assert taken.read_text() == "my notes\n"

    (tats_run / "report.md").mkdir()
    try:
        line = one_line(*invoke("report", tats_run))
    finally:
        (tats_run / "report.md").rmdir()
    assert line == f"{tats_run / 'report.md'}: a folder; the report is written as this file"
    assert not (tats_run / "tracks.png").exists() and not list(tats_run.glob("*.png"))


def test_a_timing_without_its_start_names_the_entry(tats_run, tmp_path):
    """A timings.json entry without `started` (hand-edited, or another tool's): exit 2 naming
    the file and the entry (it was a KeyError, exit 4)."""
    import json
    import shutil

    run = tmp_path / "run"
    shutil.copytree(tats_run, run)
    timings = run / "timings.json"
    timings.write_text(json.dumps([{"stage": "tracks", "started": 1.0e9, "seconds": 2.0},
                                   {"stage": "features", "seconds": 3.0}]))  # fmt: skip
    line = one_line(*invoke("report", run))
    assert line == f"{timings}: entry 2 (features) has no 'started' (a Unix time in seconds)"
