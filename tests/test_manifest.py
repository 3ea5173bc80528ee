"""Manifests: reading, validation (through `tats manifest check`), writing."""

import hashlib
import shutil
import tracemalloc
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tats.cli import app
from tats.manifest import ManifestError, VideoRow, read_manifest, write_manifest

GOOD = """video_id,path,label,split,source
a1,videos/a1.mp4,jump,train,yt
a2,videos/a2.mp4,jump,train,yt
b1,videos/b1.mp4,run,val,
c1,/abs/c1.webm,swim,test,yt
c2,videos/c2.mp4,dive,test,
"""


def tats(*args: str):
    return CliRunner().invoke(app, [str(a) for a in args])


def write(folder: Path, text: str, name: str = "m.csv") -> Path:
    path = folder / name
    path.write_text(text)
    return path


def test_read_resolves_paths_keeps_extras_and_hashes_bytes(tmp_path):
    path = write(tmp_path, GOOD)
    manifest = read_manifest(path)
    assert manifest.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert [r.row for r in manifest.rows] == [0, 1, 2, 3, 4]
    assert manifest.rows[0] == VideoRow(
        0, "a1", tmp_path / "videos" / "a1.mp4", "jump", "train", {"source": "yt"}
    )
    assert manifest.rows[3].path == Path("/abs/c1.webm")
    assert manifest.classes() == ["dive", "jump", "run", "swim"]
    assert manifest.classes("test") == ["dive", "swim"]
    assert [r.video_id for r in manifest.split_rows("test")] == ["c1", "c2"]
    other = read_manifest(path, video_root=tmp_path / "elsewhere")
    assert other.rows[0].path == tmp_path / "elsewhere" / "videos" / "a1.mp4"
    assert other.rows[3].path == Path("/abs/c1.webm")


# GOOD with a second test video of each test class: 1-way 1-shot episodes with 1 query.
EPISODES_OF_ONE = GOOD + "c3,videos/c3.mp4,swim,test,\nc4,videos/c4.mp4,dive,test,\n"
ONE_WAY = ("--way", "1", "--shot", "1", "--train-queries", "1", "--test-queries", "1")


def test_check_prints_classes_and_videos_per_split(tmp_path):
    result = tats("manifest", "check", write(tmp_path, EPISODES_OF_ONE), *ONE_WAY)
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert "7 videos, 4 classes" in lines[0]
    assert lines[1].split() == ["train", "1", "classes", "2", "videos"]
    assert lines[2].split() == ["val", "1", "classes", "1", "videos"]
    assert lines[3].split() == ["test", "2", "classes", "4", "videos"]
    assert "1-way 1-shot, 1 training and 1 test queries per class: ok" in lines[4]
    assert "the val split" in result.stderr and "no validation" in result.stderr


def test_check_refuses_splits_too_small_for_the_episodes(tmp_path):
    path = write(tmp_path, GOOD)
    result = tats("manifest", "check", path)
    assert result.exit_code == 2
    assert result.stdout.splitlines()[1].split() == ["train", "1", "classes", "2", "videos"]
    assert result.stderr == (
        f"error: the train split of {path} has 0 classes with at least 7 videos "
        "(1 support + 6 queries); 5-way episodes need 5\n"
    )


BAD = {
    "missing column": (
        "video_id,path,split\na1,a.mp4,train\n",
        ":1: missing column 'label'",
    ),
    "empty field": (
        GOOD.replace("b1,videos/b1.mp4,run,val,", "b1,videos/b1.mp4,,val,"),
        ":4: empty label",
    ),
    "duplicate video_id": (
        GOOD.replace("c2,videos/c2.mp4", "a2,videos/c2.mp4"),
        ":6: duplicate video_id 'a2' (first at ",
    ),
    "unknown split": (
        GOOD.replace("run,val", "run,validation"),
        ":4: unknown split 'validation'",
    ),
    "class in two splits": (
        GOOD.replace("c2,videos/c2.mp4,dive,test", "c2,videos/c2.mp4,jump,test"),
        ":6: class 'jump' is in split 'test' but also in 'train'",
    ),
    "wrong field count": (
        GOOD.replace("b1,videos/b1.mp4,run,val,", "b1,videos/b1.mp4,run,val"),
        ":4: 4 fields, the header has 5",
    ),
    "no rows": ("video_id,path,label,split\n", ":2: no videos listed"),
}


@pytest.mark.parametrize("problem", list(BAD))
def test_bad_manifest_exits_2_naming_the_line(tmp_path, problem):
    text, message = BAD[problem]
    path = write(tmp_path, text)
    result = tats("manifest", "check", path)
    assert result.exit_code == 2
    assert result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith(f"error: {path}:")
    assert message in result.stderr
    assert result.stdout == ""
    with pytest.raises(ManifestError, match=message.replace("(", r"\(")):
        read_manifest(path)


def test_missing_video_file_fails_only_with_check_files(tmp_path):
    path = write(tmp_path, EPISODES_OF_ONE)
    assert tats("manifest", "check", path, *ONE_WAY).exit_code == 0
    result = tats("manifest", "check", path, "--check-files", *ONE_WAY)
    assert result.exit_code == 2
    absent = tmp_path / "videos" / "a1.mp4"
    assert result.stderr == f"error: {path}:2: video file not found: {absent}\n"
    for name in ("a1.mp4", "a2.mp4", "b1.mp4", "c2.mp4", "c3.mp4", "c4.mp4"):
        (tmp_path / "videos").mkdir(exist_ok=True)
        (tmp_path / "videos" / name).write_bytes(b"x")
    result = tats("manifest", "check", path, "--check-files", *ONE_WAY)
    assert (
        result.exit_code == 2 and f"{path}:5: video file not found: /abs/c1.webm" in result.stderr
    )
    root = tmp_path / "root"
    shutil.copytree(tmp_path / "videos", root / "videos")
    assert tats("manifest", "check", path, "--video-root", root, *ONE_WAY).exit_code == 0


def test_unreadable_manifest_is_one_line(tmp_path):
    result = tats("manifest", "check", tmp_path / "absent.csv")
    assert result.exit_code == 2 and result.stderr.count("\n") == 1
    assert str(tmp_path / "absent.csv") in result.stderr
    binary = tmp_path / "bin.csv"
    binary.write_bytes(b"video_id,path,label,split\n\xff\xfe,x,y,train\n")
    result = tats("manifest", "check", binary)
    assert result.exit_code == 2 and "not UTF-8" in result.stderr


def test_write_then_move_the_dataset_folder(tmp_path):
    dataset = tmp_path / "dataset"
    rows = [
        VideoRow(0, "v0", dataset / "clips" / "v0.mp4", "wave", "train", {"fps": "30"}),
        VideoRow(1, "v1", dataset / "clips" / "v1.mp4", "clap", "test"),
        VideoRow(2, "v2", Path("/data/v2.mp4"), "clap", "test", {"note": 'a, "quoted"'}),
    ]
    write_manifest(rows, dataset / "manifest.csv")
    text = (dataset / "manifest.csv").read_text()
    assert text.splitlines()[:2] == [
        "video_id,path,label,split,fps,note",
        "v0,clips/v0.mp4,wave,train,30,",
    ]
    moved = tmp_path / "moved"
    shutil.move(dataset, moved)
    manifest = read_manifest(moved / "manifest.csv")
    assert [r.path for r in manifest.rows] == [
        moved / "clips" / "v0.mp4",
        moved / "clips" / "v1.mp4",
        Path("/data/v2.mp4"),
    ]
    assert manifest.rows[2].extra == {"fps": "", "note": 'a, "quoted"'}
    assert [(r.video_id, r.label, r.split) for r in manifest.rows] == [
        (r.video_id, r.label, r.split) for r in rows
    ]


def test_write_refuses_what_read_would_refuse(tmp_path):
    out = tmp_path / "m.csv"
    twice = [VideoRow(i, "same", tmp_path / f"{i}.mp4", "a", "train") for i in range(2)]
    with pytest.raises(ManifestError, match=r"m.csv:3: duplicate video_id 'same'"):
        write_manifest(twice, out)
    overlap = [
        VideoRow(0, "x", tmp_path / "x.mp4", "a", "train"),
        VideoRow(1, "y", tmp_path / "y.mp4", "a", "val"),
    ]
    with pytest.raises(ManifestError, match="class 'a' is in split 'val'"):
        write_manifest(overlap, out)
    assert not out.exists()


def test_rows_are_held_by_column_at_a_small_cost_per_row(tmp_path):
    # A manifest costs every process that reads it (extraction workers, trainer ranks, their
    # DataLoader workers): 1M rows must stay far under a gigabyte (about 1 KB a row as a
    # VideoRow with its Path).
    n = 10_000
    lines = ["video_id,path,label,split,source"]
    for i in range(n):
        split = ("train", "val", "test")[i % 100 // 80 + i % 100 // 90]
        vid = f"{i * 7919:012x}_{i:06d}"
        lines.append(f"{vid},{split}/class {i % 100}/{vid}.mp4,class {i % 100},{split},yt")
    path = write(tmp_path, "\n".join(lines) + "\n")
    tracemalloc.start()
    try:
        manifest = read_manifest(path)
        held, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert held / n < 150 and peak / n < 400, (held / n, peak / n)  # bytes per row
    assert len(manifest) == n and manifest.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    row = manifest.rows[8081]
    vid = f"{8081 * 7919:012x}_008081"
    assert row == VideoRow(
        8081, vid, tmp_path / "val" / "class 81" / f"{vid}.mp4", "class 81", "val", {"source": "yt"}
    )
    assert manifest.rows[-1].row == n - 1 and len(manifest.split_rows("test")) == n // 10
    assert manifest.classes("val") == [f"class {c}" for c in range(80, 90)]
    assert [r.video_id for r in manifest.split_rows("val")[:2]] == [
        f"{80 * 7919:012x}_000080",
        f"{81 * 7919:012x}_000081",
    ]


def test_a_row_is_found_by_its_id_among_look_alike_ids(tmp_path):
    # `tats viz` finds one video of a million-row manifest: by a search of the packed ids, which
    # must not take a part of another id ("a1" in "xa1", "a10") for it.
    ids = ["xa1", "a10", "a1", "é1", "b1a1", "1"]
    text = "video_id,path,label,split\n" + "".join(
        f"{vid},v/{i}.mp4,{'jump run swim'.split()[i % 3]},{'train val test'.split()[i % 3]}\n"
        for i, vid in enumerate(ids)
    )
    rows = read_manifest(write(tmp_path, text)).rows
    for i, vid in enumerate(ids):
        assert rows.find(vid).row == i and rows.find(vid).video_id == vid
    assert rows.find("a") is None and rows.find("a1a") is None and rows.find("") is None
    assert list(rows.video_ids) == ids
    tests = rows.select([2, 5])  # a selection finds only its own rows
    assert tests.find("1").row == 5 and tests.find("a10") is None
    assert tests.video_ids == ["a1", "1"]


def class_folders(root: Path, classes: int, clips: int = 8) -> Path:
    """A user's folder of class folders (one clip per class one folder deeper, and hidden files
    and non-videos that must be left out)."""
    for c in range(classes):
        folder = root / f"class{c:02d}"
        (folder / "day2").mkdir(parents=True)
        for i in range(clips - 1):
            (folder / f"clip{i}.mp4").write_bytes(b"")
        (folder / "day2" / "clip0.webm").write_bytes(b"")
        (folder / "notes.txt").write_text("not a video")
        (folder / ".hidden.mp4").write_bytes(b"")
    return root


def test_from_folders_splits_whole_classes_with_a_seed(tmp_path):
    videos = class_folders(tmp_path / "videos", 24)
    result = tats("manifest", "from-folders", videos)
    assert result.exit_code == 0, result.output
    manifest = read_manifest(videos / "manifest.csv")
    assert len(manifest) == 24 * 8
    assert {row.path for row in manifest.rows} == {
        p for p in videos.rglob("*") if p.suffix in (".mp4", ".webm") and p.name[0] != "."
    }
    splits = {s: set(manifest.classes(s)) for s in ("train", "val", "test")}
    assert [len(splits[s]) for s in ("train", "val", "test")] == [14, 5, 5]  # 20%, at least --way
    assert not (splits["train"] & splits["val"] or splits["train"] & splits["test"]
                or splits["val"] & splits["test"])  # fmt: skip
    assert "class00_day2_clip0" in {row.video_id for row in manifest.rows}
    first = (videos / "manifest.csv").read_bytes()
    assert tats("manifest", "from-folders", videos).exit_code == 0
    assert (videos / "manifest.csv").read_bytes() == first, "the same seed, the same manifest"
    other = tats("manifest", "from-folders", videos, "--seed", "1", "-o", tmp_path / "m1.csv")
    assert other.exit_code == 0, other.output
    assert set(read_manifest(tmp_path / "m1.csv").classes("test")) != splits["test"]


def test_from_folders_takes_counts_or_fractions(tmp_path):
    videos = class_folders(tmp_path / "videos", 24)
    result = tats("manifest", "from-folders", videos, "--val", "6", "--test", "0.25")
    assert result.exit_code == 0, result.output
    manifest = read_manifest(videos / "manifest.csv")
    assert [len(manifest.classes(s)) for s in ("train", "val", "test")] == [12, 6, 6]


@pytest.mark.parametrize(
    "classes, options, message",
    [(8, [], "8 classes cannot give 5 val and 5 test classes"),
     (12, ["--test", "2"], "5-way episodes need 5: give --test more classes (e.g. --test 5)"),
     (24, ["--train-queries", "8"], "need 5: add videos to the classes, or lower --shot"),
     (12, ["--val", "1.5"], "--val 1.5: a fraction of the classes (below 1) or a count"),
     (0, [], "no class folders with videos")],
)  # fmt: skip
def test_from_folders_refuses_a_split_the_episodes_cannot_use(tmp_path, classes, options, message):
    videos = class_folders(tmp_path / "videos", classes)
    videos.mkdir(exist_ok=True)
    result = tats("manifest", "from-folders", videos, *options)
    assert result.exit_code == 2, result.output
    assert message in result.output, result.output
    assert not (videos / "manifest.csv").exists()
    assert [p.name for p in videos.iterdir() if p.is_file()] == []
