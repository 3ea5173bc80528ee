"""What every command shares: exit codes, one-line errors, and a graceful SIGTERM."""

from __future__ import annotations

import traceback
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

import click
import typer

from tats.termination import Terminated, sigterm_raises

# Commands print library warnings as one plain line, not as source locations.
warnings.formatwarning = lambda message, category, *args, **kwargs: f"warning: {message}\n"

# Exit codes of the extraction and training commands: 0 all done; 1 some videos failed (they
# are listed; a rerun retries them); 2 bad input (nothing was computed from it); 3 the
# infrastructure failed (a full disk, a permission, lost cluster workers): finished work is
# kept and a rerun resumes; 4 an error in tats itself (its traceback is printed).
OK, SOME_FAILED, BAD_INPUT, INFRASTRUCTURE, INTERNAL = 0, 1, 2, 3, 4


def fail(message: str, code: int = BAD_INPUT) -> typer.Exit:
    """Print `message` as one line on stderr; return the exit to raise (code 2)."""
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(code)


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__


@contextmanager
def input_errors() -> Iterator[None]:
    """Turn the library's errors into one line on stderr: bad input (a video a command was
    given that cannot be read included) exits 2, the failures of
    the machine (OSError but a missing input file, lost Dask workers) exit 3. Anything else is
    a bug: its traceback, then one line, exit 4 (not 1, which says that videos failed)."""
    from tats.manifest import ManifestError
    from tats.pipeline.executors import InfrastructureError
    from tats.stores import StoreError
    from tats.video import VideoError

    try:
        yield
    except (ManifestError, StoreError, VideoError, ValueError, FileNotFoundError) as error:
        raise fail(_one_line(error)) from None
    except InfrastructureError as error:
        raise fail(_one_line(error), INFRASTRUCTURE) from None
    except OSError as error:
        where = f"{error.filename}: " if error.filename else ""
        problem = error.strerror or _one_line(error)
        message = f"{where}{problem}; finished work is kept, rerun to resume"
        raise fail(message, INFRASTRUCTURE) from None
    except (typer.Exit, typer.Abort, click.exceptions.Exit, click.exceptions.ClickException,
            click.exceptions.Abort):  # fmt: skip
        raise  # a command's own exit
    except Exception as error:
        traceback.print_exc()
        message = f"internal error ({type(error).__name__}): please report it with its traceback"
        raise fail(message, INTERNAL) from None


@contextmanager
def graceful_termination() -> Iterator[None]:
    """SIGTERM (Slurm's scancel, a preemption) ends the command as Ctrl-C does: the shard
    being written is finished, leases are released, decoders stopped; exit 143 (130 for
    Ctrl-C)."""

    try:
        with sigterm_raises():
            yield
    except KeyboardInterrupt as interrupt:
        what = "terminated" if isinstance(interrupt, Terminated) else "interrupted"
        typer.echo(f"error: {what}; finished units are kept, rerun to resume", err=True)
        raise typer.Exit(143 if isinstance(interrupt, Terminated) else 130) from None
