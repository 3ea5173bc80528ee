"""`tats-extract status` and `verify`: what a store's ledger and leases say, and whether its
data agrees. Both read the ledger one record at a time; `verify` spreads the units over
processes."""

from __future__ import annotations

import multiprocessing
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from tats.pipeline.leases import DEFAULT_TIMEOUT, lease_unit, read_lease
from tats.pipeline.ledger import Failure, Ledger
from tats.stores import RowStore, row_digest, row_problem


@dataclass
class StoreStatus:
    path: Path
    schema: str
    rows: int
    units: int
    units_done: int = 0
    units_failed: int = 0  # finished, but with failed videos to retry
    units_pending: int = 0
    videos_done: int = 0
    failures: list[Failure] = field(default_factory=list)
    in_progress: list[str] = field(default_factory=list)  # units with a live lease: who, since
    abandoned: list[str] = field(default_factory=list)  # leases of dead holders: who, what next

    @property
    def videos_pending(self) -> int:
        return self.rows - self.videos_done - len(self.failures)

    @property
    def complete(self) -> bool:
        return self.units_done == self.units


def store_status(path: str | Path, lease_timeout: float = DEFAULT_TIMEOUT) -> StoreStatus:
    """Counts from the ledger (records read one at a time) and the leases present. A lease is
    in progress while its holder lives; it is abandoned where its holder ran on this host and
    PID namespace and its process is gone, where its last heartbeat is older than
    `lease_timeout` (the runs' --lease-timeout), or where the file cannot be read as a lease:
    a run takes such a unit over, or, if the unit is finished, removes the lease."""
    store = RowStore.open(path)
    status = StoreStatus(store.path, store.schema, store.num_rows, len(store.shards()))
    recorded = set()
    for record in Ledger(store.ledger_dir).iter_records():
        recorded.add(record.unit)
        status.videos_done += len(record.done)
        status.failures += record.failed
        if record.failed:
            status.units_failed += 1
        else:
            status.units_done += 1
    status.units_pending = status.units - len(recorded)
    for lease_path in sorted(store.lease_dir.glob("unit-*.lease")):
        unit = lease_unit(lease_path.name)
        if unit is None:
            continue  # not a lease's name: nothing a run reads
        lease = read_lease(lease_path)
        then = "the next run removes it" if unit in recorded else "any run takes the unit over"
        if lease is None:
            try:
                age = time.time() - lease_path.stat().st_mtime
            except FileNotFoundError:
                continue  # released meanwhile
            status.abandoned.append(
                f"unit {unit}: {lease_path} is not a readable lease, last touched {age:.0f} s "
                f"ago ({then} once older than the {lease_timeout:.0f} s lease timeout)"
            )
            continue
        since = (
            f"unit {unit}: {lease.holder}, claimed {time.time() - lease.claimed:.0f} s "
            f"ago, last heartbeat {lease.age():.0f} s ago"
        )
        finished = " after its unit was recorded" if unit in recorded else ""
        if lease.holder.gone():
            status.abandoned.append(f"{since} (its process is gone{finished}: {then})")
        elif lease.age() > lease_timeout:
            status.abandoned.append(
                f"{since} (no heartbeat for {lease.age():.0f} s, more than the "
                f"{lease_timeout:.0f} s lease timeout: {then})"
            )
        else:
            status.in_progress.append(since)
    return status


def done_rows(store: RowStore) -> np.ndarray:
    """Rows the ledger calls done, ascending: the only rows training may read."""
    rows = [r for rec in Ledger(store.ledger_dir).iter_records() for r in rec.done]
    return np.array(sorted(rows), dtype=np.int64)


def verify_store(path: str | Path, progress: bool = True, workers: int = 1) -> list[str]:
    """Problems found (empty when the store is sound), in unit order.

    Every row the ledger calls done must hold sound data with the digest recorded when it was
    written; every other row must hold nothing. `workers` > 1: the units are verified by that
    many processes, each reading its units' shards and records.
    """
    store = RowStore.open(path)
    units = len(store.shards())
    if workers < 1:
        raise ValueError(f"--workers must be at least 1, not {workers}")
    # Batches of units small enough for a steady progress bar, large enough to amortise.
    size = max(1, min(64, units // (workers * 8) or 1))
    batches = [range(u, min(u + size, units)) for u in range(0, units, size)]
    bar = tqdm(total=units, desc="verify", unit="unit", disable=not progress)
    problems: list[str] = []
    if workers == 1:
        for batch in batches:
            problems += _verify_units(store.path, batch)
            bar.update(len(batch))
    else:
        # Spawned, not forked: zarr's event-loop thread does not survive a fork.
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(workers, mp_context=context) as pool:
            for batch, found in zip(batches, pool.map(_verify_units, [store.path] * len(batches),
                                                      batches), strict=True):  # fmt: skip
                problems += found
                bar.update(len(batch))
    bar.close()
    return problems


NOT_DONE = "but is not done"  # verify's words for a row that holds data no record calls done


def verify_advice(store: str | Path, problems: list[str]) -> list[str]:
    """What to do about `verify_store`'s problems, one line per kind: rows that hold data no
    record calls done are a write that was interrupted (a kill, a full disk, a permission
    between a shard's write and its record), which a plain rerun rewrites; done rows whose
    data differs from their record need their units' records deleted, then a rerun."""
    lines = []
    units = {
        kind: sorted({int(p.split("(unit ")[1].split(")")[0]) for p in problems
                      if (NOT_DONE in p) == (kind == "interrupted")})  # fmt: skip
        for kind in ("differs", "interrupted")
    }
    if units["differs"]:
        named = ", ".join(f"ledger/unit-{u:06d}.json" for u in units["differs"][:5])
        more = f" and {len(units['differs']) - 5} more" if len(units["differs"]) > 5 else ""
        lines.append(
            f"{store}: rows of {len(units['differs'])} units differ from what their ledger "
            f"records say: delete {named}{more} in the store, then rerun the extraction to "
            f"compute those units again"
        )
    if units["interrupted"]:
        listed = ", ".join(map(str, units["interrupted"][:10]))
        more = " ..." if len(units["interrupted"]) > 10 else ""
        lines.append(
            f"{store}: rows of units {listed}{more} hold data that no ledger record calls done "
            f"(a write interrupted by a kill, a full disk or a permission): rerun the "
            f"extraction, which rewrites them"
        )
    return lines


def _verify_units(path: Path, units: range) -> list[str]:
    store = RowStore.open(path)
    ledger = Ledger(store.ledger_dir)
    shards = store.shards()
    problems = []
    for unit in units:
        shard = shards[unit]
        data = store.read_rows(shard)
        record = ledger.read(unit)
        done = record.done if record is not None else {}
        for i, row in enumerate(shard):
            if row in done:
                one = {name: value[i] for name, value in data.items()}
                problem = row_problem(store.schema, one)
                if problem is None and row_digest(data, i) != done[row]:
                    problem = "data differs from what was written (digest mismatch)"
            else:
                holds = [
                    name for name, f in store.fields.items() if not _is_fill(data[name][i], f.fill)
                ]
                problem = f"holds data in {', '.join(holds)} {NOT_DONE}" if holds else None
            if problem:
                problems.append(f"row {row} (unit {unit}): {problem}")
    return problems


def _is_fill(value: np.ndarray, fill) -> bool:
    return bool(np.all(value == np.asarray(fill, dtype=value.dtype)))
