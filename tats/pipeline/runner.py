"""Runs a stage over its work units: decode in worker processes, compute here, write shards.

A stage is two parts. Its `loader` is a small picklable callable that turns a manifest row
into decoded input (frames) in a worker process; its `compute` turns a batch of loaded inputs
into one row of arrays each, in this process (where the GPU is). Decoding runs ahead of
compute, so the two overlap. A unit's rows are gathered in memory and written as one shard,
then its ledger record is written; a rerun skips finished units and retries failed rows.
"""

from __future__ import annotations

import multiprocessing
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
from tqdm import tqdm

from tats.manifest import Manifest, VideoRow
from tats.pipeline.ledger import Failure, Ledger, UnitRecord
from tats.stores import RowStore, row_digest
from tats.video import VideoError


class Stage(Protocol):
    loader: Callable[[VideoRow], Any]
    batch_size: int

    def compute(self, rows: list[VideoRow], inputs: list[Any]) -> list[dict[str, np.ndarray]]:
        """One dict of arrays (a store row) per input."""
        ...


@dataclass
class Loaded:
    row: VideoRow
    data: Any = None
    error: str | None = None
    seconds: float = 0.0


@dataclass
class RunSummary:
    units: int = 0
    units_skipped: int = 0
    videos_done: int = 0
    failures: list[Failure] = field(default_factory=list)

    def add(self, other: RunSummary) -> None:
        self.units += other.units
        self.units_skipped += other.units_skipped
        self.videos_done += other.videos_done
        self.failures += other.failures


def run_stage(
    stage: Stage,
    store: RowStore,
    manifest: Manifest,
    units: Sequence[int],
    workers: int = 2,
    progress: bool = True,
    desc: str = "videos",
) -> RunSummary:
    """Process `units` of `store` (skipping finished ones); returns what was done and failed."""
    ledger = Ledger(store.ledger_dir)
    shards = store.shards()
    summary = RunSummary()
    todo: list[tuple[int, UnitRecord | None, list[int]]] = []
    for unit in units:
        record = ledger.read(unit)
        if record is not None and not record.failed:
            summary.units_skipped += 1
            continue
        rows = list(shards[unit]) if record is None else [f.row for f in record.failed]
        todo.append((unit, record, rows))
    all_rows = [manifest.rows[r] for _, _, rows in todo for r in rows]
    bar = tqdm(total=len(all_rows), desc=desc, unit="video", disable=not progress, smoothing=0.1)
    # Shards are written by a background thread while the next unit computes; one write at
    # a time, so at most two units' rows are held in memory.
    with _Prefetcher(stage.loader, all_rows, workers) as stream, ThreadPoolExecutor(1) as writer:
        writing: Future | None = None
        for unit, record, rows in todo:
            buffers, result = _run_unit(stage, store, unit, shards[unit], record, rows, stream, bar)
            if writing is not None:
                writing.result()
            writing = writer.submit(_commit, store, ledger, shards[unit], buffers, result)
            summary.units += 1
            summary.videos_done += len(result.done) - (len(record.done) if record else 0)
            summary.failures += result.failed
        if writing is not None:
            writing.result()
    bar.close()
    return summary


def _commit(
    store: RowStore, ledger: Ledger, shard: range, buffers: dict, record: UnitRecord
) -> None:
    """Write a unit's shard, then its record: a record exists only for a whole shard."""
    tic = time.perf_counter()
    store.write_rows(shard, buffers)
    record.seconds["write"] = round(time.perf_counter() - tic, 3)
    ledger.write(record)


def _run_unit(
    stage: Stage,
    store: RowStore,
    unit: int,
    shard: range,
    record: UnitRecord | None,
    rows: list[int],
    loaded_stream: Iterator[Loaded],
    bar: tqdm,
) -> tuple[dict[str, np.ndarray], UnitRecord]:
    """Load and compute a unit's rows into shard buffers; returns them and the unit's record."""
    started = time.perf_counter()
    seconds = {"decode": 0.0, "compute": 0.0}
    # A retry keeps the rows done before: read the shard back and rewrite it whole.
    buffers = store.empty_rows(len(shard)) if record is None else store.read_rows(shard)
    done = dict(record.done) if record else {}
    failed: list[Failure] = []
    for start in range(0, len(rows), stage.batch_size):
        batch = [next(loaded_stream) for _ in rows[start : start + stage.batch_size]]
        seconds["decode"] += sum(item.seconds for item in batch)
        good = [item for item in batch if item.error is None]
        failed += [Failure(i.row.row, i.row.video_id, i.error) for i in batch if i.error]
        tic = time.perf_counter()
        for item, result in zip(good, _compute(stage, good), strict=True):
            if isinstance(result, str):
                failed.append(Failure(item.row.row, item.row.video_id, result))
                continue
            for name, value in result.items():
                buffers[name][item.row.row - shard.start] = value
            done[item.row.row] = row_digest(buffers, item.row.row - shard.start)
        seconds["compute"] += time.perf_counter() - tic
        bar.update(len(batch))
        if failed:
            bar.set_postfix(failed=len(failed), refresh=False)
    seconds["total"] = time.perf_counter() - started
    result = UnitRecord(
        unit=unit,
        rows=(shard.start, shard.stop),
        done=dict(sorted(done.items())),
        failed=failed,
        seconds={k: round(v, 3) for k, v in seconds.items()},
        attempt=record.attempt + 1 if record else 1,
    )
    return buffers, result


def _compute(stage: Stage, items: list[Loaded]) -> list[dict[str, np.ndarray] | str]:
    """Results per item; an item that fails on its own becomes its error message."""
    if not items:
        return []
    try:
        return stage.compute([i.row for i in items], [i.data for i in items])
    except Exception as error:  # noqa: BLE001 - a bad clip must not stop the run
        if len(items) == 1:
            return [f"{type(error).__name__}: {error}"]
        return [r for item in items for r in _compute(stage, [item])]


def _load(loader: Callable[[VideoRow], Any], row: VideoRow) -> Loaded:
    tic = time.perf_counter()
    try:
        data = loader(row)
    except Exception as error:  # noqa: BLE001 - a bad video must not stop the run
        if not isinstance(error, VideoError):  # VideoError names the file itself
            error = f"{row.path}: {type(error).__name__}: {error}"
        return Loaded(row, error=str(error), seconds=time.perf_counter() - tic)
    return Loaded(row, data, seconds=time.perf_counter() - tic)


def _worker_init() -> None:
    # One thread per decoding process: the processes are the parallelism.
    import torch

    torch.set_num_threads(1)


class _Prefetcher:
    """Loads rows in order, `2 * workers` ahead, in worker processes (or inline with 0).

    A decoder that crashes its process (some corrupt files do) breaks the pool; the pool is
    restarted and each row then in flight is loaded again alone, so only the row that crashes
    on its own is recorded as failed.
    """

    def __init__(self, loader: Callable[[VideoRow], Any], rows: list[VideoRow], workers: int):
        self.loader, self.rows, self.workers = loader, rows, workers
        self.pool: ProcessPoolExecutor | None = None

    def __enter__(self) -> Iterator[Loaded]:
        return self._stream()

    def __exit__(self, *exc) -> None:
        if self.pool is not None:
            self.pool.shutdown(cancel_futures=True)

    def _new_pool(self, workers: int) -> ProcessPoolExecutor:
        if self.pool is not None:
            self.pool.shutdown(cancel_futures=True)
        # Forked workers start at once (spawned ones re-import torch, seconds each); they only
        # decode, never touch the GPU or the store, as with torch's DataLoader workers.
        methods = multiprocessing.get_all_start_methods()
        context = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
        self.pool = ProcessPoolExecutor(workers, mp_context=context, initializer=_worker_init)
        return self.pool

    def _stream(self) -> Iterator[Loaded]:
        if self.workers <= 0 or not self.rows:
            for row in self.rows:
                yield _load(self.loader, row)
            return
        pool = self._new_pool(self.workers)
        pending: deque[tuple[VideoRow, Future]] = deque()
        upcoming = iter(self.rows)

        def top_up() -> None:
            while len(pending) < 2 * self.workers:
                row = next(upcoming, None)
                if row is None:
                    return
                pending.append((row, pool.submit(_load, self.loader, row)))

        top_up()
        while pending:
            row, future = pending.popleft()
            try:
                yield future.result()
            except BrokenProcessPool:
                yield self._load_alone(row)
                in_flight = [r for r, _ in pending]
                pending.clear()
                pool = self._new_pool(self.workers)
                for r in in_flight:
                    pending.append((r, pool.submit(_load, self.loader, r)))
            top_up()

    def _load_alone(self, row: VideoRow) -> Loaded:
        pool = self._new_pool(1)
        try:
            return pool.submit(_load, self.loader, row).result()
        except BrokenProcessPool:
            return Loaded(row, error=f"{row.path}: the decoder crashed its process")
