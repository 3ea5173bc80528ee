"""Helpers for the end-to-end tests of the extraction stages (real processes, real stores)."""

import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from tats.manifest import VideoRow, read_manifest, write_manifest
from tats.pipeline.leases import read_log
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


def run_timed(stage: str, manifest, out: Path, options: list[str]) -> float:
    """Run the stage to the end; its wall time in seconds."""
    tic = time.perf_counter()
    code, _, stderr = finish(start(stage, manifest, out, *options))
    assert code == 0, stderr
    return time.perf_counter() - tic


def kill_repeatedly(
    stage: str, manifest, out: Path, options: list[str], duration: float, seed: int, kills: int = 5
) -> int:
    """Start the stage and SIGKILL it at random moments until `kills` kills or it finishes.

    Kill moments are drawn within the first half of `duration`, the wall time of a whole
    uninterrupted run (start-up included), so a run is killed at any stage of its life on any
    machine. Checks after every kill that no unit recorded as finished was redone.
    """
    rng = np.random.default_rng(seed)
    finished: dict[str, str] = {}
    done = 0
    while done < kills:
        run = start(stage, manifest, out, *options)
        time.sleep(rng.uniform(0.15, 0.55) * duration)
        if run.poll() is not None:
            break
        run.send_signal(signal.SIGKILL)
        run.wait()
        done += 1
        now = records(out) if out.exists() else {}
        for name, text in finished.items():
            assert now[name] == text, f"{name} was extracted again"
        finished = now
    return done


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
    that died holds until the takeover that names it (or forever, if nobody took over)."""
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
