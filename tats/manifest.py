"""Dataset manifests: the CSV listing every video once, with its class and few-shot split.

Format (data_manifests/README.md): a header `video_id,path,label,split` (any order), optional
extra columns kept as strings. The manifest row order is the first axis of every store.
"""

from __future__ import annotations

import csv
import hashlib
import io
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

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


@dataclass(frozen=True)
class Manifest:
    """A validated manifest; sha256 is of the file's bytes (stores record it)."""

    path: Path
    rows: tuple[VideoRow, ...]
    sha256: str

    def __len__(self) -> int:
        return len(self.rows)

    def classes(self, split: str | None = None) -> list[str]:
        """Sorted class names, of one split or of all."""
        return sorted({r.label for r in self.rows if split is None or r.split == split})

    def split_rows(self, split: str) -> list[VideoRow]:
        """The rows of one split, in manifest order."""
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
        return [r for r in self.rows if r.split == split]


class RowChecker:
    """Checks rows one at a time: filled fields, known split, unique ids, disjoint splits.

    `where` names the row for the error message, e.g. "m.csv:12" or "train_few_shot.txt:7".
    """

    def __init__(self) -> None:
        self._id_at: dict[str, str] = {}
        self._split_of_label: dict[str, tuple[str, str]] = {}

    def check(self, where: str, video_id: str, path: str, label: str, split: str) -> None:
        self.check_fields(where, dict(zip(COLUMNS, (video_id, path, label, split), strict=True)))
        if split not in SPLITS:
            raise ManifestError(
                f"{where}: unknown split {split!r} (expected one of {', '.join(SPLITS)})"
            )
        self.check_id(where, video_id)
        first_split, first_where = self._split_of_label.setdefault(label, (split, where))
        if first_split != split:
            raise ManifestError(
                f"{where}: class {label!r} is in split {split!r} but also in {first_split!r} "
                f"(at {first_where}); few-shot splits need disjoint classes"
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
        if video_id in self._id_at:
            raise ManifestError(
                f"{where}: duplicate video_id {video_id!r} (first at {self._id_at[video_id]})"
            )
        self._id_at[video_id] = where


def read_manifest(
    path: str | Path, video_root: str | Path | None = None, check_files: bool = False
) -> Manifest:
    """Read and validate a manifest; raise ManifestError naming the file, line and problem.

    Relative video paths resolve against video_root (default: the manifest's folder); paths are
    made absolute but symlinks are kept. check_files: every video file must exist.
    """
    path = Path(path)
    data, header, records = _read_table(path, COLUMNS)
    root = absolute_path(video_root if video_root is not None else path.parent)
    extra_names = [n for n in header if n not in COLUMNS]
    checker, rows = RowChecker(), []
    for where, values in records:
        video_id, rel, label, split = (values[name] for name in COLUMNS)
        checker.check(where, video_id, rel, label, split)
        video_path = _video_path(where, root, rel, check_files)
        extra = {name: values[name] for name in extra_names}
        rows.append(VideoRow(len(rows), video_id, video_path, label, split, extra))
    if not rows:
        raise ManifestError(f"{path}:2: no videos listed")
    return Manifest(absolute_path(path), tuple(rows), hashlib.sha256(data).hexdigest())


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
    _, header, records = _read_table(path, columns)
    root = absolute_path(video_root if video_root is not None else path.parent)
    checker = checker or RowChecker()
    clips = []
    for where, values in records:
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


def _read_table(
    path: Path, required: tuple[str, ...]
) -> tuple[bytes, list[str], Iterator[tuple[str, dict[str, str]]]]:
    """A CSV file's bytes, its header (which must name every `required` column) and its
    records that are not empty, as ("file:line", {column: value stripped})."""
    try:
        data = path.read_bytes()
    except OSError as err:
        raise ManifestError(f"{path}: cannot read ({err.strerror or err})") from None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise ManifestError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from None
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = [name.strip() for name in next(reader)]
    except StopIteration:
        raise ManifestError(f"{path}:1: empty file, expected a header") from None
    except csv.Error as err:
        raise ManifestError(f"{path}:1: {err}") from None
    _check_header(path, header, required)

    def records() -> Iterator[tuple[str, dict[str, str]]]:
        try:
            for record in reader:
                where = f"{path}:{reader.line_num}"
                if not any(value.strip() for value in record):
                    continue
                if len(record) != len(header):
                    raise ManifestError(
                        f"{where}: {len(record)} fields, the header has {len(header)}"
                    )
                yield where, {n: value.strip() for n, value in zip(header, record, strict=True)}
        except csv.Error as err:
            raise ManifestError(f"{path}:{reader.line_num}: {err}") from None

    return data, header, records()


def _video_path(where: str, root: Path, rel: str, check_files: bool) -> Path:
    video_path = absolute_path(os.path.join(root, os.path.expanduser(rel)))
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
