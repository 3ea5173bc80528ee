"""The documentation: the MkDocs site builds with --strict (no broken link, anchor or page),
and every command line quoted in README.md and docs/ names commands and options that exist."""

from __future__ import annotations

import importlib.util
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tats.cli import app as tats_app
from tats.cli.extract import app as extract_app
from tats.cli.train import app as train_app

ROOT = Path(__file__).resolve().parent.parent
PROGRAMS = {"tats": tats_app, "tats-extract": extract_app, "tats-train": train_app}


def code_lines(markdown: str) -> list[str]:
    """The lines of a Markdown text's code blocks (fenced, or indented by 4 spaces), with
    backslash continuations joined and heredoc bodies left out."""
    lines, fenced, heredoc = [], False, None
    for raw in markdown.splitlines():
        if raw.strip().startswith("```"):
            fenced = not fenced
            continue
        if not (fenced or raw.startswith("    ")):
            continue
        line = raw.strip()
        if heredoc is not None:
            heredoc = None if line == heredoc else heredoc
            continue
        if lines and lines[-1].endswith("\\"):
            lines[-1] = lines[-1][:-1] + " " + line
        else:
            lines.append(line)
        match = re.search(r"<<-?\s*'?\"?(\w+)", line)
        if match:
            heredoc = match.group(1)
    return lines


def commands(markdown: str) -> list[list[str]]:
    """The quoted command lines of tats' programs and `make`, as argument lists."""
    found = []
    for line in code_lines(markdown):
        try:
            words = shlex.split(line, comments=True)
        except ValueError:
            continue
        words = [w.removeprefix(".venv/bin/") for w in words]
        if words and words[0] == "torchrun":  # torchrun ... --no-python tats-train ...
            words = words[next((i for i, w in enumerate(words) if w in PROGRAMS), len(words)) :]
        if words and (words[0] in PROGRAMS or words[0] == "make"):
            found.append(words)
    return found


def make_targets() -> set[str]:
    text = (ROOT / "Makefile").read_text()
    return set(re.findall(r"^([A-Za-z0-9_.-]+)\s*:(?!=)", text, flags=re.M))


def check_command(words: list[str]) -> None:
    """Fail unless the command's sub-command path and options exist: `--help` is eager, so
    it answers once the words parse (a renamed command or option does not parse)."""
    line = " ".join(words)
    if words[0] == "make":
        missing = [t for t in words[1:] if not t.startswith("-") and "=" not in t]
        missing = [t for t in missing if t not in make_targets()]
        assert not missing, f"`{line}`: no Makefile target {missing}"
        return
    result = CliRunner().invoke(PROGRAMS[words[0]], [*words[1:], "--help"])
    assert result.exit_code == 0 and "Usage:" in result.output, (
        f"`{line}` does not run with --help (exit {result.exit_code}):\n{result.output}"
    )


def test_the_readme_stays_short():
    lines = len((ROOT / "README.md").read_text().splitlines())
    assert lines <= 250, f"README.md has {lines} lines: the manual's pages are in docs/"


def test_readme_quotes_only_commands_that_exist():
    quoted = commands((ROOT / "README.md").read_text())
    # The README's two commands and its quickstart are found: the parser reads its blocks.
    assert ["make", "demo"] in quoted and ["make", "test"] in quoted
    assert any(words[:2] == ["tats", "predict"] for words in quoted)
    for words in quoted:
        check_command(words)


@pytest.mark.parametrize("page", sorted(p.name for p in (ROOT / "docs").glob("*.md")))
def test_docs_pages_quote_only_commands_that_exist(page):
    for words in commands((ROOT / "docs" / page).read_text()):
        check_command(words)


def test_a_renamed_command_or_option_is_caught():
    check_command(["tats-extract", "import-tracks", "--from", "tats-pkl", "dir", "--help"])
    for renamed in (
        ["tats-extract", "import-points", "--from", "tats-pkl", "dir"],
        ["tats", "predict", "--checkpoints", "best.pt"],
        ["make", "demos"],
    ):
        with pytest.raises(AssertionError):
            check_command(renamed)


@pytest.mark.skipif(
    importlib.util.find_spec("mkdocs") is None,
    reason="mkdocs is not installed: pip install -e '.[docs]' (the dev extra includes it)",
)
def test_the_site_builds_strictly(tmp_path):
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    build = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
    )
    assert build.returncode == 0, build.stdout + build.stderr
    assert (tmp_path / "index.html").is_file() and (tmp_path / "clusters" / "index.html").is_file()
