"""SIGTERM (Slurm's scancel, a preemption) as an exception where the main thread is, like
Ctrl-C's KeyboardInterrupt, and as a flag that long loops check.

Python drops an exception that a signal handler raises in some places (a fork's after-fork
hooks, finalizers: "Exception ignored in ..."); the flag makes the next unit claim raise it
again, so a swallowed SIGTERM still ends the run instead of letting it finish every unit.
"""

from __future__ import annotations

import signal
from collections.abc import Iterator
from contextlib import contextmanager


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread."""


_requested = False


def _handler(signum, frame) -> None:
    global _requested
    _requested = True
    raise Terminated


def check() -> None:
    """Raise Terminated if a SIGTERM arrived (and its first raise may have been dropped)."""
    if _requested:
        raise Terminated


@contextmanager
def sigterm_raises() -> Iterator[None]:
    """Within the block, SIGTERM raises Terminated (and sets the flag `check` reads)."""
    global _requested
    _requested = False
    previous = signal.signal(signal.SIGTERM, _handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
        _requested = False
