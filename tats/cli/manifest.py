"""`tats manifest`: check a dataset manifest, import published few-shot split lists, make
one of a folder of class folders."""

from dataclasses import dataclass
from pathlib import Path

import typer

from tats.cli import options as opt
from tats.cli.common import Command, fail, input_errors
from tats.importers import DATASETS, FORMATS, import_splits, missing_files
from tats.manifest import SPLITS, Manifest, read_manifest, write_manifest

app = typer.Typer(
    help="Dataset manifests (CSV: video_id,path,label,split): check one, import split lists, "
    "or make one of a folder of class folders.",
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode=None,
)


def _print_summary(manifest: Manifest) -> None:
    typer.echo(
        f"{manifest.path}: {len(manifest)} videos, {len(manifest.classes())} classes, "
        f"sha256 {manifest.sha256[:16]}"
    )
    for split in SPLITS:
        classes, videos = len(manifest.classes(split)), len(manifest.split_rows(split))
        typer.echo(f"  {split:<5}  {classes:>4} classes  {videos:>6} videos")


WAY = typer.Option(5, help="Classes per episode, that train and test must offer.")
SHOT = typer.Option(1, help="Support clips per class.")
TRAIN_QUERIES = typer.Option(6, help="Query clips per class in training episodes.")
TEST_QUERIES = typer.Option(1, help="Query clips per class in val and test episodes.")


@dataclass(frozen=True)
class Episodes:
    """The episodes a manifest is checked against (as tats-train draws them)."""

    way: int
    shot: int
    train_queries: int
    test_queries: int
    val_episodes: int = 1
    test_episodes: int = 1


def _check_episodes(manifest: Manifest, episodes: Episodes) -> None:
    """Exit 2 when train or test cannot make the episodes; print what val and the classes
    with too few videos will do."""
    from tats.preflight import episode_problems

    for line in episode_problems(manifest, episodes):
        typer.echo(f"warning: {line}", err=True)
    typer.echo(
        f"  episodes: {episodes.way}-way {episodes.shot}-shot, {episodes.train_queries} "
        f"training and {episodes.test_queries} test queries per class: ok"
    )


@app.command(cls=Command)
def check(
    manifest: Path = typer.Argument(..., help="Manifest CSV."),
    video_root: Path | None = opt.VIDEO_ROOT,
    check_files: bool = typer.Option(False, help="Require every video file to exist."),
    way: int = WAY,
    shot: int = SHOT,
    train_queries: int = TRAIN_QUERIES,
    test_queries: int = TEST_QUERIES,
) -> None:
    """Validate a manifest, print its classes and videos per split, and check that train and
    test have the classes (with enough videos each) that the episodes need (exit 2 if not)."""
    with input_errors():
        rows = read_manifest(manifest, video_root, check_files)
        _print_summary(rows)
        _check_episodes(rows, Episodes(way, shot, train_queries, test_queries))


@app.command("from-folders", cls=Command)
def from_folders(
    folder: Path = typer.Argument(..., help="A folder of class folders: FOLDER/<class>/<clip>."),
    out: Path | None = typer.Option(
        None, "--out", "-o", help="Manifest CSV to write.", show_default="FOLDER/manifest.csv"
    ),
    val: float | None = typer.Option(
        None, help="Val classes: a fraction of the classes (below 1) or a count.",
        show_default="20% of the classes, at least --way",
    ),
    test: float | None = typer.Option(
        None, help="Test classes: a fraction of the classes (below 1) or a count.",
        show_default="20% of the classes, at least --way",
    ),
    seed: int = typer.Option(0, help="Seed of the shuffle that splits the classes."),
    way: int = WAY,
    shot: int = SHOT,
    train_queries: int = TRAIN_QUERIES,
    test_queries: int = TEST_QUERIES,
) -> None:
    """Make a manifest of a folder of class folders (videos in one folder per class, any
    depth below it): the classes are shuffled with --seed and split whole into train, val
    and test (few-shot tests on classes never trained on). The manifest is checked as
    `check` does and written only when it passes (exit 2 otherwise)."""
    from tats.importers import rows_from_folders
    from tats.preflight import episode_problems

    out = out if out is not None else folder / "manifest.csv"
    episodes = Episodes(way, shot, train_queries, test_queries)
    with input_errors():
        rows = rows_from_folders(folder, val, test, seed, at_least=way)
        tmp = out.with_name(f".{out.name}.checking.csv")  # beside it: the same relative paths
        try:
            write_manifest(rows, tmp)
            checked = read_manifest(tmp)
            try:  # before anything is written
                episode_problems(checked, episodes)
            except ValueError as error:
                short = [s for s in ("test", "train") if len(checked.classes(s)) < way]
                hint = {
                    "test": f"give --test more classes (e.g. --test {way}), or add classes",
                    "train": "give --val / --test fewer classes, or add classes",
                }.get(short[0] if short else "", "add videos to the classes, or lower --shot, "
                      "--train-queries or --test-queries")  # fmt: skip
                raise ValueError(f"{str(error).replace(str(tmp), str(out))}: {hint}") from None
            tmp.replace(out)
        finally:
            tmp.unlink(missing_ok=True)
        written = read_manifest(out)
        _print_summary(written)
        _check_episodes(written, episodes)


@app.command("import", cls=Command)
def import_(
    source: Path = typer.Argument(..., help="Folder holding the split lists."),
    fmt: str = typer.Option(
        ..., "--format", help=f"Split list format: {', '.join(FORMATS)}.", show_default=False
    ),
    out: Path = typer.Option(..., "--out", "-o", help="Manifest CSV to write."),
    video_root: Path | None = typer.Option(
        None, help="Folder holding the videos.", show_default="the folder of --out"
    ),
    dataset: str = typer.Option(
        "other", help=f"Whose file layout the lists follow: {', '.join(DATASETS)}."
    ),
    split_number: str | None = typer.Option(
        None, help="trx only: XX in trainlistXX.txt (needed when there are several)."
    ),
    ext: str | None = typer.Option(
        None, help="File extension for list entries without one.",
        show_default="the dataset's: .webm (ssv2), .mp4 (kinetics), .avi (hmdb, ucf)",
    ),
    check_files: bool = typer.Option(
        False, help="Fail, naming the list line, when a video file is absent."
    ),
    drop_missing: bool = typer.Option(
        False, help="Leave out (and list) entries whose video file is absent."
    ),
) -> None:
    """Turn few-shot split lists (MoLo, TRX, TATs JSON) into a manifest CSV."""
    if fmt not in FORMATS:
        raise fail(f"--format must be one of {', '.join(FORMATS)}, not {fmt!r}")
    if dataset not in DATASETS:
        raise fail(f"--dataset must be one of {', '.join(DATASETS)}, not {dataset!r}")
    if split_number is not None and fmt != "trx":
        raise fail("--split-number applies to --format trx only")
    root = video_root if video_root is not None else out.parent
    with input_errors():
        entries = import_splits(fmt, source, root, dataset, split_number, ext)
        if check_files or drop_missing:
            absent = missing_files(entries)
            if absent and not drop_missing:
                more = f" (and {len(absent) - 1} more)" if len(absent) > 1 else ""
                raise fail(f"{absent[0].where}: video file not found: {absent[0].row.path}{more}")
            for entry in absent:
                typer.echo(f"{entry.where}: dropped, no file {entry.row.path}", err=True)
            dropped = {entry.where for entry in absent}
            entries = [entry for entry in entries if entry.where not in dropped]
        write_manifest([entry.row for entry in entries], out)
        _print_summary(read_manifest(out))
