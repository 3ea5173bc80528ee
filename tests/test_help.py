"""Every command's --help follows the same rules: values named plainly (INTEGER, PATH, STORE;
never a Python type such as <str,Path> or {store}), every default shown one way (typer's
`[default: X]`, and the value the command really takes), required options marked, units
given; renamed options keep their old names, hidden, for one release (docs/changelog.md)."""

from __future__ import annotations

import re
from dataclasses import MISSING, fields
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from tats.cli import app as tats_app
from tats.cli.common import Command, Group
from tats.cli.extract import app as extract_app
from tats.cli.options import RENAMED
from tats.cli.train import app as train_app
from tats.pipeline.features import FeaturesConfig
from tats.pipeline.tracks import TracksConfig
from tats.train_config import TrainConfig

ROOT = Path(__file__).resolve().parent.parent
PROGRAMS = {"tats": tats_app, "tats-extract": extract_app, "tats-train": train_app}
# Options whose value may come from a file as well, so typer cannot mark them.
REQUIRED_HERE_OR_IN_A_FILE = {("tats-train",): ("tracks", "features", "manifest", "out"),
                              ("tats", "train"): ("tracks", "features", "manifest", "out")}
# Quantities: their help names a unit.
UNIT_NAMES = re.compile(r"size|side|timeout|distance|fps|^time$")
UNITS = ("px", "pixels", "seconds", "frames per second", "videos", "hours")
TYPE_NAMES = re.compile(r"<(int|str|float|path|bool|text|integer)[^>]*>|\{[a-z_]+\}", re.I)


def commands() -> list[tuple[tuple[str, ...], object]]:
    """(program and sub-command path, click command) of every command, groups included."""
    found = []

    def walk(path, command):
        found.append((path, command))
        for name, sub in sorted(getattr(command, "commands", {}).items()):
            walk((*path, name), sub)

    for program, app in PROGRAMS.items():
        walk((program,), typer.main.get_command(app))
    return found


COMMANDS = commands()
LEAVES = [(path, c) for path, c in COMMANDS if not hasattr(c, "commands")]
# Groups with options of their own (`tats weights`) list them as commands do.
CHECKED = LEAVES + [(path, c) for path, c in COMMANDS if isinstance(c, Group)]


def records(command) -> list[tuple[object, str, str]]:
    ctx = command.make_context(command.name, [], resilient_parsing=True)
    sections = command.help_records(ctx)
    return sections["Arguments"] + sections["Options"]


def run_help(path: tuple[str, ...]) -> str:
    result = CliRunner().invoke(PROGRAMS[path[0]], [*path[1:], "--help"], terminal_width=100)
    assert result.exit_code == 0, result.output
    return result.output


def default_text(value) -> str:
    if isinstance(value, tuple):
        return ",".join(map(str, value))
    return str(value)


def shown_default(text: str) -> str | None:
    match = re.search(r"\[default: ([^\]]*?)(; required)?\]$", text)
    return match.group(1) if match else None


def test_every_command_is_found():
    names = {" ".join(path) for path, _ in COMMANDS}
    for name in ("tats run", "tats predict", "tats manifest check", "tats viz queries",
                 "tats-extract tracks", "tats-extract sbatch", "tats-train", "tats weights",
                 "tats weights download", "tats manifest from-folders"):  # fmt: skip
        assert name in names


@pytest.mark.parametrize("path", [p for p, _ in CHECKED], ids=" ".join)
def test_help_names_values_plainly(path):
    command = dict(COMMANDS)[path]
    assert isinstance(command, Command | Group), f"{' '.join(path)}: not a tats Command"
    output = run_help(path)
    usage = output.splitlines()[0]
    assert not TYPE_NAMES.search(output), f"{' '.join(path)}: a Python type in --help"
    assert re.fullmatch(r"Usage: \S+( \S+)* \[OPTIONS\]( \[?[A-Z_]+(\.\.\.)?\]?(\.\.\.)?)*",
                        usage), usage  # fmt: skip
    for param, name, _ in records(command):
        if getattr(param, "is_flag", False):
            continue
        assert re.fullmatch(r"[A-Z][A-Z_]*( [A-Z][A-Z_]*)*", param.metavar), (path, name)


@pytest.mark.parametrize("path", [p for p, _ in CHECKED], ids=" ".join)
def test_defaults_are_shown_one_way(path):
    for param, name, text in records(dict(COMMANDS)[path]):
        where = f"{' '.join(path)} {name}"
        # "default" appears only in the one marker, at the end
        assert len(re.findall(r"\bdefault\b", text)) == (shown_default(text) is not None), where
        assert not re.search(r"(^|\s)\[[^\]\s]{1,12}\]\.?(\s|$)", text.replace("[required]", "")), (
            f"{where}: a default in brackets of its own: {text!r}"
        )
        assert "(default" not in text and "[default]" not in text, where
        # every option with a value of its own shows it
        has_default = param.default is not None and param.default != [] and param.show_default
        if has_default and not (getattr(param, "is_flag", False) and not param.secondary_opts):
            assert shown_default(text) is not None, f"{where}: default {param.default!r} not shown"
        if param.required:
            assert text.endswith("[required]"), where
    for name in REQUIRED_HERE_OR_IN_A_FILE.get(path, ()):
        text = next(t for p, _, t in records(dict(COMMANDS)[path]) if p.name == name)
        assert text.endswith("[required]"), f"{' '.join(path)} --{name}: not marked required"


def config_defaults(*classes) -> dict:
    found = {}
    for cls in classes:
        for f in fields(cls):
            if f.default is not MISSING:
                found.setdefault(f.name, f.default)
    return found


@pytest.mark.parametrize(
    "path, classes",
    [(("tats-train",), (TrainConfig,)), (("tats", "train"), (TrainConfig,)),
     (("tats", "run"), (TrainConfig, TracksConfig, FeaturesConfig))],  # fmt: skip
    ids=["tats-train", "tats train", "tats run"],
)
def test_layered_options_show_the_default_they_take(path, classes):
    """tats-train and tats run take their options from a recipe and a file too, so typer's
    default is None; the default they show is the config's."""
    defaults = config_defaults(*classes)
    flags = {False: ("stored-subset", "no-cluster-sampling", "no-augment", "off"),
             True: ("fresh-subset", "cluster-sampling", "augment", "on")}  # fmt: skip
    checked = 0
    for param, name, text in records(dict(COMMANDS)[path]):
        if param.name not in defaults or param.name in ("tracks", "features", "manifest", "out"):
            continue
        shown, value = shown_default(text), defaults[param.name]
        assert shown is not None, f"{' '.join(path)} {name}: no default shown"
        checked += 1
        if value is None or param.name in ("fixes", "protocol"):
            continue  # "the feature dim", "off": words for None; fixes, protocol: by --recipe
        if isinstance(value, bool):
            assert shown in flags[value], (name, shown)
        elif isinstance(value, float):
            assert float(shown) == value, (name, shown, value)
        else:
            assert shown == default_text(value), (name, shown, value)
    assert checked >= (8 if path == ("tats", "run") else 30)


@pytest.mark.parametrize("path", [p for p, _ in CHECKED], ids=" ".join)
def test_quantities_name_their_unit(path):
    for param, name, text in records(dict(COMMANDS)[path]):
        if param.param_type_name == "option" and UNIT_NAMES.search(param.name):
            assert any(unit in text.lower() for unit in UNITS), f"{' '.join(path)} {name}: no unit"


def test_the_wordings_the_issue_named():
    """--device of the extraction stages and of tats run says nothing of the few-shot model;
    the features stage's --fps is not the "track" time base; tats-train shows the defaults of
    --sampling, --amp, --fresh-subset and --resume."""
    for path in (("tats-extract", "tracks"), ("tats-extract", "features"), ("tats", "run")):
        text = {p.name: t for p, _, t in records(dict(COMMANDS)[path])}
        assert "few-shot" not in text["device"] and "predict" not in text["device"], path
    fps = {p.name: t for p, _, t in records(dict(COMMANDS)[("tats-extract", "features")])}["fps"]
    assert "Track time base" not in fps and "frames per second" in fps
    train = {p.name: t for p, _, t in records(dict(COMMANDS)[("tats-train",)])}
    assert [shown_default(train[n]) for n in ("sampling", "amp", "fresh_subset", "resume")] == [
        "nearest", "auto", "stored-subset", "off"
    ]
    import_tracks = run_help(("tats-extract", "import-tracks"))
    assert "--from LAYOUT DIR" in import_tracks and "<str,Path>" not in import_tracks


@pytest.mark.parametrize("command", sorted(RENAMED))
def test_renamed_options_keep_their_old_names_hidden(command):
    """Each old name is accepted (with a warning) and parses as the new one, is not listed
    in --help, and the docs' changelog names both."""
    path = {"tracks": ("tats-extract", "tracks"), "features": ("tats-extract", "features"),
            "run": ("tats", "run"), "predict": ("tats", "predict"),
            "viz queries": ("tats", "viz", "queries"),
            "train": ("tats-train",)}[command]  # fmt: skip
    click_command = dict(COMMANDS)[path]
    output = run_help(path)
    changelog = (ROOT / "docs" / "changelog.md").read_text()
    for old, new in RENAMED[command].items():
        old_flag = "--" + old.replace("_", "-")
        assert old_flag not in re.findall(r"--[a-z-]+", output.split("Options:")[1]), old_flag
        assert f"`{old_flag}`" in changelog and f"`{new}`" in changelog, (command, old_flag)
        ctx = click_command.make_context(path[-1], [old_flag, "7"], resilient_parsing=True)
        value = ctx.params[new.removeprefix("--").replace("-", "_")]
        assert value in ("7", 7, ["7"]) or str(value) == "7", (command, old_flag, value)


def test_an_old_name_warns_once_in_one_line():
    result = CliRunner().invoke(
        extract_app, ["features", "--weights", "w.pth", "--weights=x.pth", "--help"]
    )
    assert result.exit_code == 0
    warnings = [line for line in result.output.splitlines() if line.startswith("warning:")]
    assert warnings == [
        "warning: --weights is now --backbone-weights; the old name goes in the next release"
    ]
