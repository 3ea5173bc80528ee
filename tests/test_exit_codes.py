"""The exit codes every command shares: a command's own exit passes through, the library's
errors become one line and their code, anything unexpected is a bug (its traceback, exit 4)."""

from __future__ import annotations

import errno

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
