"""One check of the whole resolved run before any work: every bad value of a recipe, an
options file or the command line, a wrong name, missing or wrong weights, splits too small
for the episodes, videos not where the manifest says, too little disk: exit 2 with one line
naming the file (or option) and key, and no store, no run folder; --print-config alike."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from tats.cli import app
from tats.preflight import PreflightWarning
from tats.recipes import RECIPES

SMALL = {"way": 3, "shot": 1, "train_queries": 1, "test_queries": 1, "episodes": 2, "epochs": 1,
         "val_episodes": 2, "test_episodes": 2, "width": 16, "heads": 2}  # fmt: skip
WEIGHT_FREE = ["--tracker", "lk", "--grid", "4", "--backbone", "pixels", "--views", "1"]


def run(manifest: Path, out: Path, *options, print_config: bool = False):
    args = ["run", "-m", str(manifest), "-o", str(out), *map(str, options), "--no-progress"]
    result = CliRunner().invoke(app, args + (["--print-config"] if print_config else []))
    return result.exit_code, result.output


def recipe_with(tmp_path: Path, table: str, key: str, value: str) -> Path:
    """tats/hmdb's recipe with `key` of `[table]` set to `value` (TOML)."""
    lines, section = (RECIPES / "tats" / "hmdb.toml").read_text().splitlines(), None
    for i, line in enumerate(lines):
        if line.startswith("["):
            section = line.strip("[] ").split("]")[0]
        elif section == table and re.match(rf"{key}\s*=", line):
            lines[i] = f"{key} = {value}"
            break
    else:
        raise AssertionError(f"no {key} in [{table}]")
    path = tmp_path / f"{table}-{key}.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def file_with(tmp_path: Path, text: str, suffix: str = ".toml") -> Path:
    path = tmp_path / f"options{suffix}"
    path.write_text(text)
    return path


@pytest.fixture
def train_json(tmp_path) -> Path:
    return file_with(tmp_path, json.dumps(SMALL), ".json")


def bad_cases(tmp_path: Path, train_json: Path) -> dict[str, tuple[list, str]]:
    """Options -> the start of the one line that must refuse them."""
    return {
        "way = five": (["--recipe", recipe_with(tmp_path, "train", "way", '"five"')],
                       '[train] way = "five": expected an integer'),
        "lr = fast": (["--train-config", file_with(tmp_path, 'lr = "fast"\n')],
                      'options.toml: lr = "fast": expected a number'),
        "epochs = 2.5": (["--train-config", file_with(tmp_path, "epochs = 2.5\n", ".t.toml")],
                         "epochs = 2.5: expected an integer"),
        "shot = true": (["--train-config", file_with(tmp_path, "shot = true\n", ".s.toml")],
                        "shot = true: expected an integer"),
        "views = 2.5": (["--recipe", recipe_with(tmp_path, "features", "views", "2.5")],
                        "[features] views = 2.5: expected an integer"),
        "grid = four": (["--recipe", recipe_with(tmp_path, "tracks", "grid", '"four"')],
                        '[tracks] grid = "four": expected an integer'),
        "epochs = 0": (["--train-config", file_with(tmp_path, '{"epochs": 0}', ".e.json")],
                       "epochs must be at least 1, not 0"),
        "--grid 0": (["--train-config", train_json, "--grid", "0"],
                     "--grid: grid must be at least 1, not 0"),
        "--tracker lkk": (["--train-config", train_json, "--tracker", "lkk"],
                          "--tracker: unknown tracker 'lkk'; available: "),
        "--backbone pixel": (["--train-config", train_json, "--backbone", "pixel"],
                             "--backbone: unknown backbone 'pixel'; available: "),
        "--method trokenz": (["--method", "trokenz"],
                             "--method: method 'trokenz' is not one of tats, trokens"),
        "trokens on grids": (["--train-config", train_json, "--method", "trokens", "--queries",
                              "uniform:8"], "--method trokens: cluster sampling reads each "
                              "point's cluster, which only semantic queries store"),
    }  # fmt: skip


@pytest.mark.parametrize("print_config", [False, True], ids=["run", "--print-config"])
def test_every_bad_value_exits_2_before_any_store(synth_small, tmp_path, train_json, print_config):
    for name, (options, message) in bad_cases(tmp_path, train_json).items():
        out = tmp_path / "runs" / name.replace(" ", "_")
        code, output = run(synth_small, out, *WEIGHT_FREE[:2], *options,
                           print_config=print_config)  # fmt: skip
        lines = output.strip().splitlines()
        assert code == 2, (name, output)
        assert len(lines) == 1 and lines[0].startswith("error: "), (name, output)
        assert message in lines[0], (name, lines[0])
        assert not out.exists(), f"{name}: {out} was made"


def test_the_lines_name_the_file_and_key(tmp_path, synth_small, train_json):
    recipe = recipe_with(tmp_path, "train", "way", '"five"')
    _, output = run(synth_small, tmp_path / "o", "--recipe", recipe)
    assert output.strip() == f'error: {recipe}: [train] way = "five": expected an integer'


def test_splits_too_small_for_the_episodes(synth_small, tmp_path):
    """24 classes of 2 videos: 5-way episodes with 6 training queries per class cannot be
    drawn (it said so after both extraction stages)."""
    out = tmp_path / "run"
    code, output = run(synth_small, out, *WEIGHT_FREE)
    assert code == 2 and not out.exists()
    assert output.strip().endswith(
        "has 0 classes with at least 7 videos (1 support + 6 queries); 5-way episodes need 5"
    )
    assert "the train split of" in output


def test_manifest_check_says_when_a_split_is_too_small(synth_small):
    result = CliRunner().invoke(app, ["manifest", "check", str(synth_small)])
    assert result.exit_code == 2
    assert "the train split of" in result.output and "5-way episodes need 5" in result.output
    ok = CliRunner().invoke(app, ["manifest", "check", str(synth_small), "--way", "3",
                                  "--train-queries", "1"])  # fmt: skip
    assert ok.exit_code == 0 and "episodes: 3-way 1-shot" in ok.output


def test_videos_not_under_the_video_root(synth_small, tmp_path, train_json):
    """A wrong --video-root: none of the videos looked for is there; the line names the
    importers' folder layouts."""
    out = tmp_path / "run"
    code, output = run(synth_small, out, *WEIGHT_FREE, "--train-config", train_json,
                       "--video-root", tmp_path / "elsewhere")  # fmt: skip
    assert code == 2 and not out.exists(), output
    assert "none of 32 videos looked for is there" in output
    assert "hmdb, ucf: <root>/videos/<class>/<video>.avi" in output


def test_some_videos_missing_is_a_warning(synth_small, tmp_path, train_json):
    data = tmp_path / "data"
    shutil.copytree(synth_small.parent, data)
    (data / "videos" / sorted(p.name for p in (data / "videos").iterdir())[0]).unlink()
    with pytest.warns(PreflightWarning, match=r"1 of 32 videos looked for are missing"):
        code, output = run(data / "manifest.csv", tmp_path / "run", *WEIGHT_FREE,
                           "--train-config", train_json, print_config=True)  # fmt: skip
    assert code == 0, output


def test_weights_missing_or_of_another_model(synth_small, tmp_path, train_json, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    out = tmp_path / "run"
    code, output = run(synth_small, out, "--train-config", train_json)
    assert code == 2 and not out.exists()
    assert "no CoTracker3 offline weights: pass --tracker-weights PATH" in output
    # a DINOv2-shaped file given as the tracker's weights
    other = tmp_path / "vit.pth"
    torch.save({"patch_embed.proj.weight": torch.zeros(8, 3, 14, 14)}, other)
    code, output = run(synth_small, out, "--train-config", train_json,
                       "--tracker-weights", other)  # fmt: skip
    assert code == 2 and not out.exists()
    assert f"{other}: not a CoTracker3 checkpoint" in output
    code, output = run(synth_small, out, "--train-config", train_json, "--tracker", "lk",
                       "--backbone-weights", other)  # fmt: skip
    assert code == 2 and not out.exists()
    assert f"{other}: no 'pos_embed'; not a DINOv2 state dict" in output


def test_too_little_disk_for_the_stores(synth_small, tmp_path, train_json, monkeypatch):
    """A disk of 1 MB free (made smaller than it is: no portable way to make a small disk)."""
    import tats.preflight

    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(tats.preflight.shutil, "disk_usage",
                        lambda path: usage._replace(free=10**6))  # fmt: skip
    out = tmp_path / "run"
    code, output = run(synth_small, out, *WEIGHT_FREE, "--views", "5", "--train-config",
                       train_json)  # fmt: skip
    assert code == 2 and not out.exists(), output
    assert "1.0 MB free, and the stores need up to" in output


def test_a_sound_run_prints_its_config_and_the_devices(synth_small, tmp_path, train_json):
    code, output = run(synth_small, tmp_path / "run", *WEIGHT_FREE, "--train-config", train_json,
                       print_config=True)  # fmt: skip
    assert code == 0, output
    shown = json.loads(output[output.index("{"):])
    assert shown["extraction"]["device"] == "auto"
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert shown["devices"] == {"tracks": "cpu", "features": expected, "train": expected}
    assert not (tmp_path / "run").exists()
