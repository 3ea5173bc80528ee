"""`tats manifest`: check a dataset manifest, import published few-shot split lists."""

from pathlib import Path

import typer

from tats.cli.common import fail, input_errors
from tats.importers import DATASETS, FORMATS, import_splits, missing_files
from tats.manifest import SPLITS, Manifest, read_manifest, write_manifest

app = typer.Typer(
    help="Dataset manifests (CSV: video_id,path,label,split): check one, or import split lists.",
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


@app.command()
def check(
    manifest: Path = typer.Argument(..., help="Manifest CSV."),
    video_root: Path | None = typer.Option(
        None, help="Folder that relative video paths start from (default: the manifest's)."
    ),
    check_files: bool = typer.Option(False, help="Require every video file to exist."),
) -> None:
    """Validate a manifest and print its classes and videos per split (exit 2 if bad)."""
    with input_errors():
        _print_summary(read_manifest(manifest, video_root, check_files))


@app.command("import")
def import_(
    source: Path = typer.Argument(..., help="Folder holding the split lists."),
    fmt: str = typer.Option(
        ..., "--format", help=f"Split list format: {', '.join(FORMATS)}.", show_default=False
    ),
    out: Path = typer.Option(..., help="Manifest CSV to write."),
    video_root: Path | None = typer.Option(
        None, help="Folder holding the videos (default: the folder of --out)."
    ),
    dataset: str = typer.Option(
        "other", help=f"Whose file layout the lists follow: {', '.join(DATASETS)}."
    ),
    split_number: str | None = typer.Option(
        None, help="trx only: XX in trainlistXX.txt (needed when there are several)."
    ),
    ext: str | None = typer.Option(
        None, help="File extension for list entries without one (default: the dataset's)."
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
