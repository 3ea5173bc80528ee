"""Dataset manifests: the CSV listing every video once, with its class and few-shot split.

Format (data_manifests/README.md): a header `video_id,path,label,split` (any order), optional
extra columns kept as strings. The manifest row order is the first axis of every store.

A manifest of a million videos is read in a single pass and held by column (`ManifestRows`:
about 100 bytes a row); `manifest.rows[i]` makes row i's VideoRow when asked, and the columns
(`rows.labels`, `rows.splits`) serve whole-dataset questions without one.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import operator
import os
from array import array
from bisect import bisect_right
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from itertools import accumulate
from pathlib import Path

import numpy as np

SPLITS = ("train", "val", "test")
COLUMNS = ("video_id", "path", "label", "split")


class ManifestError(ValueError):
    """A bad manifest or split file; the message reads "<file>:<line>: <problem>"."""


@dataclass(frozen=True)
class VideoRow:
    """One video: its manifest position (first axis of the stores), id, file, class, split."""

    row: int
    video_id: str
    path: Path
    label: str
    split: str
    extra: dict[str, str] = field(default_factory=dict, hash=False)


class PackedStrings(Sequence[str]):
    """Strings packed as one UTF-8 buffer and their end offsets: about a byte a character and
    8 bytes each, where a list of str costs some 60 bytes more per string (and DataLoader
    workers forked from the process copy the pages its reference counts touch)."""

    def __init__(self, values: Iterable[str] = ()):
        self._data, self._ends = bytearray(), array("q")
        self._pending: list[str] = []  # appended, not yet packed: packed in blocks (fast)
        for value in values:
            self.append(value)
        self.pack()

    def append(self, value: str) -> None:
        self._pending.append(value)
        if len(self._pending) >= 4096:
            self.pack()

    def pack(self) -> None:
        """Pack the strings appended since the last pack (appending is done: call it once)."""
        pending, self._pending = self._pending, []
        text = "".join(pending)
        data = text.encode()
        ascii = len(data) == len(text)
        lengths = map(len, pending) if ascii else (len(v.encode()) for v in pending)
        self._ends.extend(accumulate(lengths, initial=len(self._data)))
        del self._ends[len(self._ends) - len(pending) - 1]  # the initial value
        self._data += data

    def __len__(self) -> int:
        return len(self._ends) + len(self._pending)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        i, n, packed = operator.index(i), len(self), len(self._ends)
        if not -n <= i < n:
            raise IndexError(f"string {i} of {n}")
        i %= n
        if i >= packed:  # reading never packs: readers in several threads change nothing
            return self._pending[i - packed]
        return self._data[self._ends[i - 1] if i else 0 : self._ends[i]].decode()

    def find(self, value: str) -> int:
        """The position of the first string equal to `value`, or -1: a search of the packed
        bytes, so that a million strings are never made to compare one."""
        needle, start = value.encode(), 0
        if not needle:
            return next((i for i in range(len(self)) if not self[i]), -1)
        while (at := self._data.find(needle, start)) != -1:
            i = bisect_right(self._ends, at)  # the string that holds byte `at`
            if (self._ends[i - 1] if i else 0) == at and self._ends[i] == at + len(needle):
                return i
            start = at + 1
        if value in self._pending:
            return len(self._ends) + self._pending.index(value)
        return -1

    def __getstate__(self) -> dict:
        if self._pending:
            self.pack()
        return self.__dict__


@dataclass(frozen=True, eq=False)
class _Columns:
    """A manifest's values by column: packed strings for ids and paths, a small integer for
    labels and splits. `root` is what relative paths resolve against (None: paths as given)."""

    root: str | None
    video_ids: PackedStrings
    paths: PackedStrings
    label_names: tuple[str, ...]  # sorted
    labels: np.ndarray  # [R] int32 index into label_names
    splits: np.ndarray  # [R] uint8 index into SPLITS
    extra: dict[str, Sequence[str | None]]  # None: the row has no such value


class ManifestRows(Sequence[VideoRow]):
    """Rows of a manifest, in manifest order, held by column (a few dozen bytes per row, where
    a VideoRow with its Path costs about a kilobyte): `rows[i]` and iteration make each row's
    VideoRow, path resolved, when asked. `index`: the manifest rows of a selection (None: all)."""

    def __init__(self, columns: _Columns, index: np.ndarray | None = None):
        self._columns, self._index = columns, index

    @classmethod
    def of(cls, rows: Iterable[VideoRow]) -> ManifestRows:
        """Rows given as VideoRows, in order (their `row` field is not used: order is position)."""
        rows = list(rows)
        names = tuple(sorted({r.label for r in rows}))
        code = {name: i for i, name in enumerate(names)}
        for r in rows:
            if r.split not in SPLITS:
                raise ValueError(f"{r.video_id}: unknown split {r.split!r}")
        extra_names = dict.fromkeys(name for r in rows for name in r.extra)
        columns = _Columns(
            None,
            PackedStrings(r.video_id for r in rows),
            PackedStrings(str(r.path) for r in rows),
            names,
            np.array([code[r.label] for r in rows], np.int32),
            np.array([SPLITS.index(r.split) for r in rows], np.uint8),
            {name: [r.extra.get(name) for r in rows] for name in extra_names},
        )
        return cls(columns)

    @property
    def numbers(self) -> np.ndarray:
        """[N] int64: the manifest row of each."""
        if self._index is None:
            return np.arange(len(self._columns.video_ids), dtype=np.int64)
        return self._index

    @property
    def label_names(self) -> tuple[str, ...]:
        """Every class of the manifest, sorted."""
        return self._columns.label_names

    @property
    def labels(self) -> np.ndarray:
        """[N] int32: each row's class, an index into `label_names`."""
        labels = self._columns.labels
        return labels if self._index is None else labels[self._index]

    @property
    def splits(self) -> np.ndarray:
        """[N] uint8: each row's split, an index into SPLITS."""
        splits = self._columns.splits
        return splits if self._index is None else splits[self._index]

    @property
    def video_ids(self) -> Sequence[str]:
        """Each row's video id, without making the rows."""
        ids = self._columns.video_ids
        return ids if self._index is None else [ids[r] for r in self._index.tolist()]

    def find(self, video_id: str) -> VideoRow | None:
        """The row of `video_id`, or None where this sequence has none."""
        r = self._columns.video_ids.find(video_id)
        if r == -1:
            return None
        if self._index is not None and not np.any(self._index == r):
            return None
        return self._row(r)

    def select(self, index: np.ndarray) -> ManifestRows:
        """The rows at positions `index` of this sequence."""
        return ManifestRows(self._columns, self.numbers[np.asarray(index, np.int64)])

    def __len__(self) -> int:
        return len(self._columns.video_ids) if self._index is None else len(self._index)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return tuple(self._row(int(r)) for r in self.numbers[i])
        if self._index is not None:
            return self._row(int(self._index[i]))
        i, n = operator.index(i), len(self._columns.video_ids)
        if not -n <= i < n:
            raise IndexError(f"row {i} of {n}")
        return self._row(i % n)

    def __iter__(self) -> Iterator[VideoRow]:
        rows = range(len(self)) if self._index is None else self._index.tolist()
        return (self._row(r) for r in rows)

    def __eq__(self, other) -> bool:
        if isinstance(other, ManifestRows):
            return len(self) == len(other) and all(a == b for a, b in zip(self, other, strict=True))
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"ManifestRows({len(self)} rows)"

    def _row(self, r: int) -> VideoRow:
        c = self._columns
        extra = {name: v[r] for name, v in c.extra.items() if v[r] is not None}
        path = Path(c.paths[r]) if c.root is None else _resolve(c.root, c.paths[r])
        label, split = c.label_names[c.labels[r]], SPLITS[c.splits[r]]
        return VideoRow(r, c.video_ids[r], path, label, split, extra)


@dataclass(frozen=True)
class Manifest:
    """A validated manifest; sha256 is of the file's bytes (stores record it). `rows` may be
    given as any sequence of VideoRows; it is held as ManifestRows."""

    path: Path
    rows: ManifestRows = field(hash=False)
    sha256: str

    def __post_init__(self) -> None:
        if not isinstance(self.rows, ManifestRows):
            object.__setattr__(self, "rows", ManifestRows.of(self.rows))

    def __len__(self) -> int:
        return len(self.rows)

    def classes(self, split: str | None = None) -> list[str]:
        """Sorted class names, of one split or of all."""
        labels = self.rows.labels
        if split is not None:
            labels = labels[self.rows.splits == _split_code(split)]
        return [self.rows.label_names[i] for i in np.unique(labels)]

    def split_rows(self, split: str) -> ManifestRows:
        """The rows of one split, in manifest order."""
        return self.rows.select(np.flatnonzero(self.rows.splits == _split_code(split)))


def _split_code(split: str) -> int:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
    return SPLITS.index(split)


class RowChecker:
    """Checks rows one at a time: filled fields, known split, unique ids, disjoint splits.

    `where` names the row for the error message, e.g. "m.csv:12" or "train_few_shot.txt:7".
    """

    def __init__(self) -> None:
        self._id_at: dict[str, int] = {}  # the check that saw each id first
        self._wheres = PackedStrings()  # `where` of every check_id
        self._split_of_label: dict[str, tuple[str, str]] = {}

    def check(self, where: str, video_id: str, path: str, label: str, split: str) -> None:
        for value in (video_id, path, label, split):
            if not value or "\n" in value or "\r" in value:
                values = (video_id, path, label, split)
                self.check_fields(where, dict(zip(COLUMNS, values, strict=True)))
        if split not in SPLITS:
            raise ManifestError(
                f"{where}: unknown split {split!r} (expected one of {', '.join(SPLITS)})"
            )
        self.check_id(where, video_id)
        first = self._split_of_label.get(label)
        if first is None:
            self._split_of_label[label] = (split, where)
        elif first[0] != split:
            raise ManifestError(
                f"{where}: class {label!r} is in split {split!r} but also in {first[0]!r} "
                f"(at {first[1]}); few-shot splits need disjoint classes"
            )

    def check_fields(self, where: str, values: dict[str, str]) -> None:
        """Every value filled and on one line."""
        for name, value in values.items():
            if not value:
                raise ManifestError(f"{where}: empty {name}")
            if "\n" in value or "\r" in value:
                raise ManifestError(f"{where}: line break inside {name} {value!r}")

    def check_id(self, where: str, video_id: str) -> None:
        """A video id seen by no earlier check."""
        seen = len(self._id_at)
        first = self._id_at.setdefault(video_id, seen)
        if first < seen:
            raise ManifestError(
                f"{where}: duplicate video_id {video_id!r} (first at {self._wheres[first]})"
            )
        self._wheres.append(where)


def read_manifest(
    path: str | Path, video_root: str | Path | None = None, check_files: bool = False
) -> Manifest:
    """Read and validate a manifest; raise ManifestError naming the file, line and problem.

    Relative video paths resolve against video_root (default: the manifest's folder); paths are
    made absolute but symlinks are kept. check_files: every video file must exist.
    """
    path = Path(path)
    table = _Table(path, COLUMNS)
    header = table.header
    root = str(absolute_path(video_root if video_root is not None else path.parent))
    extra = {n: PackedStrings() for n in header if n not in COLUMNS}
    checker, ids, paths = RowChecker(), PackedStrings(), PackedStrings()
    labels, splits, label_code = array("i"), bytearray(), {}
    fixed = operator.itemgetter(*COLUMNS)
    for where, values in table.records():
        video_id, rel, label, split = fixed(values)
        checker.check(where, video_id, rel, label, split)
        if check_files:
            _video_path(where, root, rel, check_files)
        ids.append(video_id)
        paths.append(rel)
        labels.append(label_code.setdefault(label, len(label_code)))
        splits.append(SPLITS.index(split))
        for name, column in extra.items():
            column.append(values[name])
    if not ids:
        raise ManifestError(f"{path}:2: no videos listed")
    for column in (ids, paths, *extra.values()):
        column.pack()
    names = sorted(label_code)
    sorted_code = np.empty(len(names), np.int32)
    sorted_code[[label_code[n] for n in names]] = np.arange(len(names))
    columns = _Columns(
        root, ids, paths, tuple(names), sorted_code[np.frombuffer(labels, np.int32)],
        np.frombuffer(splits, np.uint8).copy(), extra,
    )  # fmt: skip
    return Manifest(absolute_path(path), ManifestRows(columns), table.sha256)


@dataclass(frozen=True)
class ListedClip:
    """A video of a clip list: where it is listed ("file:line"), its id, file and label ("" when
    the list gives none)."""

    where: str
    video_id: str
    path: Path
    label: str


def read_clip_list(
    path: str | Path,
    label_required: bool,
    video_root: str | Path | None = None,
    checker: RowChecker | None = None,
) -> list[ListedClip]:
    """Read a clip list `video_id,path[,label]` (`tats predict`'s support and query lists),
    checked as a manifest is: one-line errors naming the file, line and problem.

    label_required: every row needs a label; else the label column is optional and a row may
    leave it empty. Relative paths resolve against video_root (default: the list's folder).
    Pass one `checker` to several lists to keep their video ids unique across them.
    """
    path = Path(path)
    columns = ("video_id", "path", "label") if label_required else ("video_id", "path")
    table = _Table(path, columns)
    root = absolute_path(video_root if video_root is not None else path.parent)
    checker = checker or RowChecker()
    clips = []
    for where, values in table.records():
        checker.check_fields(where, {name: values[name] for name in columns})
        label = values.get("label", "")
        if label:
            checker.check_fields(where, {"label": label})
        checker.check_id(where, values["video_id"])
        video_path = _video_path(where, root, values["path"], check_files=False)
        clips.append(ListedClip(where, values["video_id"], video_path, label))
    if not clips:
        raise ManifestError(f"{path}:2: no videos listed")
    return clips


class _Table:
    """A CSV file read once, as a stream: its header (which must name every `required`
    column), its records that are not empty as ("file:line", {column: value stripped}), and,
    once they are all read, the SHA-256 of its bytes."""

    def __init__(self, path: Path, required: tuple[str, ...]):
        self.path = path
        try:
            self._file = path.open("rb")
        except OSError as err:
            raise ManifestError(f"{path}: cannot read ({err.strerror or err})") from None
        self._raw = _Hashing(self._file)
        text = io.TextIOWrapper(io.BufferedReader(self._raw), "utf-8-sig", newline="")
        self._reader = csv.reader(text)
        try:
            with self._errors(1):
                self.header = [name.strip() for name in next(self._reader)]
            _check_header(path, self.header, required)
        except StopIteration:
            self._file.close()
            raise ManifestError(f"{path}:1: empty file, expected a header") from None
        except BaseException:
            self._file.close()
            raise

    def records(self) -> Iterator[tuple[str, dict[str, str]]]:
        path, header, reader = self.path, self.header, self._reader
        with self._file, self._errors(None):
            for record in reader:
                where = f"{path}:{reader.line_num}"
                if not "".join(record).strip():
                    continue
                if len(record) != len(header):
                    raise ManifestError(
                        f"{where}: {len(record)} fields, the header has {len(header)}"
                    )
                yield where, {n: value.strip() for n, value in zip(header, record, strict=True)}

    @property
    def sha256(self) -> str:
        if not self._file.closed:
            raise RuntimeError("the digest of a table is known once its records are read")
        return self._raw.hash.hexdigest()

    @contextlib.contextmanager
    def _errors(self, line: int | None) -> Iterator[None]:
        """csv and decoding errors as ManifestErrors naming the file and line (or byte)."""
        try:
            yield
        except csv.Error as err:
            raise ManifestError(f"{self.path}:{line or self._reader.line_num}: {err}") from None
        except UnicodeDecodeError:
            try:  # the offset in the file: the stream's error counts from its last block
                self.path.read_bytes().decode("utf-8-sig")
            except UnicodeDecodeError as err:
                raise ManifestError(
                    f"{self.path}: not UTF-8 text ({err.reason} at byte {err.start})"
                ) from None
            raise


class _Hashing(io.RawIOBase):
    """A file read through, hashing what it reads."""

    def __init__(self, file: io.BufferedReader):
        self._file, self.hash = file, hashlib.sha256()

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        n = self._file.readinto(buffer)
        self.hash.update(memoryview(buffer)[:n])
        return n


def _resolve(root: str, rel: str) -> Path:
    return absolute_path(os.path.join(root, os.path.expanduser(rel)))


def _video_path(where: str, root: str | Path, rel: str, check_files: bool) -> Path:
    video_path = _resolve(str(root), rel)
    if check_files and not video_path.is_file():
        raise ManifestError(f"{where}: video file not found: {video_path}")
    return video_path


def write_manifest(rows: Iterable[VideoRow], path: str | Path) -> None:
    """Write rows in the given order (their `row` field is not used: order is position).

    Paths inside the manifest's folder are written relative to it, others absolute. Rows are
    checked as read_manifest would; the file is replaced atomically.
    """
    path = Path(path)
    inside = os.path.join(absolute_path(path.parent), "")  # folder path ending in a separator
    rows = list(rows)
    extra_names = list(dict.fromkeys(name for r in rows for name in r.extra))
    clash = sorted(set(extra_names) & set(COLUMNS))
    if clash:
        raise ManifestError(f"{path}:1: extra column {clash[0]!r} clashes with a fixed column")
    if not rows:
        raise ManifestError(f"{path}:2: no videos to write")
    checker = RowChecker()
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow([*COLUMNS, *extra_names])
    for line, r in enumerate(rows, start=2):
        rel = str(absolute_path(r.path))
        if rel.startswith(inside):
            rel = rel[len(inside) :]
        rel = rel.replace(os.sep, "/")
        checker.check(f"{path}:{line}", r.video_id, rel, r.label, r.split)
        extra = [r.extra.get(name, "") for name in extra_names]
        writer.writerow([r.video_id, rel, r.label, r.split, *extra])
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(out.getvalue(), encoding="utf-8")
    os.replace(tmp, path)


def _check_header(path: Path, header: list[str], required: tuple[str, ...] = COLUMNS) -> None:
    seen: set[str] = set()
    for i, name in enumerate(header):
        if not name:
            raise ManifestError(f"{path}:1: column {i + 1} has no name")
        if name in seen:
            raise ManifestError(f"{path}:1: column {name!r} appears twice")
        seen.add(name)
    for name in required:
        if name not in seen:
            raise ManifestError(
                f"{path}:1: missing column {name!r} (header: {','.join(header)}; "
                f"expected {','.join(required)})"
            )


def absolute_path(path: str | Path) -> Path:
    """Absolute and normalised, without resolving symlinks (a link keeps its own suffix)."""
    return Path(os.path.abspath(path))
