"""Unit leases between two holders: a frozen holder whose unit was taken over neither keeps
its taker's lease alive nor deletes it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from stage_helpers import lease_intervals

from tats.pipeline.leases import UnitLeases, read_lease


def test_a_holder_that_lost_its_unit_neither_touches_nor_deletes_the_takers_lease(tmp_path):
    with UnitLeases(tmp_path, timeout=0.6) as frozen:  # heartbeat every 0.1 s
        assert frozen.claim(3)
        path = frozen.path(3)
        # The holder stalls past the timeout (as under SIGSTOP): its lease goes stale and
        # another worker takes the unit over.
        past = time.time() - 10
        os.utime(path, (past, past))
        with UnitLeases(tmp_path, timeout=5) as taker:
            frozen._stop.set()  # the stalled holder's heartbeat is not running ...
            frozen._thread.join()
            assert taker.claim(3) and taker.holds(3) and not frozen.holds(3)
            taker._stop.set()  # (the taker's own heartbeat would hide the loser's touch)
            taker._thread.join()
            frozen._stop.clear()  # ... until it wakes up, still listing the unit as its own
            frozen._thread = None
            frozen._start_heartbeat()
            stamped = time.time() - 30
            os.utime(path, (stamped, stamped))
            time.sleep(0.4)
            assert read_lease(path).heartbeat == stamped, "the loser touched the taker's lease"
            frozen.release(3)
            assert taker.holds(3), "the loser deleted the taker's lease"
        assert not path.exists()  # the taker released its own


def test_an_unreadable_lease_is_taken_over_once_stale(tmp_path):
    # A holder that died between creating its lease and writing it (file systems without
    # hard links) leaves an empty file: it must not block the unit forever.
    with UnitLeases(tmp_path, timeout=0.5) as leases:
        path = leases.path(0)
        path.write_text("")
        assert not leases.claim(0)  # fresh: its writer may still be at it
        past = time.time() - 5
        os.utime(path, (past, past))
        assert leases.claim(0) and leases.holds(0)


def test_a_holder_killed_before_logging_its_claim_still_shows_in_the_lease_log(tmp_path):
    # A worker SIGKILLed after its lease file exists and before its claim is logged held the
    # unit all the same: the taker's log says since when (the dead lease's claim time), so
    # that the held-once check of the fault tests sees both holders (it saw only the taker's,
    # which made tests/test_faults.py's Dask kill test fail now and then under load).
    created = subprocess.run(
        [sys.executable, "-c", "import os, signal, sys\n"
         "from tats.pipeline.leases import UnitLeases\n"
         "leases = UnitLeases(sys.argv[1])\n"
         "print(leases.holder.id, leases._create(leases.path(2), 2), flush=True)\n"
         "os.kill(os.getpid(), signal.SIGKILL)\n", str(tmp_path / "leases")],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert created.returncode == -signal.SIGKILL, created.stderr
    dead, claimed = created.stdout.split()
    with UnitLeases(tmp_path / "leases") as taker:
        assert taker.claim(2)
    spans = sorted(lease_intervals(tmp_path)[2])
    assert [holder for _, _, holder in spans] == [dead, taker.holder.id]
    assert spans[0][0] == float(claimed) and spans[0][1] <= spans[1][0]
