"""What each video file was when it was extracted, so that a resumed run notices changes.

A stamp is the file's size, modification time and a hash of its first and last 4 KiB (cheap:
two small reads). A resumed run compares the stamps of the rows already done with the files
now: equal size and time is unchanged; a different time is checked against the hash, so that
a copied dataset (new times, same bytes) still resumes, while a replaced or re-encoded video
(its header or its end differ) is refused by name.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import NamedTuple

EDGE = 4096


class SourceStamp(NamedTuple):
    size: int
    mtime_ns: int
    edges: str  # blake2b of the first and last EDGE bytes


def stamp(path: str | Path) -> SourceStamp | None:
    """The stamp of a file, or None when it cannot be read."""
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            mtime = os.fstat(f.fileno()).st_mtime_ns
            return SourceStamp(size, mtime, _edges(f, size))
    except OSError:
        return None


def _edges(f, size: int) -> str:
    h = hashlib.blake2b(digest_size=12)
    h.update(f.read(EDGE))
    if size > EDGE:
        f.seek(max(EDGE, size - EDGE))
        h.update(f.read(EDGE))
    return h.hexdigest()


def change(path: str | Path, recorded: SourceStamp) -> str | None:
    """How the file at `path` differs from its recorded stamp (None: it does not)."""
    try:
        st = os.stat(path)
    except OSError:
        return "the file is gone"
    if st.st_size != recorded.size:
        return f"{recorded.size} bytes then, {st.st_size} now"
    if st.st_mtime_ns == recorded.mtime_ns:
        return None
    now = stamp(path)
    if now is None:
        return "the file cannot be read"
    if now.edges != recorded.edges:
        return "same size, different content"
    return None
