"""Split importers: the real MoLo lists (data_manifests/splits/molo), and small TRX / JSON lists."""

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tats.cli import app
from tats.manifest import read_manifest

MOLO = Path(__file__).parents[1] / "data_manifests" / "splits" / "molo"

# (folder, --dataset, classes per split, videos per split) as the published lists hold them
MOLO_SPLITS = [
    ("ssv2_small", "ssv2", (64, 12, 24), (6400, 1200, 2400)),
    ("ssv2_full", "ssv2", (64, 12, 24), (67013, 1926, 2857)),
    ("kinetics100", "kinetics", (64, 12, 24), (6400, 1200, 2400)),
    ("hmdb51", "hmdb", (31, 10, 10), (4280, 1194, 1292)),
    ("ucf101", "ucf", (70, 10, 21), (9154, 1421, 2745)),
]


def tats(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.mark.parametrize(("folder", "dataset", "classes", "videos"), MOLO_SPLITS)
def test_molo_lists_import_with_their_counts(tmp_path, folder, dataset, classes, videos):
    out = tmp_path / "m.csv"
    result = tats(
        "manifest", "import", "--format", "molo", MOLO / folder,
        "--video-root", "/x", "--out", out, "--dataset", dataset,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    manifest = read_manifest(out)
    assert len(manifest) == sum(videos)
    for split, n_classes, n_videos in zip(("train", "val", "test"), classes, videos, strict=True):
        assert len(manifest.classes(split)) == n_classes
        assert len(manifest.split_rows(split)) == n_videos
    check = tats("manifest", "check", out)
    assert check.exit_code == 0, check.output
    for line, split, n_classes, n_videos in zip(
        check.stdout.splitlines()[1:4], ("train", "val", "test"), classes, videos, strict=True
    ):
        assert line.split() == [split, str(n_classes), "classes", str(n_videos), "videos"]
    assert check.stdout.splitlines()[0].startswith(f"{out}: {sum(videos)} videos")


def test_molo_lines_map_to_the_dataset_layout(tmp_path):
    def first_rows(folder, dataset):
        out = tmp_path / f"{folder}.csv"
        result = tats(
            "manifest", "import", "--format", "molo", MOLO / folder, "--video-root", "/x",
            "--out", out, "--dataset", dataset,
        )  # fmt: skip
        assert result.exit_code == 0, result.output
        return read_manifest(out).rows

    ssv2 = first_rows("ssv2_small", "ssv2")  # train0/51958
    assert (ssv2[0].video_id, ssv2[0].path, ssv2[0].label) == (
        "51958",
        Path("/x/51958.webm"),
        "train0",
    )
    k100 = first_rows("kinetics100", "kinetics")  # train0//train_256/air_drumming/-VtLx...mp4
    assert k100[0].path == Path("/x/train_256/air_drumming/-VtLx-mcPds_000012_000022.mp4")
    assert (k100[0].video_id, k100[0].label) == ("-VtLx-mcPds_000012_000022", "air_drumming")
    hmdb = first_rows("hmdb51", "hmdb")  # train0//videos/brush_hair/April_09_..._0.avi
    assert hmdb[0].path == Path("/x/videos/brush_hair/April_09_brush_hair_u_nm_np1_ba_goo_0.avi")
    assert hmdb[0].label == "brush_hair"
    assert {r.label for r in hmdb if r.split == "test"} >= {"fencing"}


def make_molo(folder: Path, lines: dict[str, list[str]]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for split, split_lines in lines.items():
        (folder / f"{split}_few_shot.txt").write_text("\n".join(split_lines) + "\n")
    return folder


def test_absent_videos_are_reported_not_dropped(tmp_path):
    src = make_molo(tmp_path / "lists", {
        "train": ["train0//videos/wave/w1.avi", "train0//videos/wave/w2.avi"],
        "val": ["val0//videos/clap/c1.avi"],
        "test": ["test0//videos/jump/j1.avi", "", "test0//videos/jump/j2.avi"],
    })  # fmt: skip
    videos = tmp_path / "videos_root"
    for rel in ("videos/wave/w1.avi", "videos/wave/w2.avi", "videos/clap/c1.avi",
                "videos/jump/j1.avi"):  # fmt: skip
        (videos / rel).parent.mkdir(parents=True, exist_ok=True)
        (videos / rel).write_bytes(b"x")
    out = tmp_path / "m.csv"
    args = ["manifest", "import", "--format", "molo", src, "--video-root", videos, "--out", out]
    result = tats(*args, "--dataset", "hmdb", "--check-files")
    assert result.exit_code == 2
    line, absent = src / "test_few_shot.txt", videos / "videos" / "jump" / "j2.avi"
    assert result.stderr == f"error: {line}:3: video file not found: {absent}\n"
    assert not out.exists()
    result = tats(*args, "--dataset", "hmdb", "--drop-missing")
    assert result.exit_code == 0, result.output
    assert f"{src / 'test_few_shot.txt'}:3: dropped" in result.stderr
    manifest = read_manifest(out, check_files=True)
    assert [r.video_id for r in manifest.rows] == ["w1", "w2", "c1", "j1"]
    assert out.read_text().splitlines()[1] == "w1,videos_root/videos/wave/w1.avi,wave,train"
    # Without checking, every listed video is written.
    assert tats(*args, "--dataset", "hmdb").exit_code == 0
    assert len(read_manifest(out)) == 5


def test_trx_lists_with_class_folders_and_ssv2_tokens(tmp_path):
    trx = tmp_path / "trx"
    trx.mkdir()
    (trx / "trainlist03.txt").write_text("baking cookies/-514AQUrSow_000058_000068\nx/y\n")
    (trx / "vallist03.txt").write_text("crossing river/-6HHK4EV5yU_000035_000045\n")
    (trx / "testlist03.txt").write_text("dunking basketball/-zjCHnN9SdQ_000010_000020\n")
    out = tmp_path / "k.csv"
    result = tats(
        "manifest", "import", "--format", "trx", trx, "--video-root", "/k", "--out", out,
        "--dataset", "kinetics",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    rows = read_manifest(out).rows
    assert rows[0].path == Path("/k/baking cookies/-514AQUrSow_000058_000068.mp4")
    assert (rows[0].label, rows[0].split, rows[1].label) == ("baking cookies", "train", "x")
    assert [r.split for r in rows] == ["train", "train", "val", "test"]

    (trx / "trainlist07.txt").write_text("train3/1234\n")
    (trx / "testlist07.txt").write_text("test3/5678\ntest4/91\n")
    args = ["manifest", "import", "--format", "trx", trx, "--video-root", "/s", "--out", out]
    ambiguous = tats(*args, "--dataset", "ssv2")
    assert ambiguous.exit_code == 2 and "give --split-number (trainlistXX.txt numbers: 03, 07)" in (
        ambiguous.stderr
    )
    assert tats(*args, "--dataset", "ssv2", "--split-number", "07").exit_code == 0
    rows = read_manifest(out).rows
    assert [(r.video_id, str(r.path), r.label, r.split) for r in rows] == [
        ("1234", "/s/1234.webm", "train3", "train"),
        ("5678", "/s/5678.webm", "test3", "test"),
        ("91", "/s/91.webm", "test4", "test"),
    ]


def test_tats_json_lists(tmp_path):
    src = tmp_path / "json"
    src.mkdir()
    (src / "train_few_shot.json").write_text(json.dumps([
        {"id": "100", "label": 0}, {"id": "101", "label": "0"}, {"id": "102", "label": 5},
    ]))  # fmt: skip
    (src / "test_few_shot.json").write_text(json.dumps([{"id": "200", "label": 0}]))
    out = tmp_path / "j.csv"
    result = tats(
        "manifest", "import", "--format", "tats-json", src, "--video-root", "/v", "--out", out,
        "--dataset", "ssv2",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    manifest = read_manifest(out)
    assert [(r.video_id, str(r.path), r.label) for r in manifest.rows] == [
        ("100", "/v/100.webm", "train0"),
        ("101", "/v/101.webm", "train0"),
        ("102", "/v/102.webm", "train5"),
        ("200", "/v/200.webm", "test0"),  # per-split label 0 is another class than train's 0
    ]
    assert manifest.classes("val") == []


@pytest.mark.parametrize(
    ("lists", "message"),
    [
        (
            {"train": ["train0/1", "train0/2"], "test": ["test0/2"]},
            "test_few_shot.txt:1: duplicate video_id '2' (first at ",
        ),
        (
            {"train": ["train0//v/wave/a.avi"], "test": ["test0//v/wave/b.avi"]},
            "test_few_shot.txt:1: class 'wave' is in split 'test' but also in 'train'",
        ),
        ({"train": ["train0/1"]}, "test_few_shot.txt: no such file (molo test list)"),
        ({"train": ["train0/1"], "test": ["5"]}, "test_few_shot.txt:1: empty label"),
    ],
)
def test_bad_split_lists_exit_2_naming_file_and_line(tmp_path, lists, message):
    src = make_molo(tmp_path / "lists", lists)
    dataset = "hmdb" if "//" in lists["train"][0] else "ssv2"
    result = tats(
        "manifest", "import", "--format", "molo", src, "--video-root", "/x",
        "--out", tmp_path / "m.csv", "--dataset", dataset,
    )  # fmt: skip
    assert result.exit_code == 2
    assert result.stderr.count("\n") == 1 and message in result.stderr, result.stderr
    assert result.stderr.startswith(f"error: {src}")


def test_import_options_are_checked(tmp_path):
    src = make_molo(tmp_path / "lists", {"train": ["a/b"], "test": ["c/d"]})
    base = ["manifest", "import", src, "--out", tmp_path / "m.csv"]
    assert "--format must be one of" in tats(*base, "--format", "csv").stderr
    assert "--dataset must be one of" in tats(*base, "--format", "molo", "--dataset", "x").stderr
    wrong = tats(*base, "--format", "molo", "--split-number", "01")
    assert wrong.exit_code == 2 and "--split-number applies to --format trx only" in wrong.stderr
    no_ext = tats(*base, "--format", "molo")
    assert no_ext.exit_code == 2 and "has no video file extension; give --ext" in no_ext.stderr
