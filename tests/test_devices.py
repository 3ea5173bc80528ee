"""--device auto (the default everywhere): every stage of the README's reproduction commands
runs on CUDA where there is one, on the CPU otherwise, and each stage says in one line what
it picked (device and precision), with the reason where auto found no GPU."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import torch
import typer

from tats.chain import planned_devices, stage_recipes
from tats.cli import app
from tats.cli.run import run_config
from tats.pipeline.features import FeaturesConfig, FeaturesRecipe
from tats.pipeline.tracks import TracksConfig, TracksRecipe

ROOT = Path(__file__).resolve().parent.parent


def table_commands() -> list[list[str]]:
    """The `tats run` commands of the README's reproduction table."""
    text = (ROOT / "README.md").read_text()
    lines = [line for line in text.splitlines() if line.startswith("|")]
    return [shlex.split(c) for line in lines for c in re.findall(r"`(tats run [^`]+)`", line)]


def configs():
    command = typer.main.get_command(app).commands["run"]
    for words in table_commands():
        ctx = command.make_context("run", words[2:])
        yield " ".join(words), run_config(ctx.params)


def test_the_table_has_every_recipe_row():
    assert len(table_commands()) >= 22


@pytest.mark.parametrize("cuda", [True, False], ids=["cuda", "no cuda"])
def test_the_reproduction_commands_run_every_stage_on_cuda_where_there_is_one(cuda, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    for line, config in configs():
        assert config.device == "auto" and config.train.device == "auto", line
        devices = planned_devices(config)
        assert set(devices) == {"tracks", "features", config.train_out}, line
        assert set(devices.values()) == {"cuda" if cuda else "cpu"}, (line, devices)


def test_each_stage_says_in_one_line_where_it_runs(capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    TracksRecipe(TracksConfig(tracker="lk", grid=4)).build()
    FeaturesRecipe(FeaturesConfig(backbone="pixels")).build()
    FeaturesRecipe(FeaturesConfig(backbone="pixels"), device="cpu").build()
    assert capsys.readouterr().out.splitlines() == [
        "tracks: lk on cpu, fp32 (--device auto: no CUDA device found)",
        "features: pixels on cpu, fp32 (--device auto: no CUDA device found)",
        "features: pixels on cpu, fp32",
    ]


def test_a_cuda_device_asked_for_without_one_is_refused():
    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA device")
    with pytest.raises(ValueError, match="no CUDA device; use cpu"):
        FeaturesRecipe(FeaturesConfig(backbone="pixels"), device="cuda").build()


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_auto_picks_the_gpu(capsys):
    stage = FeaturesRecipe(FeaturesConfig(backbone="pixels")).build()
    assert stage.backbone.device.type == "cuda"
    name = torch.cuda.get_device_name(0)
    assert capsys.readouterr().out.splitlines() == [f"features: pixels on cuda ({name}), fp32"]
    # the lk tracker runs on the CPU only: auto gives it the CPU, and says why
    TracksRecipe(TracksConfig(tracker="lk", grid=4)).build()
    assert capsys.readouterr().out.splitlines() == [
        "tracks: lk on cpu, fp32 (it runs on the CPU only)"
    ]


def test_precision_reaches_both_stages_and_run_json():
    command = typer.main.get_command(app).commands["run"]
    words = ["-m", "ssv2.csv", "-o", "runs/x", "--recipe", "tats/ssv2_small", "--precision", "fp32"]
    config = run_config(command.make_context("run", words).params)
    tracks, features = stage_recipes(config)
    assert tracks.precision == features.precision == "fp32"
    assert config.to_dict()["extraction"]["precision"] == "fp32"
    default = run_config(command.make_context("run", words[:-2]).params)
    assert [r.precision for r in stage_recipes(default)] == ["auto", "auto"]


def test_a_precision_a_model_lacks_is_refused_before_any_work():
    with pytest.raises(ValueError, match="precision must be one of auto, fp32, bf16, not 'half'"):
        FeaturesRecipe(FeaturesConfig(backbone="pixels"), precision="half")
    with pytest.raises(ValueError, match="the lk tracker computes in fp32 only, not 'bf16'"):
        TracksRecipe(TracksConfig(tracker="lk", grid=4), precision="bf16").build()
    with pytest.raises(ValueError, match="backbone 'pixels' computes in fp32 only, not 'bf16'"):
        FeaturesRecipe(FeaturesConfig(backbone="pixels"), precision="bf16").build()
    assert TracksRecipe(TracksConfig(tracker="lk", grid=4), precision="fp32").build()
