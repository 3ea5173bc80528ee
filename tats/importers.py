"""Split importers: published few-shot split lists -> manifest rows (data_manifests/README.md);
a folder of class folders -> manifest rows with a seeded split of the classes.

Formats, one file per split (train and test required, val optional):
- molo: `{split}_few_shot.txt`, lines `<split><k>/<id>` (SSv2) or `<split><k>//<path>`;
- trx: `{split}list<XX>.txt`, lines `<class>/<video>` (SSv2: `<split><k>/<id>`);
- tats-json: `{split}_few_shot.json`, a list of {"id": ..., "label": ...}.
Each entry maps to the file the dataset's usual layout gives: SSv2 `<root>/<id>.webm`, the
others `<root>/<path>` (the part after `//` where there is one), with the dataset's suffix
added when the path has none. The class is the video's folder where the path has one, else
the list's class token (`train0`, `test12`, or `<split><label>` for numeric JSON labels).
"""

from __future__ import annotations

import json
import os
import posixpath
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tats.manifest import SPLITS, ManifestError, RowChecker, VideoRow, absolute_path

FORMATS = ("molo", "trx", "tats-json")
DATASETS = ("ssv2", "kinetics", "hmdb", "ucf", "other")
DEFAULT_SUFFIX = {"ssv2": ".webm", "kinetics": ".mp4", "hmdb": ".avi", "ucf": ".avi", "other": ""}
VIDEO_SUFFIXES = {
    ".webm", ".mp4", ".avi", ".mkv", ".mov", ".m4v", ".mpg", ".mpeg", ".flv", ".wmv", ".ogv",
    ".3gp", ".ts",
}  # fmt: skip


@dataclass(frozen=True)
class SplitEntry:
    """One video of a split list: where the list names it ("file:line") and its manifest row."""

    where: str
    row: VideoRow


def import_splits(
    fmt: str,
    source: str | Path,
    video_root: str | Path,
    dataset: str = "other",
    split_number: str | None = None,
    suffix: str | None = None,
) -> list[SplitEntry]:
    """Read a folder of split lists into manifest rows (train, then val, then test).

    suffix: the file extension added to paths that have none (default: the dataset's usual
    one). Raises ManifestError naming the list file and line for a bad or conflicting entry.
    """
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; expected one of {', '.join(FORMATS)}")
    if dataset not in DATASETS:
        raise ValueError(f"unknown dataset {dataset!r}; expected one of {', '.join(DATASETS)}")
    suffix = DEFAULT_SUFFIX[dataset] if suffix is None else suffix
    if suffix and not suffix.startswith("."):
        suffix = "." + suffix
    root = str(absolute_path(video_root))
    checker, entries = RowChecker(), []
    for split, list_file in split_files(fmt, Path(source), split_number).items():
        if fmt == "tats-json":
            items = _json_items(list_file, split)
        else:
            items = _text_items(list_file, dataset)
        for where, name, label in items:
            rel = _relative_path(where, name, dataset, suffix) if name else ""
            video_id = posixpath.splitext(posixpath.basename(rel))[0]
            checker.check(where, video_id, rel, label, split)
            video_path = absolute_path(os.path.join(root, rel))
            row = VideoRow(len(entries), video_id, video_path, label, split)
            entries.append(SplitEntry(where, row))
    return entries


def missing_files(entries: list[SplitEntry]) -> list[SplitEntry]:
    """The entries whose video file does not exist."""
    return [e for e in entries if not e.row.path.is_file()]


def split_files(fmt: str, source: Path, split_number: str | None = None) -> dict[str, Path]:
    """The list file of each split present in `source` (train and test must be there)."""
    if not source.is_dir():
        raise ManifestError(f"{source}: not a folder of split lists")
    if fmt == "trx":
        split_number = split_number or _only_trx_number(source)
        names = {split: f"{split}list{split_number}.txt" for split in SPLITS}
    else:
        ext = "json" if fmt == "tats-json" else "txt"
        names = {split: f"{split}_few_shot.{ext}" for split in SPLITS}
    files = {split: source / name for split, name in names.items() if (source / name).is_file()}
    for split in ("train", "test"):
        if split not in files:
            raise ManifestError(f"{source / names[split]}: no such file ({fmt} {split} list)")
    return files


def _only_trx_number(source: Path) -> str:
    numbers = sorted(p.stem.removeprefix("trainlist") for p in source.glob("trainlist*.txt"))
    if len(numbers) != 1:
        found = ", ".join(numbers) or "none"
        raise ManifestError(f"{source}: give --split-number (trainlistXX.txt numbers: {found})")
    return numbers[0]


def _text_items(list_file: Path, dataset: str):
    """(where, name, class) per non-blank line of a MoLo/TRX list."""
    try:
        lines = list_file.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise ManifestError(f"{list_file}: cannot read ({err})") from None
    for number, line in enumerate(lines, start=1):
        line = line.strip()
        if not line:
            continue
        token, sep, rest = line.partition("//")
        if sep:  # `<split><k>//<path>`: the class is the video's folder, else the token
            name, label = rest, _folder_name(rest) or token
        elif dataset == "ssv2":  # `<split><k>/<id>` (MoLo, TRX): the class token only
            label, _, name = line.rpartition("/")
        else:  # `<class>/<video>` (TRX)
            name, label = line, _folder_name(line)
        yield f"{list_file}:{number}", name, label


def _json_items(list_file: Path, split: str):
    """(where, id, class) per entry of a TATs JSON list; numeric labels become <split><k>."""
    try:
        entries = json.loads(list_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ManifestError(f"{list_file}: cannot read JSON ({err})") from None
    if not isinstance(entries, list):
        raise ManifestError(f"{list_file}: expected a JSON list of {{'id', 'label'}} entries")
    for number, entry in enumerate(entries, start=1):
        where = f"{list_file}:entry {number}"
        if not isinstance(entry, dict) or "id" not in entry or "label" not in entry:
            raise ManifestError(f"{where}: expected an object with 'id' and 'label'")
        label = str(entry["label"]).strip()
        yield where, str(entry["id"]).strip(), (f"{split}{label}" if label.isdigit() else label)


def _relative_path(where: str, name: str, dataset: str, suffix: str) -> str:
    """The video file of a list entry, relative to the video root (SSv2: flat <id>.webm)."""
    rel = name.strip("/")
    if dataset == "ssv2":
        rel = posixpath.basename(rel)
    if posixpath.splitext(rel)[1].lower() not in VIDEO_SUFFIXES:
        if not suffix:
            raise ManifestError(f"{where}: {name!r} has no video file extension; give --ext")
        rel += suffix
    return rel


def _folder_name(rel: str) -> str:
    """The name of the folder holding a relative path ("" if none): the class, in most lists."""
    return posixpath.basename(posixpath.dirname(rel.strip("/")))


# ---------------------------------------------------------------------------------------------
# a folder of class folders


DEFAULT_SHARE = 0.2  # of the classes, for val and for test


def split_sizes(
    classes: int, val: float | None, test: float | None, at_least: int = 1
) -> tuple[int, int, int]:
    """Classes of (train, val, test): `val` and `test` are fractions of the classes (below 1)
    or counts (whole numbers from 1); None: 20% of the classes, and at least `at_least`
    (an episode's way); train keeps the rest, at least one."""
    sizes = []
    for name, value in (("--val", val), ("--test", test)):
        if value is None:
            sizes.append(max(round(DEFAULT_SHARE * classes), at_least))
            continue
        if value < 0 or (value >= 1 and value != int(value)):
            raise ValueError(f"{name} {value}: a fraction of the classes (below 1) or a count")
        sizes.append(int(value) if value >= 1 else max(round(value * classes), int(value > 0)))
    train = classes - sum(sizes)
    if train < 1:
        raise ValueError(
            f"{classes} classes cannot give {sizes[0]} val and {sizes[1]} test classes and "
            "still some to train on; give smaller --val / --test"
        )
    return train, sizes[0], sizes[1]


def rows_from_folders(
    folder: str | Path,
    val: float | None = None,
    test: float | None = None,
    seed: int = 0,
    at_least: int = 1,
) -> list[VideoRow]:
    """Manifest rows of a folder of class folders (`folder/<class>/.../<clip>.<video suffix>`):
    the classes shuffled with `seed` and split whole into train, val and test (`split_sizes`),
    rows by split, class and path; video ids `<class>_<clip path without suffix>`."""
    folder = absolute_path(folder)
    if not folder.is_dir():
        raise ManifestError(f"{folder}: not a folder")
    clips: dict[str, list[Path]] = {}
    for sub in sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")):
        found = sorted(p for p in sub.rglob("*") if p.suffix.lower() in VIDEO_SUFFIXES
                       and p.is_file() and not p.name.startswith("."))  # fmt: skip
        if found:
            clips[sub.name] = found
    if not clips:
        raise ManifestError(
            f"{folder}: no class folders with videos ({', '.join(sorted(VIDEO_SUFFIXES))}) in it"
        )
    names = sorted(clips)
    train, val_n, _ = split_sizes(len(names), val, test, at_least)
    order = np.random.default_rng(seed).permutation(len(names))
    split_of = {}
    for rank, i in enumerate(order):
        split_of[names[i]] = "train" if rank < train else "val" if rank < train + val_n else "test"
    checker, rows, seen = RowChecker(), [], {}
    for split in SPLITS:
        for name in (n for n in names if split_of[n] == split):
            for path in clips[name]:
                stem = path.relative_to(folder / name).with_suffix("").as_posix()
                video_id = f"{name}_{stem.replace('/', '_')}"
                if video_id in seen:
                    raise ManifestError(
                        f"{path}: video id {video_id!r} is also {seen[video_id]}'s; rename one"
                    )
                seen[video_id] = path
                checker.check(str(path), video_id, str(path), name, split)
                rows.append(VideoRow(len(rows), video_id, path, name, split))
    return rows
