"""Resumable progress: one record per finished work unit, inside the store.

A record is written after its shard is on disk (written and fsynced), to a temporary file that
is fsynced and then renamed, and the folder is fsynced: a record exists only for a shard that
is completely on disk, survives a power loss, and is always whole. It lists the rows done
(with a digest of each row's data, which `verify` checks, and a stamp of each video file, which
a resumed run checks), the rows that failed and why, timings and the host.
"""

from __future__ import annotations

import json
import os
import socket
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tats.pipeline.sources import SourceStamp
from tats.stores import fsync


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
    finished: str = field(default_factory=lambda: time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    attempt: int = 1
    sources: dict[int, SourceStamp] = field(default_factory=dict)  # row -> video file stamp
    # row -> display rotation its frames were turned by (degrees; None: by decord, unreported);
    # rows of upright videos are left out
    rotations: dict[int, int | None] = field(default_factory=dict)

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
        return cls(**data)


class Ledger:
    """The records of one store, one JSON file per finished unit."""

    def __init__(self, directory: Path):
        self.directory = Path(directory)

    def _path(self, unit: int) -> Path:
        return self.directory / f"unit-{unit:06d}.json"

    def read(self, unit: int) -> UnitRecord | None:
        path = self._path(unit)
        try:
            return UnitRecord.from_json(path.read_text())
        except FileNotFoundError:
            return None

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

    def records(self) -> dict[int, UnitRecord]:
        records = {}
        for path in sorted(self.directory.glob("unit-*.json")):
            record = UnitRecord.from_json(path.read_text())
            records[record.unit] = record
        return records

