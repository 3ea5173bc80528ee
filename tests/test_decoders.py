"""The decoder pool: rows are decoded in forked processes that may crash or hang."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

from tats.manifest import VideoRow
from tats.pipeline.decoders import DecoderPool

# Generous: rows that return at once must come back within it on a machine busy with other
# work; the tests wait on what happened (a crash's marker file), never on a guess of speed.
TIMEOUT = 3.0


def _load(row: VideoRow) -> str:
    if row.video_id == "crash":
        row.path.with_name(f"crashed-{os.getpid()}").touch()
        os.kill(os.getpid(), signal.SIGKILL)
    if row.video_id == "hang":
        time.sleep(60)
    return row.video_id


def _rows(tmp_path: Path, ids: list[str]) -> list[VideoRow]:
    rows = [VideoRow(i, v, tmp_path / f"{v}.mp4", "x", "train") for i, v in enumerate(ids)]
    for row in rows:
        row.path.write_bytes(b"not decoded: the loader only names the row")
    return rows


def test_crash_while_the_consumer_is_busy_past_the_timeout_fails_only_that_row(tmp_path):
    # The consumer (the model, in a stage) holds on to the first row for longer than the
    # timeout while the second row's process dies: that row is a crash, not a timeout, and
    # the pool carries on with the rest.
    with DecoderPool(_load, 2, timeout=TIMEOUT) as pool:
        loaded = pool.map(_rows(tmp_path, ["a", "crash", "b"]))
        first = next(loaded)
        deadline = time.monotonic() + 120
        while not list(tmp_path.glob("crashed-*")):
            assert time.monotonic() < deadline, "the crashing row never ran"
            time.sleep(0.01)
        time.sleep(TIMEOUT)  # past the timeout of the dead process's row
        rest = list(loaded)
    assert (first.data, first.error) == ("a", None)
    assert [item.row.video_id for item in rest] == ["crash", "b"]
    assert "crashed its process 2 times" in rest[0].error and "crash.mp4" in rest[0].error
    assert (rest[1].data, rest[1].error) == ("b", None)


def test_hanging_row_times_out_and_the_others_are_decoded(tmp_path):
    with DecoderPool(_load, 2, timeout=TIMEOUT) as pool:
        loaded = list(pool.map(_rows(tmp_path, ["a", "hang", "b", "c"])))
    assert [item.data for item in loaded] == ["a", None, "b", "c"]
    assert f"hang.mp4: decoding timed out after {TIMEOUT:g} s" in loaded[1].error
