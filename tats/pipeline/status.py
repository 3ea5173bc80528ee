"""`tats-extract status` and `verify`: what a store's ledger and leases say, and whether its
data agrees."""

from __future__ import annotations

import time
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
    in_progress: list[str] = field(default_factory=list)  # pending units with a lease: who, since

    @property
    def videos_pending(self) -> int:
        return self.rows - self.videos_done - len(self.failures)

    @property
    def complete(self) -> bool:
        return self.units_done == self.units


def store_status(path: str | Path) -> StoreStatus:
    store = RowStore.open(path)
    records = Ledger(store.ledger_dir).records()
    status = StoreStatus(store.path, store.schema, store.num_rows, len(store.shards()))
    for unit in range(status.units):
        record = records.get(unit)
        lease = read_lease(store.lease_dir / f"unit-{unit:06d}.lease")
        if lease is not None:
            status.in_progress.append(
                f"unit {unit}: {lease.holder}, claimed {time.time() - lease.claimed:.0f} s ago, "
                f"last heartbeat {lease.age():.0f} s ago"
            )
        if record is None:
            status.units_pending += 1
            continue
        status.videos_done += len(record.done)
        status.failures += record.failed
        if record.failed:
            status.units_failed += 1
        else:
            status.units_done += 1
    return status


def done_rows(store: RowStore) -> np.ndarray:
    """Rows the ledger calls done, ascending: the only rows training may read."""
    records = Ledger(store.ledger_dir).records()
    return np.array(sorted(r for rec in records.values() for r in rec.done), dtype=np.int64)


def verify_store(path: str | Path, progress: bool = True) -> list[str]:
    """Problems found (empty when the store is sound).

    Every row the ledger calls done must hold sound data with the digest recorded when it was
    written; every other row must hold nothing.
    """
    store = RowStore.open(path)
    records = Ledger(store.ledger_dir).records()
    problems = []
    shards = store.shards()
    for unit in tqdm(range(len(shards)), desc="verify", unit="unit", disable=not progress):
        shard = shards[unit]
        data = store.read_rows(shard)
        done = records[unit].done if unit in records else {}
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
