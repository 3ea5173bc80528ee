"""Helpers for the end-to-end tests of the extraction stages (real processes, real stores)."""

import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from tats.manifest import VideoRow, read_manifest, write_manifest
from tats.pipeline.leases import read_lease, read_log
from tats.pipeline.tracks import TracksConfig
from tats.stores import RowStore

EXTRACT = str(Path(sys.executable).parent / "tats-extract")
# The tracks stage of the end-to-end tests: LK, small shards, so that a run has several units
# to be killed between and in (`LK_OPTIONS` on the command line, `LK_CONFIG` in the library).
LK_OPTIONS = ["--tracker", "lk", "--grid", "8", "--shard-size", "3", "--no-progress"]
LK_CONFIG = TracksConfig(tracker="lk", grid=8, shard_size=3)


def live_children(pid: int) -> set[int]:
    """Live (not zombie) child processes of `pid` (Linux /proc)."""
    found = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid and fields[0] != "Z":
                found.add(int(entry.name))
    return found


def arrays(path) -> dict[str, np.ndarray]:
    store = RowStore.open(path)
    return store.read_rows(range(store.num_rows))


def assert_same(a: dict, b: dict, rows=None) -> None:
    assert a.keys() == b.keys()
    for name in a:
        x, y = (a[name], b[name]) if rows is None else (a[name][rows], b[name][rows])
        np.testing.assert_array_equal(x, y, err_msg=name)


def records(out: Path) -> dict[str, str]:
    """Ledger records by file name, as text."""
    return {p.name: p.read_text() for p in sorted((Path(out) / "ledger").glob("unit-*.json"))}


def start(stage: str, manifest, out, *options, **kwargs) -> subprocess.Popen:
    args = [EXTRACT, stage, "--manifest", str(manifest), "--out", str(out), *options]
    return subprocess.Popen(
        args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs
    )


def finish(run: subprocess.Popen) -> tuple[int, str, str]:
    stdout, stderr = run.communicate(timeout=900)
    return run.returncode, stdout, stderr


def kill_repeatedly(
    stage: str, manifest, out: Path, options: list[str], seed: int, kills: int = 5
) -> int:
    """Start the stage and SIGKILL it at seeded points of its progress until `kills` kills.

    A point is something the run did, read from the store folder, never a moment on a clock
    (a busy machine only makes the wait longer): its start-up (killed once the store exists),
    a unit it claimed and is computing (its lease, no record yet), or a ledger record it just
    wrote; the last two after 0 or 1 records of its own. Every point leaves at least one unit
    undone, so each run is killed before it finishes. Checks after every kill that no unit
    recorded as finished was redone; returns the number of kills (fewer only if a run finished
    before its point, which the points are chosen to prevent).
    """
    rng = np.random.default_rng(seed)
    finished: dict[str, str] = {}
    for done in range(kills):
        left = _units(out) - len(finished) if (Path(out) / "zarr.json").exists() else 1
        kind = rng.choice(["start-up", "claim", "record"], p=[0.2, 0.5, 0.3])
        after = int(rng.integers(0, 2))
        if kind == "record" and after + 2 > left or kind == "claim" and after + 1 > left:
            kind, after = "claim", 0
        run = start(stage, manifest, out, *options)
        while not _reached(kind, after, out, run.pid, len(finished)):
            if run.poll() is not None:
                return done
            time.sleep(0.005)
        run.send_signal(signal.SIGKILL)
        if run.wait() == 0:  # it finished between the look and the kill
            return done
        now = records(out)
        for name, text in finished.items():
            assert now[name] == text, f"{name} was extracted again"
        finished = now
    return kills


def _reached(kind: str, after: int, out: Path, pid: int, recorded: int) -> bool:
    """Whether run `pid` reached its kill point (`recorded`: records before it started)."""
    if kind == "start-up":
        return (Path(out) / "zarr.json").exists()
    new = len(records(out)) - recorded
    if kind == "record":
        return new >= after + 1
    return new >= after and _claims_unrecorded(out, pid)


def _units(out: Path) -> int:
    store = RowStore.open(out)
    return -(-store.num_rows // store.shard_size)


def _claims_unrecorded(out: Path, pid: int) -> bool:
    """Whether process `pid` holds the lease of a unit that has no ledger record yet."""
    for lease in (Path(out) / "leases").glob("unit-*.lease"):
        found = read_lease(lease)
        record = Path(out) / "ledger" / f"{lease.name.removesuffix('.lease')}.json"
        if found is not None and found.holder.pid == pid and not record.exists():
            return True
    return False


def break_two_videos(manifest: Path, tmp_path: Path, corrupt_row: int, missing_row: int) -> Path:
    """A copy of `manifest` whose `corrupt_row` video is truncated and `missing_row` absent."""
    rows = list(read_manifest(manifest).rows)
    corrupt = tmp_path / "corrupt.mp4"
    corrupt.write_bytes(rows[0].path.read_bytes()[:3000])  # cut off after the header
    for row, path in ((corrupt_row, corrupt), (missing_row, tmp_path / "gone.mp4")):
        r = rows[row]
        rows[row] = VideoRow(r.row, r.video_id, path, r.label, r.split, {})
    out = tmp_path / "broken.csv"
    write_manifest(rows, out)
    return out


def lease_intervals(out: Path) -> dict[int, list[tuple[float, float, str]]]:
    """Per unit, when each holder held it: (from, to, holder), from the leases' logs. A holder
    that died holds until the takeover that names it (or forever, if nobody took over); one
    killed between creating its lease and logging the claim holds from its lease's claim time
    (`since`, as the taker read it), or the unit's previous release if that came later."""
    held: dict[int, list[tuple[float, float, str]]] = {}
    opened: dict[tuple[int, str], float] = {}
    for event in read_log(Path(out) / "leases"):
        unit, holder = event["unit"], event["holder"]
        if event["event"] == "claim":
            opened[unit, holder] = event["time"]
            continue
        ended = event["previous"] if event["event"] == "takeover" else holder
        if (unit, ended) in opened:
            start = opened.pop((unit, ended))
            held.setdefault(unit, []).append((start, event["time"], ended))
        elif event["event"] == "takeover" and "since" in event:
            before = [end for _, end, _ in held.get(unit, []) if end <= event["time"]]
            start = max([float(event["since"]), *before])
            held.setdefault(unit, []).append((start, event["time"], ended))
    for (unit, holder), start in opened.items():
        held.setdefault(unit, []).append((start, float("inf"), holder))
    return held


def assert_each_unit_held_once_at_a_time(out: Path) -> dict[int, list[tuple[float, float, str]]]:
    """No unit was held (so computed) by two processes at the same time; returns the log."""
    held = lease_intervals(out)
    for unit, spans in held.items():
        spans = sorted(spans)
        for (_, end, holder), (start, _, other) in zip(spans, spans[1:], strict=False):
            assert end <= start, f"unit {unit} was held by {holder} and {other} at once"
    return held
