"""The clock that times the stages of a run: each stage's wall time appended to the run
folder's timings.json, which `tats run` writes and `tats report` reads.

    with stage_clock("runs/demo", "tracks"):     # appends to runs/demo/timings.json
        ...
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

TIMINGS = "timings.json"


@contextmanager
def stage_clock(run_dir: str | Path, stage: str) -> Iterator[None]:
    """Time the block and, when it ends without an error, add its wall time to
    `run_dir/timings.json` under `stage` (a resumed stage adds a second entry)."""
    started, tic = time.time(), time.perf_counter()
    yield
    record_time(run_dir, stage, started, time.perf_counter() - tic)


def record_time(run_dir: str | Path, stage: str, started: float, seconds: float) -> None:
    """Append one timed run of `stage` to `run_dir/timings.json` (rewritten atomically)."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    entries = read_timings(run_dir)
    entries.append({"stage": stage, "started": round(started, 3), "seconds": round(seconds, 3)})
    tmp = run_dir / f".{TIMINGS}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(entries, indent=1) + "\n")
    os.replace(tmp, run_dir / TIMINGS)


def read_timings(run_dir: str | Path) -> list[dict]:
    """The timed runs recorded in `run_dir` (none: an empty list)."""
    path = Path(run_dir) / TIMINGS
    if not path.is_file():
        return []
    try:
        entries = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}:{error.lineno}: {error.msg}") from None
    if not isinstance(entries, list):
        raise ValueError(f"{path}: expected a list of timed stages")
    for i, entry in enumerate(entries, 1):
        if not isinstance(entry, dict) or not isinstance(entry.get("stage"), str):
            raise ValueError(f"{path}: entry {i} is not a timed stage ({{\"stage\": ...}})")
        for key, what in (("started", "a Unix time"), ("seconds", "its duration")):
            value = entry.get(key)
            if isinstance(value, bool) or not isinstance(value, int | float):
                found = "no" if value is None else f"{value!r} for its"
                raise ValueError(
                    f"{path}: entry {i} ({entry['stage']}) has {found} {key!r} ({what} in "
                    f"seconds)"
                )
    return entries
