"""Resumable progress: one record per finished work unit, inside the store, and a map of them.

A record is written after its shard is on disk (written and fsynced), to a temporary file that
is fsynced and then renamed, and the folder is fsynced: a record exists only for a shard that
is completely on disk, survives a power loss, and is always whole. It lists the rows done
(with a digest of each row's data, which `verify` checks, and a stamp of each video file, which
a resumed run checks), the rows that failed and why, timings and the host.

`ledger/units.map` holds one byte per unit, written after the unit's record: 0 nothing known
(no record, or one this map has not heard of), 1 finished, 1 + k finished with k failed rows
(k capped at 254). So a process learns which units are finished from one read of the map and
one listing of the folder, without opening a record: a resumed process opens only the records
of its own share (their video stamps) and of the units it computes. The map is a hint that the
records overrule: a unit marked finished whose record is gone (deleted to redo it) is pending,
a unit with a record but no mark is read once and marked, and a claimed unit's record is read
again before it is computed. A lost or stale byte therefore costs a record read, never a unit;
and since a byte can also claim too much (damaged, or a failed record restored from a backup
under a "finished" byte), every run compares the bytes of its own share with their records,
which it reads anyway (their video stamps): a unit with failed rows is never hidden.

A record names the run that wrote it (`current_run`: a Slurm job, a torchrun rendezvous, a Dask
client, else the process) and when, so that the tasks of one run retry a failed video once
between them, not once each.
"""

from __future__ import annotations

import json
import os
import re
import socket
import stat
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime
from pathlib import Path

from tats.pipeline.sources import SourceStamp
from tats.stores import StoreError, fsync

MAP = "units.map"
TIME = "%Y-%m-%dT%H:%M:%S.%f%z"  # a record's `finished`
UNKNOWN, FINISHED = 0, 1
_RECORD = re.compile(r"unit-(\d{6,})\.json")


@dataclass(frozen=True)
class Failure:
    row: int
    video_id: str
    error: str


@dataclass
class UnitRecord:
    unit: int
    rows: tuple[int, int]
    done: dict[int, str]  # row -> digest of its data
    failed: list[Failure]
    seconds: dict[str, float] = field(default_factory=dict)
    host: str = field(default_factory=socket.gethostname)
    pid: int = field(default_factory=os.getpid)
    finished: str = field(default_factory=lambda: datetime.now().astimezone().strftime(TIME))
    attempt: int = 1
    sources: dict[int, SourceStamp] = field(default_factory=dict)  # row -> video file stamp
    # row -> display rotation its frames were turned by (degrees; None: by decord, unreported);
    # rows of upright videos are left out
    rotations: dict[int, int | None] = field(default_factory=dict)
    run: str = ""  # the run that wrote it (`current_run`); "" in records made before

    def written(self) -> float:
        """When the record was written, in seconds since the epoch (records made before
        microseconds were kept: to the second)."""
        try:
            return datetime.strptime(self.finished, TIME).timestamp()
        except ValueError:
            return datetime.strptime(self.finished, "%Y-%m-%dT%H:%M:%S%z").timestamp()

    def to_json(self) -> str:
        data = asdict(self)
        data["done"] = {str(row): digest for row, digest in self.done.items()}
        data["sources"] = {str(row): list(s) for row, s in self.sources.items()}
        return json.dumps(data, indent=1)

    @classmethod
    def from_json(cls, text: str) -> UnitRecord:
        data = json.loads(text)
        data["rows"] = tuple(data["rows"])
        data["done"] = {int(row): digest for row, digest in data["done"].items()}
        data["failed"] = [Failure(**f) for f in data["failed"]]
        data["sources"] = {int(r): SourceStamp(*s) for r, s in data.get("sources", {}).items()}
        data["rotations"] = {int(r): d for r, d in data.get("rotations", {}).items()}
        known = {f.name for f in fields(cls)}  # a newer tats may add fields: not ours to read
        record = cls(**{k: v for k, v in data.items() if k in known})
        record.written()  # a readable time
        return record


def current_run(env: Mapping[str, str] = os.environ) -> str:
    """An id the processes of one run share: a Slurm job array's (its tasks; a task
    resubmitted alone is another job, so another run), a torchrun rendezvous's; else one of
    its own (a run started by hand beside others is told apart by the time: `retried_in_run`).
    Not a plain Slurm job's: commands typed one after the other in one allocation are runs of
    their own."""
    if "SLURM_ARRAY_JOB_ID" in env:
        return f"slurm:{env['SLURM_ARRAY_JOB_ID']}"
    if env.get("TORCHELASTIC_RUN_ID", "none") != "none":
        return f"torchrun:{env['TORCHELASTIC_RUN_ID']}"
    return f"process:{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def retried_in_run(record: UnitRecord, run: str, started: float) -> bool:
    """Whether `record` was written in the run `run`, which started at `started` here: by a
    process of the same run, or by any process after then (one started beside this one). Its
    failed videos were tried in this run already."""
    return record.run == run or record.written() >= started


def state_of(record: UnitRecord | None) -> int:
    """A unit's byte in the units map: 0 no record, 1 finished, 1 + k: k rows failed."""
    if record is None:
        return UNKNOWN
    return FINISHED if not record.failed else 1 + min(len(record.failed), 254)


def failed_in(state: int) -> int:
    """Failed rows a map byte of a finished unit says (at least that many, capped)."""
    return max(0, state - 1)


class Ledger:
    """The records of one store, one JSON file per finished unit, and their map."""

    def __init__(self, directory: Path):
        self.directory = Path(directory)
        self._map_fd: int | None = None

    def _path(self, unit: int) -> Path:
        return self.directory / f"unit-{unit:06d}.json"

    def read(self, unit: int) -> UnitRecord | None:
        """`unit`'s record, None if it has none; StoreError naming the file if it is damaged
        (records are written whole, so only the disk or a hand can damage one)."""
        path = self._path(unit)
        try:
            text = path.read_text()
        except FileNotFoundError:
            return None
        try:
            record = UnitRecord.from_json(text)
        except (ValueError, KeyError, TypeError, AttributeError) as error:
            problem = error.msg if isinstance(error, json.JSONDecodeError) else repr(error)
            raise StoreError(
                f"{path}: damaged ledger record ({problem}); delete it and rerun to compute "
                f"unit {unit} again"
            ) from None
        if record.unit != unit:
            raise StoreError(
                f"{path}: the ledger record of unit {record.unit}, not {unit}; delete it and "
                f"rerun to compute unit {unit} again"
            )
        return record

    def has(self, unit: int) -> bool:
        """Whether `unit` has a record (without reading it)."""
        return self._path(unit).exists()

    def write(self, record: UnitRecord) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        tmp = self.directory / f".unit-{record.unit:06d}.{uuid.uuid4().hex[:8]}.tmp"
        try:
            with open(tmp, "w") as f:
                f.write(record.to_json())
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self._path(record.unit))
        finally:
            tmp.unlink(missing_ok=True)  # left only where the write failed (a full disk)
        fsync(self.directory)
        self.mark(record.unit, state_of(record))

    def mark(self, unit: int, state: int) -> None:
        """Set `unit`'s byte in the map (after its record is on disk). Units own their byte,
        so writers of different units never overwrite each other; not fsynced: a byte lost
        in a power cut reads 0, which the record overrules."""
        os.pwrite(self._map(), bytes([state]), unit)

    def state(self, unit: int) -> int:
        """`unit`'s byte in the map now (one read, no record opened)."""
        return (os.pread(self._map(), 1, unit) or b"\0")[0]

    def snapshot(self, num_units: int) -> bytearray:
        """Every unit's map byte, checked against the records present (one read of the map,
        one listing of the folder): 0 where there is no record. A record the map does not
        know is read here, and marked."""
        present = self.units_recorded()
        states = bytearray(num_units)
        states[:] = (os.pread(self._map(), num_units, 0) + bytes(num_units))[:num_units]
        for unit in range(num_units):
            if unit not in present:
                states[unit] = UNKNOWN
            elif states[unit] == UNKNOWN:
                states[unit] = state_of(self.read(unit))
                if states[unit] != UNKNOWN:
                    self.mark(unit, states[unit])
        return states

    def units_recorded(self) -> set[int]:
        """Units that have a record (one listing of the folder, no record opened)."""
        try:
            names = os.listdir(self.directory)
        except FileNotFoundError:
            return set()
        return {int(m.group(1)) for name in names if (m := _RECORD.fullmatch(name))}

    def iter_records(self) -> Iterator[UnitRecord]:
        """Every record, in unit order, one at a time (a million rows' records need not fit
        in memory at once)."""
        for unit in sorted(self.units_recorded()):
            record = self.read(unit)
            if record is not None:
                yield record

    def records(self) -> dict[int, UnitRecord]:
        return {record.unit: record for record in self.iter_records()}

    def _map(self) -> int:
        if self._map_fd is None:
            self.directory.mkdir(parents=True, exist_ok=True)
            path = self.directory / MAP
            try:
                kind = os.stat(path).st_mode
            except FileNotFoundError:
                kind = stat.S_IFREG
            if not stat.S_ISREG(kind):
                raise StoreError(
                    f"{path}: not a file (the ledger's units map, one byte per unit): remove "
                    f"it and rerun; the run makes it again from the ledger records"
                )
            self._map_fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        return self._map_fd

    def close(self) -> None:
        if self._map_fd is not None:
            os.close(self._map_fd)
            self._map_fd = None

    def __enter__(self) -> Ledger:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        self.close()
