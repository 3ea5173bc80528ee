"""Randomized faults on stage one's bookkeeping (issue 28): rounds of N processes on one store,
killed (SIGKILL or SIGTERM) at random moments and at each commit point of a unit, with random
units-map bytes and lease files damaged between rounds; then a rerun. The store must equal a
single-process store value for value, `verify` must exit 0, no finished unit may be computed
again, no unit held by two processes at once, and no lease may be left.

Seeded and bounded: TATS_FAULT_TRIALS trials (default 1, a few seconds each), seeds
TATS_FAULT_SEED (default 0) onwards; `TATS_FAULT_TRIALS=30 pytest tests/test_faults_random.py`
runs more. docs/clusters.md's fault table records the trials run. The processes run the
counting stage of tests/fault_stages.py (its worker script kills itself at a commit point);
stores, leases, signals and processes are real.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
from fault_stages import FAULT_POINTS, CountingRecipe, fake_videos
from stage_helpers import arrays, assert_each_unit_held_once_at_a_time, assert_same, records
from typer.testing import CliRunner

from tats.cli.extract import app
from tats.pipeline.executors import extract
from tats.pipeline.leases import LeaseHolder
from tats.pipeline.status import store_status, verify_store

TRIALS = int(os.environ.get("TATS_FAULT_TRIALS", "1"))
FIRST_SEED = int(os.environ.get("TATS_FAULT_SEED", "0"))
WORKER = str(Path(__file__).parent / "fault_stages.py")
IDS = [f"v{i:02d}" for i in range(17)] + ["fixable", "v17", "v18"]  # 10 units of 2
SHARD, LEASE_TIMEOUT, DELAY = 2, 120.0, 0.02  # live holders never go stale here
# Exit codes a process of a fault round may end with: done, failed videos (the broken one),
# terminated (143, or -15 before its handler was set), killed.
ROUND_CODES = {0, 1, 143, -15, -9}


def _start(folder: Path, out: Path, kill: str | None, rng) -> subprocess.Popen:
    count = int(rng.integers(1, 4))
    options = [f"shard_size={SHARD}", f"lease_timeout={LEASE_TIMEOUT}", "max_attempts=50",
               f"workers={rng.integers(0, 2)}", f"shard_index={rng.integers(0, count)}",
               f"num_shards={count}"]  # fmt: skip
    env = {**os.environ, "FAULT_DELAY": str(DELAY)}
    if kill:
        env["FAULT_KILL"] = kill
    return subprocess.Popen(
        [sys.executable, WORKER, str(folder), str(out), ",".join(IDS), *options],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def _round(folder: Path, out: Path, point: str, rng) -> list[tuple[int, str]]:
    """N processes at once: one killed at the commit point `point`, some at random moments."""
    n = int(rng.integers(2, 5))
    signal_at = "" if rng.random() < 0.7 else ":TERM"
    kills = [f"{point}:{rng.integers(1, 4)}{signal_at}"] + [None] * (n - 1)
    runs = [_start(folder, out, kill, rng) for kill in kills]
    moments = {i: time.monotonic() + rng.uniform(0.2, 2.0)
               for i in range(1, n) if rng.random() < 0.6}  # fmt: skip
    while any(run.poll() is None for run in runs):
        for i, when in list(moments.items()):
            if time.monotonic() >= when:
                if runs[i].poll() is None:
                    runs[i].send_signal(signal.SIGKILL if rng.random() < 0.7 else signal.SIGTERM)
                del moments[i]
        time.sleep(0.01)
    ended = []
    for run in runs:
        _, stderr = run.communicate(timeout=300)
        ended.append((run.returncode, stderr))
    return ended


def _damage(out: Path, rng) -> None:
    """Random units-map bytes, and lease files of unexpected shapes or dead holders (all dead
    or stale: no live process holds them) on random units."""
    units = -(-len(IDS) // SHARD)
    map_path = out / "ledger" / "units.map"
    if map_path.exists():
        with open(map_path, "r+b") as f:
            for unit in rng.choice(units, size=int(rng.integers(1, 4)), replace=False):
                f.seek(int(unit))
                f.write(bytes([int(rng.choice([0, 1, 2, 3, 255]))]))
    (out / "leases").mkdir(exist_ok=True)
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout.strip()  # fmt: skip
    local = LeaseHolder.me()
    free = [u for u in range(units) if not (out / "leases" / f"unit-{u:06d}.lease").exists()]
    # On units no lease file names (a lease replaced by hand would leave its holder's span in
    # the lease logs open, which the held-once check cannot tell from a second holder).
    for unit in rng.choice(free, size=min(len(free), int(rng.integers(1, 3))), replace=False):
        dead_here = {**asdict(local), "id": f"dead-{gone}", "pid": int(gone), "start": 1}
        remote = {**asdict(local), "id": "node-9-1-0badc0de", "host": "node-9"}
        shapes = [
            "{}",
            '{"holder": {"id": "x", "ho',
            json.dumps({"holder": dead_here, "unit": int(unit), "claimed": time.time()}),
            json.dumps({"holder": {**remote, "gpu": 0}, "unit": int(unit), "claimed": 0}),
            json.dumps({"holder": {k: v for k, v in remote.items() if k != "pid_namespace"},
                        "unit": int(unit), "claimed": 0}),  # fmt: skip
        ]
        path = out / "leases" / f"unit-{int(unit):06d}.lease"
        path.write_text(shapes[int(rng.integers(len(shapes)))])
        old = time.time() - 3600  # dead holders on this host are seen at once; others by age
        os.utime(path, (old, old))


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict:
    folder = tmp_path_factory.mktemp("random_reference")
    manifest = fake_videos(folder, IDS)
    summary = extract(CountingRecipe(SHARD), manifest, folder / "s.zarr", workers=0,
                      progress=False)  # fmt: skip
    assert summary.videos_done == len(IDS)
    return arrays(folder / "s.zarr")


@pytest.mark.parametrize("seed", range(FIRST_SEED, FIRST_SEED + TRIALS))
def test_random_kills_and_damage_resume_to_the_single_process_store(reference, tmp_path, seed):
    rng = np.random.default_rng(seed)
    fake_videos(tmp_path, IDS)
    out = tmp_path / "s.zarr"
    broken = tmp_path / "fixable.broken"
    broken.touch()  # fails in every fault round: retried, with kills, never finished
    finished: dict[str, str] = {}
    for point in rng.permutation(FAULT_POINTS):
        for code, stderr in _round(tmp_path, out, str(point), rng):
            assert code in ROUND_CODES, (seed, point, code, stderr)
        now = records(out) if out.exists() else {}
        for name, text in finished.items():  # a finished unit is never computed again
            assert now[name] == text, (seed, f"{name} was computed again")
        finished = {n: t for n, t in now.items() if not json.loads(t)["failed"]}
        if out.exists():
            _damage(out, rng)
    broken.unlink()
    for _ in range(3):  # a rerun; again only where a lease was too fresh to be taken
        run = subprocess.run(
            [sys.executable, WORKER, str(tmp_path), str(out), ",".join(IDS),
             f"shard_size={SHARD}", f"lease_timeout={LEASE_TIMEOUT}", "max_attempts=50",
             "workers=0"],
            capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        assert run.returncode == 0, (seed, run.stderr)
        if not list((out / "leases").glob("unit-*.lease")):
            break
        time.sleep(LEASE_TIMEOUT)
    assert_same(arrays(out), reference)
    assert verify_store(out, progress=False) == []
    result = CliRunner().invoke(app, ["verify", str(out), "--no-progress"])
    assert result.exit_code == 0, (seed, result.output)
    status = store_status(out, LEASE_TIMEOUT)
    assert status.complete and status.in_progress == [] and status.abandoned == []
    assert not list((out / "leases").glob("unit-*.lease")), seed
    assert_each_unit_held_once_at_a_time(out)
