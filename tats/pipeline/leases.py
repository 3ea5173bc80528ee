"""Unit leases: which worker computes a store unit right now.

Shares only decide where a worker starts; leases make any mix of workers safe (array tasks,
resubmitted tasks, Dask retries, processes started by hand). Before computing a unit a worker
creates `<store>/leases/unit-NNNNNN.lease` exclusively (written aside, then hard-linked into
place: atomic, and it fails if the file exists, on local file systems and NFS alike). The file
names its holder: host, PID namespace, pid, process start time and a random id. While a holder
works, a thread touches its lease files every `timeout / 6` seconds. Another worker that finds
a lease:

- skips the unit while the holder lives;
- takes the unit over when the holder is dead: on the same host and PID namespace as soon as
  its process is gone, anywhere once the file was not touched for `timeout` seconds (clocks
  are assumed to agree within seconds, as NTP keeps them). Taking over renames the file away
  (one taker wins the rename) and claims the unit anew.

After claiming, a worker re-reads the unit's ledger record (the previous holder may have
finished it); before writing the unit's shard it checks that it still holds the lease (a
holder frozen for longer than the timeout has lost it, and drops its work); it deletes the
lease after the unit's ledger record (a holder killed in between leaves its lease on a unit
that no run claims again: runs remove such leases at their start, `clear`). Every holder
appends its claims, takeovers, releases and losses to its own file
`leases/log/<holder>.jsonl` (a takeover names the previous holder and its lease's claim time,
so that a holder killed before logging its claim still shows), and keeps the rows it is computing in
`leases/progress/<holder>.json`, so that whatever kills a worker can be blamed on its video.

A lease file that cannot be read as a lease (damaged, written by hand, empty because its
creator died while writing it) holds nobody: it is taken over once it was not touched for the
timeout. Fields a lease does not need are ignored, and a holder whose PID namespace is not
recorded is judged by its heartbeat alone.
"""

from __future__ import annotations

import json
import os
import re
import socket
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from tats.stores import remove_old

HOST = socket.gethostname()
DEFAULT_TIMEOUT = 180.0
_LEASE = re.compile(r"unit-(\d{6,})\.lease")


def _pid_namespace() -> str:
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return ""


def _process_start(pid: int) -> int | None:
    """Start time of process `pid` in clock ticks since boot (Linux), None where unknown."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
        return int(fields[19])
    except (OSError, IndexError, ValueError):
        return None


def _alive(pid: int, start: int | None) -> bool:
    """Whether process `pid` (started at `start`, if known) still runs on this host (a zombie,
    killed and not yet reaped by its parent, does not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # another user's process: it exists
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            if f.read().rsplit(b")", 1)[1].split()[0] == b"Z":
                return False
    except (OSError, IndexError):
        pass
    if start is None:
        return True
    return _process_start(pid) in (start, None)


@dataclass(frozen=True)
class LeaseHolder:
    """Who holds a lease: one per worker process (a new id for every `UnitLeases`)."""

    id: str
    host: str
    pid_namespace: str
    pid: int
    start: int | None

    @classmethod
    def me(cls) -> LeaseHolder:
        pid = os.getpid()
        return cls(f"{HOST}-{pid}-{uuid.uuid4().hex[:8]}", HOST, _pid_namespace(), pid,
                   _process_start(pid))  # fmt: skip

    @property
    def local(self) -> bool:
        """On this host and in this PID namespace, where its pid can be checked."""
        return self.host == HOST and self.pid_namespace == _pid_namespace()

    def gone(self) -> bool:
        """Whether this holder is known to be dead: local, and its process is gone."""
        return self.local and not _alive(self.pid, self.start)

    def __str__(self) -> str:
        return f"{self.host}:{self.pid}"


@dataclass(frozen=True)
class Lease:
    """A lease file as found: its holder, unit, claim time and last heartbeat (file mtime)."""

    holder: LeaseHolder
    unit: int
    claimed: float
    heartbeat: float

    def age(self) -> float:
        return time.time() - self.heartbeat


class UnitLeases:
    """This process's leases on the units of one store; use as a context manager.

    `claim(unit)` returns whether this process now holds the unit; `holds(unit)` checks that it
    still does (read from the file); `release(unit)` gives it up. Leaving the context releases
    every lease still held and stops the heartbeat.
    """

    def __init__(self, directory: str | Path, timeout: float = DEFAULT_TIMEOUT):
        if timeout <= 0:
            raise ValueError(f"lease timeout must be positive, not {timeout}")
        self.directory = Path(directory)
        self.timeout = timeout
        self.holder = LeaseHolder.me()
        self._held: dict[int, Path] = {}
        self._doing: dict[str, dict] = {}  # unit -> what this process does with it
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._log_file = None

    # ------------------------------------------------------------------ public

    def claim(self, unit: int) -> bool:
        """Claim `unit` unless a live worker holds it (a dead holder's lease is taken over)."""
        path = self.path(unit)
        self._open_log()  # before the lease exists, so that its claim is logged right after
        self._start_heartbeat()
        for _ in range(3):  # a lease released or taken between our looks: look again
            with self._lock:  # before the file exists: a SIGTERM right after still releases it
                self._held[unit] = path
            claimed = self._create(path, unit)
            if claimed is not None:
                self._log("claim", unit, at=claimed)
                return True
            with self._lock:
                del self._held[unit]
            found = read_lease(path)
            if found is None:
                if self._unreadable_and_stale(path):  # a holder died while creating it
                    path.unlink(missing_ok=True)
                continue
            if not self.is_dead(found):
                return False
            taken = self._take_away(path, found)
            if taken is None:
                return False
            self._log("takeover", unit, at=taken, previous=found.holder.id, since=found.claimed)
        return False

    def holds(self, unit: int) -> bool:
        """Whether this process still holds `unit` (False after a takeover by another)."""
        found = read_lease(self.path(unit))
        return found is not None and found.holder.id == self.holder.id

    def release(self, unit: int, lost: bool = False) -> None:
        """Give `unit` up (`lost`: it was taken over; the file is then another's)."""
        with self._lock:
            path = self._held.pop(unit, None)
            self._doing.pop(str(unit), None)
        if path is None:
            return
        when = time.time()  # before the file goes: a claim that follows is logged after it
        if not lost:
            self._remove_own(path)
        self._log("lost" if lost else "release", unit, at=when)

    def progress(self, unit: int, rows: list[int] | None, phase: str) -> None:
        """Record what this process does with `unit` (`phase` compute, with the rows being
        computed, or write), so that a worker's death can be blamed on its videos."""
        with self._lock:
            self._doing[str(unit)] = {"rows": rows, "phase": phase, "time": time.time()}
            doing = json.dumps(self._doing)
            _write_atomically(self.directory / "progress" / f"{self.holder.id}.json", doing)

    def is_dead(self, lease: Lease) -> bool:
        """Whether a lease's holder stopped: its process is gone, or it stopped heartbeating."""
        return lease.holder.gone() or lease.age() > self.timeout

    def live_lease(self, unit: int) -> Lease | None:
        """The lease of `unit` if a live worker holds it (a read, no claim): a unit found held
        is passed over without the claim's write, link and delete."""
        found = read_lease(self.path(unit))
        return None if found is None or self.is_dead(found) else found

    def sweep(self, recorded: Callable[[int], bool]) -> None:
        """Remove what killed holders left (one listing of the folder): the files a claim,
        takeover or release writes aside, once older than the timeout; and their leases of
        the units `recorded` says have a ledger record, which no run might claim again to take
        them over (`clear`)."""
        try:
            names = os.listdir(self.directory)
        except FileNotFoundError:
            return
        asides = (".new", ".taken", ".released")
        remove_old([self.directory / n for n in names
                    if n.startswith(".unit-") and n.endswith(asides)], self.timeout)  # fmt: skip
        for name in names:
            unit = lease_unit(name)
            if unit is not None and recorded(unit):
                self.clear(unit)

    def clear(self, unit: int) -> bool:
        """Remove `unit`'s lease if its holder is dead (or it is unreadable and stale), as a
        takeover does, without claiming the unit; returns whether one was removed."""
        path = self.path(unit)
        found = read_lease(path)
        if found is None:
            if self._unreadable_and_stale(path):
                path.unlink(missing_ok=True)
                return True
            return False
        taken = self._take_away(path, found) if self.is_dead(found) else None
        if taken is None:
            return False
        self._log("takeover", unit, at=taken, previous=found.holder.id, since=found.claimed,
                  cleared=True)
        return True

    def holder_of(self, unit: int) -> LeaseHolder | None:
        """Who holds `unit` now (None: nobody)."""
        found = read_lease(self.path(unit))
        return None if found is None else found.holder

    def path(self, unit: int) -> Path:
        return self.directory / f"unit-{unit:06d}.lease"

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        for unit in list(self._held):
            self.release(unit)
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    def __enter__(self) -> UnitLeases:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ internals

    def _create(self, path: Path, unit: int) -> float | None:
        """Create the lease file with its content in one step; returns its claim time, None
        if the file exists."""
        self.directory.mkdir(parents=True, exist_ok=True)
        content = {"holder": asdict(self.holder), "unit": unit, "claimed": time.time()}
        aside = self.directory / f".{path.name}.{self.holder.id}.new"
        aside.write_text(json.dumps(content))
        try:
            os.link(aside, path)
            return content["claimed"]
        except FileExistsError:
            return None
        except OSError:  # a file system without hard links: create-exclusive, then write
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                return None
            with os.fdopen(fd, "w") as f:
                f.write(json.dumps(content))
            return content["claimed"]
        finally:
            aside.unlink(missing_ok=True)

    def _take_away(self, path: Path, dead: Lease) -> float | None:
        """Remove a dead holder's lease; returns when (read before the removal, so that the log
        puts it before any claim that follows), None if what was removed was somebody else's."""
        tomb = self.directory / f".{path.name}.{self.holder.id}.taken"
        when = time.time()
        try:
            os.rename(path, tomb)
        except FileNotFoundError:
            return when  # gone meanwhile: claim again
        taken = read_lease(tomb)
        try:
            if taken is not None and taken.holder.id != dead.holder.id:
                # A live worker claimed the unit between our look and the rename: put it back.
                try:
                    os.link(tomb, path)
                except FileExistsError:
                    pass
                return None
            return when
        finally:
            tomb.unlink(missing_ok=True)

    def _remove_own(self, path: Path) -> None:
        """Delete the lease at `path` if it is ours; renamed aside first, so that a taker's
        lease created in between is never deleted."""
        aside = self.directory / f".{path.name}.{self.holder.id}.released"
        try:
            os.rename(path, aside)
        except FileNotFoundError:
            return
        found = read_lease(aside)
        if found is not None and found.holder.id != self.holder.id:
            try:
                os.link(aside, path)  # another's: put it back
            except FileExistsError:
                pass
        aside.unlink(missing_ok=True)

    def _unreadable_and_stale(self, path: Path) -> bool:
        """A lease file that cannot be read (empty: its creator died between creating and
        writing it, on a file system without hard links) and was not touched for `timeout`."""
        try:
            return time.time() - path.stat().st_mtime > self.timeout and read_lease(path) is None
        except FileNotFoundError:
            return False

    def _start_heartbeat(self) -> None:
        if self._thread is None:
            thread = threading.Thread(target=self._beat, name="tats-leases", daemon=True)
            thread.start()
            self._thread = thread  # only once started: a SIGTERM in between closes cleanly

    def _beat(self) -> None:
        while not self._stop.wait(self.timeout / 6):
            with self._lock:
                held = list(self._held.values())
            for path in held:
                found = read_lease(path)
                if found is None or found.holder.id != self.holder.id:
                    continue  # taken over: the file is the new holder's to touch
                try:
                    os.utime(path)
                except OSError:
                    pass  # taken over meanwhile, or a passing file-system error: `holds` decides

    def _open_log(self) -> None:
        if self._log_file is None:
            folder = self.directory / "log"
            folder.mkdir(parents=True, exist_ok=True)
            self._log_file = open(folder / f"{self.holder.id}.jsonl", "a")  # noqa: SIM115

    def _log(self, event: str, unit: int, at: float | None = None, **extra) -> None:
        """Append an event, at time `at` (default: now) to this holder's log."""
        self._open_log()
        record = {"time": time.time() if at is None else at, "event": event, "unit": unit,
                  "holder": self.holder.id, **extra}  # fmt: skip
        self._log_file.write(json.dumps(record) + "\n")
        self._log_file.flush()


def lease_unit(name: str) -> int | None:
    """The unit of a lease file's name (`unit-NNNNNN.lease`), None for another name."""
    found = _LEASE.fullmatch(name)
    return None if found is None else int(found.group(1))


def read_lease(path: Path) -> Lease | None:
    """The lease at `path`, or None when there is none, it vanished while being read, or it
    cannot be read as a lease (see the module docstring)."""
    try:
        heartbeat = path.stat().st_mtime
        data = json.loads(path.read_text(errors="replace"))
        holder = data["holder"]
        start = holder.get("start")
        lease = Lease(
            LeaseHolder(
                str(holder["id"]), str(holder["host"]), str(holder.get("pid_namespace", "?")),
                int(holder["pid"]), None if start is None else int(start),
            ),
            int(data["unit"]), float(data["claimed"]), heartbeat,
        )  # fmt: skip
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None  # FileNotFoundError included
    return lease


def read_progress(directory: str | Path, holder_id: str, unit: int) -> dict | None:
    """What holder `holder_id` last said it was doing with `unit`: {"rows", "phase", "time"}
    (see `UnitLeases.progress`), None if nothing."""
    try:
        doing = json.loads((Path(directory) / "progress" / f"{holder_id}.json").read_text())
    except (OSError, ValueError):
        return None
    found = doing.get(str(unit)) if isinstance(doing, dict) else None
    return found if isinstance(found, dict) and "phase" in found else None


def read_log(directory: str | Path) -> list[dict]:
    """Every holder's lease events, in time order (a line cut short by a kill is skipped)."""
    events = []
    for path in sorted((Path(directory) / "log").glob("*.jsonl")):
        for line in path.read_text().splitlines():
            try:
                events.append(json.loads(line))
            except ValueError:
                continue
    return sorted(events, key=lambda e: e["time"])


def _write_atomically(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
