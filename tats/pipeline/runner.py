"""Runs a stage over its work units: claim a unit, decode ahead, compute, write its shard.

A stage is two parts. Its `loader` is a small picklable callable that turns a manifest row
into decoded input (frames) in a decoding process; its `compute` turns a batch of loaded
inputs into one row of arrays each, in this process (where the GPU is). Decoding runs ahead of
compute (decoders.py), so the two overlap.

Units are tried in the given order. A unit the ledger's map calls finished is skipped without
opening its record; a unit another live worker holds is passed over after a read of its lease
(no claim attempt); any other is claimed with a lease (leases.py), and its record is read after
claiming. So a process opens the records of its own share (their video stamps, checked first)
and of the units it computes, and tries a claim only where it can win one.
A unit's rows are gathered in memory; a background thread then checks that the lease is still
ours, writes the shard, fsyncs it, writes the unit's ledger record and releases the lease,
while the next unit computes. A rerun skips finished units and retries failed rows, and
refuses to resume over videos that changed since their rows were written (sources.py).

A failed video is retried once per run, whatever the number of processes: a unit whose record
was written in this run (ledger.retried_in_run) is left as it is, and so is one whose videos
failed `max_attempts` times; the process whose share holds such a unit reports its failures.
A retried unit's rows that are not done start from their fill values, never from what a killed
attempt left in the shard.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from itertools import chain, islice
from typing import Any, Protocol

import numpy as np
from tqdm import tqdm

from tats import termination
from tats.manifest import Manifest, VideoRow
from tats.pipeline import sources
from tats.pipeline.decoders import DecoderPool, Loaded
from tats.pipeline.leases import DEFAULT_TIMEOUT, Lease, LeaseHolder, UnitLeases
from tats.pipeline.ledger import (
    FINISHED,
    UNKNOWN,
    Failure,
    Ledger,
    UnitRecord,
    current_run,
    failed_in,
    retried_in_run,
    state_of,
)
from tats.stores import RowStore, StoreError, row_digest

DEFAULT_VIDEO_TIMEOUT = 600.0
DEFAULT_MAX_ATTEMPTS = 3


class Stage(Protocol):
    loader: Callable[[VideoRow], Any]
    batch_size: int

    def compute(self, rows: list[VideoRow], inputs: list[Any]) -> list[dict[str, np.ndarray]]:
        """One dict of arrays (a store row) per input."""
        ...


@dataclass(frozen=True)
class RunOptions:
    """How a stage runs (never what it computes: that is the stage's config, in the store).

    workers: decoding processes (0: decode inline, without a time limit).
    video_timeout: seconds a video may take to decode before it is failed (None: no limit).
    lease_timeout: seconds without a heartbeat after which another worker takes a unit over.
    max_attempts: times a video is tried, over all runs, before it is reported and left.
    run: the id of the run this process is part of (None: `ledger.current_run()`).
    """

    workers: int = 2
    video_timeout: float | None = DEFAULT_VIDEO_TIMEOUT
    lease_timeout: float = DEFAULT_TIMEOUT
    progress: bool = True
    max_attempts: int = DEFAULT_MAX_ATTEMPTS
    run: str | None = None

    def __post_init__(self) -> None:
        if self.workers < 0:
            raise ValueError(f"--workers must be at least 0, not {self.workers}")
        if self.video_timeout is not None and self.video_timeout <= 0:
            raise ValueError(f"--video-timeout must be positive, not {self.video_timeout}")
        if self.lease_timeout <= 0:
            raise ValueError(f"--lease-timeout must be positive, not {self.lease_timeout}")
        if self.max_attempts < 1:
            raise ValueError(f"--max-attempts must be at least 1, not {self.max_attempts}")


@dataclass
class RunSummary:
    units: int = 0  # units computed (or retried) here
    units_skipped: int = 0  # finished before
    units_elsewhere: list[str] = field(default_factory=list)  # held by other live workers
    units_lost: int = 0  # taken over while computed here: their work was dropped
    videos_done: int = 0
    failures: list[Failure] = field(default_factory=list)

    def add(self, other: RunSummary) -> None:
        self.units += other.units
        self.units_skipped += other.units_skipped
        self.units_elsewhere += other.units_elsewhere
        self.units_lost += other.units_lost
        self.videos_done += other.videos_done
        self.failures += other.failures


@dataclass(frozen=True)
class Blame:
    """Finding the videos that kill their worker process (a Dask task's unit, executors.py).

    record: keep the rows being computed in the lease's progress record, where whoever finds
    this process dead reads them. suspects: rows computed one at a time, not batched, so that
    a death names one video. excluded: rows recorded as failed with the given reason instead
    of computed (they killed their workers).
    """

    record: bool = False
    suspects: frozenset[int] = frozenset()
    excluded: dict[int, str] = field(default_factory=dict, hash=False)


@dataclass
class _Job:
    """A claimed unit: its shard's rows, those to compute, and its record so far (None: never
    finished)."""

    unit: int
    shard: range
    rows: list[int]
    record: UnitRecord | None
    blame: Blame


def run_stage(
    stage: Stage,
    store: RowStore,
    manifest: Manifest,
    units: Sequence[int],
    options: RunOptions = RunOptions(),
    desc: str = "videos",
    share: Sequence[int] | None = None,
    blame: Blame = Blame(),
) -> RunSummary:
    """Process `units` of `store` in order (skipping finished and held ones).

    `share`: the units whose finished rows are checked against their video files first
    (default: `units`); an empty share also skips the sweep of killed runs' debris (a Dask
    task: its client did both for the whole store). `blame`: see `Blame`.
    """
    with Ledger(store.ledger_dir) as ledger:
        return _run(stage, store, manifest, units, options, desc, share, blame, ledger)


def _run(
    stage: Stage,
    store: RowStore,
    manifest: Manifest,
    units: Sequence[int],
    options: RunOptions,
    desc: str,
    share: Sequence[int] | None,
    blame: Blame,
    ledger: Ledger,
) -> RunSummary:
    started, run = time.time(), options.run or current_run()
    shards = store.shards()
    states = ledger.snapshot(len(shards))
    left = check_share(
        store, manifest, ledger, units if share is None else share, states, options.max_attempts
    )
    if share is None or share:
        sweep(store, states, options.lease_timeout)
    summary = RunSummary(failures=left_failures(left, options.max_attempts))
    jobs: deque[_Job] = deque()
    pending = {u: _pending_rows(states[u], shards[u]) for u in units}
    pending |= {record.unit: 0 for record in left if record.unit in pending}
    total = sum(pending.values())
    bar = tqdm(
        total=total, desc=desc, unit="video", disable=not (options.progress and total),
        smoothing=0.1,
    )  # fmt: skip

    with UnitLeases(store.lease_dir, options.lease_timeout) as leases:
        retry = _Retry(run, started, options.max_attempts)
        claims = _Claims(shards, ledger, leases, summary, blame, bar, pending, states, retry)

        def claimed_rows(look: Iterator[_Job]) -> Iterator[VideoRow]:
            for job in look:
                jobs.append(job)
                yield from (manifest.rows[r] for r in job.rows)

        # Shards are written by a background thread while the next unit computes; one write at
        # a time, so at most two units' rows are held in memory. The second look at held units
        # waits for their holders, so it starts only once the first look's units are computed.
        with (
            DecoderPool(stage.loader, options.workers, options.video_timeout) as decoders,
            ThreadPoolExecutor(1, thread_name_prefix="tats-writer") as writer,
        ):
            writing: Future | None = None
            for look in (claims.first_look(units), claims.second_look()):
                stream = decoders.map(claimed_rows(look))
                while (first := next(stream, None)) is not None:
                    job = jobs.popleft()
                    loaded = chain([first], islice(stream, len(job.rows) - 1))
                    buffers, record = _run_unit(stage, store, job, loaded, leases, bar, run)
                    if writing is not None:
                        _count(summary, *writing.result())
                    writing = writer.submit(_commit, store, ledger, leases, job, buffers, record)
            if writing is not None:
                _count(summary, *writing.result())
    bar.close()
    return summary


def sweep(store: RowStore, states: bytes, lease_timeout: float) -> None:
    """Remove what killed processes left: their temporary files (`RowStore.remove_debris`,
    `UnitLeases.sweep`), and their leases of units that have a record (`states`: the units
    map), which no run might claim again to take them over (a kill between a unit's record and
    its lease's release)."""
    store.remove_debris(older_than=lease_timeout)
    with UnitLeases(store.lease_dir, lease_timeout) as leases:
        leases.sweep(lambda unit: unit < len(states) and states[unit] != UNKNOWN)


def left_failures(left: Sequence[UnitRecord], max_attempts: int) -> list[Failure]:
    """The failures of units left after `max_attempts` attempts, as reported."""
    return [
        Failure(f.row, f.video_id, f"{f.error} (left after {record.attempt} attempts: "
                f"--max-attempts {max_attempts})")  # fmt: skip
        for record in left
        for f in record.failed
    ]


def _count(summary: RunSummary, job: _Job, record: UnitRecord | None) -> None:
    if record is None:
        summary.units_lost += 1
        return
    summary.units += 1
    summary.videos_done += len(record.done) - (len(job.record.done) if job.record else 0)
    summary.failures += record.failed


@dataclass(frozen=True)
class _Retry:
    """Which failed units this process retries: those whose videos failed fewer than
    `max_attempts` times, and not already in this run (`run`, which began here at
    `started`)."""

    run: str
    started: float
    max_attempts: int

    def leaves(self, record: UnitRecord | None) -> bool:
        """Whether a unit with this record is left as it is (finished, or failed and not to be
        retried here)."""
        if record is None:
            return False
        if not record.failed:
            return True
        return record.attempt >= self.max_attempts or retried_in_run(
            record, self.run, self.started
        )


@dataclass(frozen=True)
class _Busy:
    """A unit another live worker holds, with its lease as read (None: gone meanwhile)."""

    lease: Lease | None


@dataclass
class _Claims:
    """Claims a run's units. The first look claims the unfinished units in order and passes
    over those another live worker holds (read from its lease: no claim attempt); the second
    look waits on those until each holder shows it lives (its process, where it runs on this
    host, or a heartbeat: the unit is left to it), finishes the unit, or is found dead (the
    unit is taken over). Without the wait, a task resubmitted while its killed predecessor's
    lease is still fresh would end "done" with that unit never computed."""

    shards: list[range]
    ledger: Ledger
    leases: UnitLeases
    summary: RunSummary
    blame: Blame
    bar: tqdm
    pending: dict[int, int]
    states: bytearray  # the ledger's map, as read at the start (and learnt since)
    retry: _Retry
    held: dict[int, Lease | None] = field(default_factory=dict)

    def first_look(self, units: Sequence[int]) -> Iterator[_Job]:
        for unit in units:
            job = self._claim(unit)
            if isinstance(job, _Job):
                yield job
            elif isinstance(job, _Busy):
                self.held[unit] = job.lease
            else:
                self._settle(unit, finished=True)

    def second_look(self) -> Iterator[_Job]:
        # The lease each held unit had when first seen here; a later heartbeat shows that its
        # holder lives. A holder on another host can show it only by a heartbeat (every
        # timeout / 6), so the leases are read a few times per heartbeat, not claimed.
        seen = dict(self.held)
        step = max(0.05, min(10.0, self.leases.timeout / 24))
        while seen:
            for unit in list(seen):
                job = self._claim(unit)
                if isinstance(job, _Busy):
                    now, first = job.lease, seen[unit]
                    if now is None:
                        continue
                    if first is None:
                        seen[unit] = now
                    elif (
                        now.holder.local  # its process was checked: alive
                        or now.holder != first.holder
                        or now.heartbeat > first.heartbeat
                    ):
                        del seen[unit]
                        self._settle(unit, finished=False, holder=now.holder)
                    continue
                del seen[unit]
                if isinstance(job, _Job):
                    yield job
                else:
                    self._settle(unit, finished=True)
            if seen:
                time.sleep(step)

    def _finished(self, unit: int) -> bool:
        """Finished, by the map (no record opened): at the start, or marked since; or failed
        and left as it is (its record read)."""
        if self.states[unit] == FINISHED:
            return True
        state = self.ledger.state(unit)
        if state == FINISHED and self.ledger.has(unit):
            self.states[unit] = FINISHED
            return True
        if state > FINISHED or self.states[unit] > FINISHED:
            record = self.ledger.read(unit)
            if record is not None and self.retry.leaves(record):
                self.states[unit] = state_of(record)
                return True
        return False

    def _claim(self, unit: int) -> _Job | _Busy | bool:
        """The claimed unit's job; True if it is finished (or left); _Busy if another worker
        holds it."""
        termination.check()  # a SIGTERM whose exception Python dropped
        if self._finished(unit):
            return True
        lease = self.leases.live_lease(unit)
        if lease is not None:
            return _Busy(lease)
        if not self.leases.claim(unit):  # claimed by another between the read and the claim
            return _Busy(self.leases.live_lease(unit))
        record = self.ledger.read(unit)  # the previous holder may have finished it meanwhile
        if state_of(record) != self.ledger.state(unit):
            self.ledger.mark(unit, state_of(record))  # a byte lost, or a record restored
        if self.retry.leaves(record):
            self.leases.release(unit)
            self.states[unit] = state_of(record)
            return True
        shard = self.shards[unit]
        rows = list(shard) if record is None else [f.row for f in record.failed]
        return _Job(unit, shard, rows, record, self.blame)

    def _settle(self, unit: int, finished: bool, holder: LeaseHolder | None = None) -> None:
        """Count a unit this process does not compute: finished, or left to a live holder."""
        if finished:
            self.summary.units_skipped += 1
        else:
            self.summary.units_elsewhere.append(f"unit {unit} ({holder})")
        self.bar.total -= self.pending[unit]  # counted at the start, not done here
        self.bar.refresh()


def _pending_rows(state: int, shard: range) -> int:
    """Rows of a unit still to compute, by its map byte: all of them, its failed ones, or
    none."""
    return len(shard) if not state else failed_in(state)


def _run_unit(
    stage: Stage,
    store: RowStore,
    job: _Job,
    loaded: Iterator[Loaded],
    leases: UnitLeases,
    bar: tqdm,
    run: str,
) -> tuple[dict[str, np.ndarray], UnitRecord]:
    """Compute a unit's rows into shard buffers; returns them and the unit's record."""
    shard = job.shard
    started = time.perf_counter()
    seconds = {"decode": 0.0, "compute": 0.0}
    record = job.record
    buffers = store.empty_rows(len(shard))
    if record is not None:
        # A retry keeps the rows done before: read the shard back and rewrite it whole. The
        # other rows start empty: a killed attempt may have left its data in them.
        done_before = [row - shard.start for row in record.done]
        for name, values in store.read_rows(shard).items():
            buffers[name][done_before] = values[done_before]
    done = dict(record.done) if record else {}
    stamps = dict(record.sources) if record else {}
    rotations = dict(record.rotations) if record else {}
    failed: list[Failure] = []
    while batch := list(islice(loaded, stage.batch_size)):
        seconds["decode"] += sum(item.seconds for item in batch)
        good = []
        for item in batch:
            error = job.blame.excluded.get(item.row.row, item.error)
            if error is None:
                good.append(item)
            else:
                failed.append(Failure(item.row.row, item.row.video_id, error))
        tic = time.perf_counter()
        alone = job.blame.suspects & {item.row.row for item in good}
        groups = [[item] for item in good] if alone else [good]
        results = []
        for group in groups:
            if job.blame.record:
                leases.progress(job.unit, [item.row.row for item in group], "compute")
            results += _compute(stage, group)
            if job.blame.record:  # a death from here on is not these rows' doing
                leases.progress(job.unit, None, "decode")
        for item, result in zip(good, results, strict=True):
            if isinstance(result, str):
                failed.append(Failure(item.row.row, item.row.video_id, result))
                continue
            for name, value in result.items():
                buffers[name][item.row.row - shard.start] = value
            done[item.row.row] = row_digest(buffers, item.row.row - shard.start)
            if item.source is not None:
                stamps[item.row.row] = item.source
            if item.rotation != 0:
                rotations[item.row.row] = item.rotation
        seconds["compute"] += time.perf_counter() - tic
        bar.update(len(batch))
        if failed:
            bar.set_postfix(failed=len(failed), refresh=False)
    seconds["total"] = time.perf_counter() - started
    result = UnitRecord(
        unit=job.unit,
        rows=(shard.start, shard.stop),
        done=dict(sorted(done.items())),
        failed=sorted(failed, key=lambda f: f.row),
        seconds={k: round(v, 3) for k, v in seconds.items()},
        attempt=record.attempt + 1 if record else 1,
        sources={r: stamps[r] for r in sorted(done) if r in stamps},
        rotations={r: rotations[r] for r in sorted(done) if r in rotations},
        run=run,
    )
    return buffers, result


def _commit(
    store: RowStore,
    ledger: Ledger,
    leases: UnitLeases,
    job: _Job,
    buffers: dict,
    record: UnitRecord,
) -> tuple[_Job, UnitRecord | None]:
    """Write a unit's shard, fsync it, then its record, then release its lease; a unit whose
    lease was taken over is dropped (record None): its new holder computes it."""
    if not leases.holds(job.unit):
        leases.release(job.unit, lost=True)
        return job, None
    if job.blame.record:
        leases.progress(job.unit, None, "write")
    tic = time.perf_counter()
    shard = job.shard
    store.write_rows(shard, buffers)
    store.sync_rows(shard)
    record.seconds["write"] = round(time.perf_counter() - tic, 3)
    if not leases.holds(job.unit):  # frozen during the write: the taker's record stands
        leases.release(job.unit, lost=True)
        return job, None
    ledger.write(record)
    leases.release(job.unit)
    return job, record


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


def check_share(
    store: RowStore,
    manifest: Manifest,
    ledger: Ledger,
    units: Sequence[int],
    states: bytearray,
    max_attempts: int = DEFAULT_MAX_ATTEMPTS,
) -> list[UnitRecord]:
    """Read the records of `units` (a process's share; `states`, the ledger's map from
    `Ledger.snapshot`, says which have one): refuse to resume when video files of finished
    rows changed since they were written; mend the map where a byte disagrees with its record
    (a byte that says finished would hide failed rows for good). Returns the records of the
    units left after `max_attempts` attempts, whose failures this process reports."""
    changed, left = [], []
    for unit in units:
        if not states[unit]:
            continue
        record = ledger.read(unit)
        if state_of(record) != states[unit]:
            states[unit] = state_of(record)
            ledger.mark(unit, states[unit])
        if record is not None and record.failed and record.attempt >= max_attempts:
            left.append(record)
        for row, recorded in (record.sources if record else {}).items():
            problem = sources.change(manifest.rows[row].path, recorded)
            if problem:
                changed.append((manifest.rows[row], problem))
    if changed:
        listed = "; ".join(f"row {r.row} ({r.video_id}, {r.path}: {p})" for r, p in changed[:5])
        more = f" and {len(changed) - 5} more" if len(changed) > 5 else ""
        raise StoreError(
            f"{store.path}: {len(changed)} videos changed since they were extracted: {listed}"
            f"{more}. Restore them, or extract into a new --out"
        )
    return left
