"""What every command shares: one-line errors with exit code 2 for bad input."""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager

import typer

# Commands print library warnings as one plain line, not as source locations.
warnings.formatwarning = lambda message, category, *args, **kwargs: f"warning: {message}\n"

# Exit codes of the extraction and training commands.
OK, SOME_FAILED, BAD_INPUT = 0, 1, 2


def fail(message: str) -> typer.Exit:
    """Print `message` as one line on stderr; return the exit to raise (code 2)."""
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(BAD_INPUT)


@contextmanager
def input_errors() -> Iterator[None]:
    """Turn the library's input errors into one line on stderr and exit code 2."""
    from tats.manifest import ManifestError
    from tats.stores import StoreError

    try:
        yield
    except (ManifestError, StoreError, ValueError, FileNotFoundError) as error:
        raise fail(" ".join(str(error).split()) or type(error).__name__) from None
