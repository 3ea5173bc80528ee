"""Point trackers behind one small protocol, looked up by name.

A tracker takes the frames of one clip, (T, H, W, 3) uint8 RGB, and queries (N, 3) as
(t, x, y) in pixels of those frames, and returns tracks (T, N, 2) float32 as (x, y) pixels and
visibility (T, N) bool. Queries may come from several query frames in one call.

Every tracker tracks each point from its query frame to the last frame. With `backward=True`
it also tracks each point from its query frame back to the first frame, as the official
CoTracker predictor's `backward_tracking=True` does: the frames before a point's query frame
hold a track of the time-reversed clip from the query point. With `backward=False` what those
frames hold is the tracker's own choice (its docstring says what: `lk` tracks them backwards
all the same, `cotracker3` holds the query point there, invisible); the TATs pipeline hides
them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Protocol

import numpy as np


@dataclass(frozen=True)
class TrackerIdentity:
    """What produced a set of tracks; written into the tracks store for provenance."""

    name: str
    implementation: str
    checkpoint_sha256: str | None = None
    mode: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)


class Tracker(Protocol):
    identity: TrackerIdentity

    def track(
        self, frames: np.ndarray, queries: np.ndarray, *, backward: bool = False
    ) -> tuple[np.ndarray, np.ndarray]:
        """Track `queries` (N, 3) = (t, x, y) through `frames` (T, H, W, 3) uint8; `backward`:
        before each query frame too (see the module docstring)."""
        ...

    def track_batch(
        self, clips: Sequence[tuple[np.ndarray, np.ndarray]], *, backward: bool = False
    ) -> list[tuple[np.ndarray, np.ndarray]]:
        """Track several (frames, queries) clips; trackers that can batch override this."""
        ...


TrackerFactory = Callable[..., Tracker]
_TRACKERS: dict[str, TrackerFactory] = {}


def register_tracker(name: str) -> Callable[[TrackerFactory], TrackerFactory]:
    """Class or function decorator adding a tracker factory to the registry under `name`."""

    def add(factory: TrackerFactory) -> TrackerFactory:
        if name in _TRACKERS:
            raise ValueError(f"tracker {name!r} is already registered")
        _TRACKERS[name] = factory
        return factory

    return add


def list_trackers() -> list[str]:
    _import_builtin()
    return sorted(_TRACKERS)


def create_tracker(
    name: str, *, checkpoint: str | Path | None = None, device: str = "cpu", **kwargs
) -> Tracker:
    """Build the tracker registered as `name` (weights from `checkpoint` where it has any)."""
    _import_builtin()
    if name not in _TRACKERS:
        raise ValueError(f"unknown tracker {name!r}; available: {', '.join(sorted(_TRACKERS))}")
    try:
        return _TRACKERS[name](checkpoint=checkpoint, device=device, **kwargs)
    except TypeError as error:  # an option this tracker does not have
        raise ValueError(f"tracker {name!r}: {error}") from None


def _import_builtin() -> None:
    # Imported lazily so that `import tats` stays light; each module registers itself and
    # must import without optional packages (the official adapter checks for `cotracker`
    # when it is created, not when it is imported).
    from tats.pipeline.trackers import cotracker3, lk, official  # noqa: F401
