"""Resumable progress: one record per finished work unit, inside the store.

A record is written after its shard, to a temporary file that is then renamed, so a record
exists only for a shard that is completely on disk, and a record on disk is always whole. It
lists the rows done (with a digest of each row's data, which `verify` checks), the rows that
failed and why, timings and the host.
"""

from __future__ import annotations

import json
import os
import socket
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path


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

    def to_json(self) -> str:
        data = asdict(self)
        data["done"] = {str(row): digest for row, digest in self.done.items()}
        return json.dumps(data, indent=1)

    @classmethod
    def from_json(cls, text: str) -> UnitRecord:
        data = json.loads(text)
        data["rows"] = tuple(data["rows"])
        data["done"] = {int(row): digest for row, digest in data["done"].items()}
        data["failed"] = [Failure(**f) for f in data["failed"]]
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
        with open(tmp, "w") as f:
            f.write(record.to_json())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self._path(record.unit))

    def records(self) -> dict[int, UnitRecord]:
        records = {}
        for path in sorted(self.directory.glob("unit-*.json")):
            record = UnitRecord.from_json(path.read_text())
            records[record.unit] = record
        return records
