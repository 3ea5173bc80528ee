"""Decoding processes that run ahead of compute, one video at a time each.

`DecoderPool.map(rows)` yields one `Loaded` per row, in order, with up to `2 * workers` rows
decoded ahead. Each process is forked from this one (it starts at once, with every module
already imported) and decodes a single row at a time, so the pool always knows which row a
process was on:

- a process that dies (a decoder that crashes, the kernel's out-of-memory killer) is replaced
  and its row decoded once more in the new process; a row that kills two processes is
  recorded as failed;
- a row still decoding after `timeout` seconds is recorded as failed, and its process killed
  and replaced;
- a process ends within a second of its parent's death (a parent-death signal on Linux, a
  watchdog thread everywhere), so a killed run leaves no decoders behind.

With `workers=0` rows are decoded inline, without a time limit.
"""

from __future__ import annotations

import ctypes
import faulthandler
import os
import signal
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from multiprocessing.connection import Connection, Pipe, wait
from typing import Any

from tats.manifest import VideoRow
from tats.pipeline.sources import SourceStamp, stamp
from tats.video import VideoError

MAX_TRIES = 2  # a row is decoded in at most this many processes that die on it


@dataclass
class Loaded:
    """A decoded row (`data`), or why it could not be decoded (`error`); `rotation`: the
    display rotation its frames were turned by, where the loader's data says (see `load`)."""

    row: VideoRow
    data: Any = None
    error: str | None = None
    seconds: float = 0.0
    source: SourceStamp | None = None
    rotation: int | None = 0


def load(loader: Callable[[VideoRow], Any], row: VideoRow) -> Loaded:
    """Run `loader` on `row`; any error becomes the row's error message, naming the file.
    Data with a `rotation` attribute (decoded frames) passes it on, for the row's record."""
    tic = time.perf_counter()
    source = stamp(row.path)
    try:
        data = loader(row)
    except Exception as error:  # noqa: BLE001 - a bad video must not stop the run
        if not isinstance(error, VideoError):  # VideoError names the file itself
            error = f"{row.path}: {type(error).__name__}: {error}"
        return Loaded(row, error=str(error), seconds=time.perf_counter() - tic, source=source)
    rotation = getattr(data, "rotation", 0)
    return Loaded(row, data, seconds=time.perf_counter() - tic, source=source, rotation=rotation)


@dataclass
class _Job:
    seq: int  # position in the stream
    row: VideoRow
    tries: int = 0


@dataclass
class _Process:
    pid: int
    conn: Connection
    job: _Job | None = None
    started: float = 0.0


class DecoderPool:
    """`workers` decoding processes running `loader` on rows; use as a context manager."""

    def __init__(
        self, loader: Callable[[VideoRow], Any], workers: int, timeout: float | None = None
    ):
        if timeout is not None and timeout <= 0:
            raise ValueError(f"video timeout must be positive, not {timeout}")
        self.loader, self.workers, self.timeout = loader, workers, timeout
        self.ahead = 2 * workers
        self._processes: list[_Process] = []

    def __enter__(self) -> DecoderPool:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Stop every decoding process (a hung one is killed, not waited for)."""
        for process in self._processes:
            process.conn.close()
            self._reap(_kill(process.pid), process.pid)
        self._processes.clear()
        _reap_killed()

    def map(self, rows: Iterable[VideoRow]) -> Iterator[Loaded]:
        """Load `rows` in order; the iterable is consumed lazily, `2 * workers` ahead."""
        if self.workers <= 0:
            for row in rows:
                yield load(self.loader, row)
            return
        upcoming = enumerate(rows)
        retry: deque[_Job] = deque()
        ready: dict[int, Loaded] = {}
        next_seq, exhausted = 0, False
        while True:
            exhausted = self._assign(upcoming, retry, ready, exhausted)
            if next_seq in ready:
                yield ready.pop(next_seq)
                next_seq += 1
                continue
            busy = [p for p in self._processes if p.job is not None]
            if not busy:
                if exhausted and not retry:
                    return
                continue
            self._wait(busy, retry, ready)

    # ------------------------------------------------------------------ internals

    def _assign(self, upcoming, retry: deque[_Job], ready: dict, exhausted: bool) -> bool:
        """Give rows to idle processes while fewer than `ahead` rows are out or waiting."""
        while True:
            busy = sum(p.job is not None for p in self._processes)
            if busy >= self.workers or busy + len(ready) >= self.ahead:
                return exhausted
            if retry:
                job = retry.popleft()
            elif not exhausted:
                item = next(upcoming, None)
                if item is None:
                    return True
                job = _Job(*item)
            else:
                return exhausted
            process = self._idle()
            try:
                process.conn.send(job.row)
            except OSError:  # it died while idle: the row goes to a new process
                self._replace(process)
                retry.appendleft(job)
                continue
            process.job, process.started = job, time.monotonic()

    def _idle(self) -> _Process:
        for process in self._processes:
            if process.job is None:
                return process
        process = _spawn(self.loader)
        self._processes.append(process)
        return process

    def _wait(self, busy: list[_Process], retry: deque[_Job], ready: dict) -> None:
        timeout = None
        if self.timeout is not None:
            now = time.monotonic()
            timeout = max(0.0, min(p.started + self.timeout - now for p in busy))
        for conn in wait([p.conn for p in busy], timeout):
            process = next(p for p in busy if p.conn is conn)
            job = process.job
            try:
                ready[job.seq] = process.conn.recv()
                process.job = None
            except (EOFError, OSError):
                process.job = None  # gone from the pool: the timeout check below skips it
                code = self._replace(process)
                job.tries += 1
                if job.tries < MAX_TRIES:
                    retry.appendleft(job)
                else:
                    ready[job.seq] = Loaded(
                        job.row, error=f"{job.row.path}: the decoder crashed its process "
                        f"{job.tries} times ({code})",
                    )  # fmt: skip
        if self.timeout is not None:
            now = time.monotonic()
            for process in busy:
                job = process.job
                if job is not None and now - process.started >= self.timeout:
                    self._replace(process)
                    ready[job.seq] = Loaded(
                        job.row, error=f"{job.row.path}: decoding timed out after "
                        f"{self.timeout:g} s (its process was killed)",
                    )  # fmt: skip

    def _replace(self, process: _Process) -> str:
        """Kill and reap `process`, drop it from the pool; returns how it ended."""
        process.conn.close()
        code = self._reap(_kill(process.pid), process.pid)
        self._processes.remove(process)
        return code

    def _reap(self, code: str, pid: int) -> str:
        if code == "killed":
            _UNREAPED.add(pid)
        return code


# Processes killed while stuck in I/O end when the I/O returns: reaped by a later close (of
# any pool of this process), so a long-lived process such as a Dask worker keeps no zombies.
_UNREAPED: set[int] = set()


def _reap_killed() -> None:
    for pid in list(_UNREAPED):
        try:
            done, _ = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            done = pid
        if done:
            _UNREAPED.discard(pid)


def _spawn(loader: Callable[[VideoRow], Any]) -> _Process:
    parent_end, child_end = Pipe()
    parent = os.getpid()
    # A SIGTERM or Ctrl-C during fork would run its Python handler inside an at-fork hook,
    # where the exception it raises is swallowed: hold them until the fork is done.
    held = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT})
    try:
        pid = os.fork()
    except BaseException:
        signal.pthread_sigmask(signal.SIG_SETMASK, held)
        raise
    if pid == 0:  # the decoding process
        code = 0
        try:
            parent_end.close()
            _serve(loader, child_end, parent, held)
        except BaseException:  # noqa: BLE001 - never return into the parent's code
            code = 1
        finally:
            os._exit(code)
    signal.pthread_sigmask(signal.SIG_SETMASK, held)
    child_end.close()
    return _Process(pid, parent_end)


def _serve(
    loader: Callable[[VideoRow], Any], conn: Connection, parent: int, mask: set[signal.Signals]
) -> None:
    """The decoding process's loop: a row in, a `Loaded` out, until the pipe closes."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_SETMASK, mask)
    faulthandler.disable()  # a crash is recorded against its video; no traceback dump
    _die_with_parent(parent)
    if "torch" in sys.modules:  # the processes are the parallelism: one thread each
        sys.modules["torch"].set_num_threads(1)
    while True:
        try:
            row = conn.recv()
        except (EOFError, OSError):
            return
        loaded = load(loader, row)
        try:
            conn.send(loaded)
        except OSError:  # the parent is gone
            return
        except Exception as error:  # noqa: BLE001 - decoded data that does not pickle
            conn.send(Loaded(row, error=f"{row.path}: cannot send decoded data: {error}"))


def _die_with_parent(parent: int) -> None:
    """End this process when `parent` ends: Linux's parent-death signal, plus a watchdog."""
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(1)

    if os.getppid() != parent:  # the parent died before the signal was armed
        os._exit(1)
    threading.Thread(target=watch, name="tats-watchdog", daemon=True).start()


def _kill(pid: int) -> str:
    """SIGKILL a decoding process and reap it; how it ended, as words."""
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    try:
        # A process stuck in uninterruptible I/O dies only when the I/O returns: do not wait.
        done, status = os.waitpid(pid, os.WNOHANG)
        if done == 0:
            time.sleep(0.05)
            done, status = os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        return "exited"
    if done == 0:
        return "killed"
    if os.WIFSIGNALED(status):
        return f"signal {signal.Signals(os.WTERMSIG(status)).name}"
    return f"exit code {os.WEXITSTATUS(status)}"

