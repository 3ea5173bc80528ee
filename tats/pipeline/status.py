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

from tats.pipeline.leases import read_lease
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
    abandoned: list[str] = field(default_factory=list)  # leases of holders known to be dead

    @property
    def videos_pending(self) -> int:
        return self.rows - self.videos_done - len(self.failures)

    @property
    def complete(self) -> bool:
        return self.units_done == self.units


def store_status(path: str | Path) -> StoreStatus:
    """Counts from the ledger (records read one at a time) and the leases present. A lease
    whose holder ran on this host and PID namespace and whose process is gone is listed as
    abandoned: the next run takes its unit over at once."""
    store = RowStore.open(path)
    status = StoreStatus(store.path, store.schema, store.num_rows, len(store.shards()))
    recorded = 0
    for record in Ledger(store.ledger_dir).iter_records():
        recorded += 1
        status.videos_done += len(record.done)
        status.failures += record.failed
        if record.failed:
            status.units_failed += 1
        else:
            status.units_done += 1
    status.units_pending = status.units - recorded
    for lease_path in sorted(store.lease_dir.glob("unit-*.lease")):
        lease = read_lease(lease_path)
        if lease is None:
            continue
        since = (
            f"unit {lease.unit}: {lease.holder}, claimed {time.time() - lease.claimed:.0f} s "
            f"ago, last heartbeat {lease.age():.0f} s ago"
        )
        if lease.holder.gone():
            status.abandoned.append(f"{since} (its process is gone)")
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
                problem = f"holds data in {', '.join(holds)} but is not done" if holds else None
            if problem:
                problems.append(f"row {row} (unit {unit}): {problem}")
    return problems


def _is_fill(value: np.ndarray, fill) -> bool:
    return bool(np.all(value == np.asarray(fill, dtype=value.dtype)))
