"""`tats weights`: the weight files a run needs, where tats looks for them, their official
URLs and SHA-256s; `tats weights download`: fetch them (tats/pipeline/catalog.py)."""

from __future__ import annotations

from pathlib import Path

import typer

from tats.cli import options as opt
from tats.cli.common import INFRASTRUCTURE, Command, Group, fail, input_errors

app = typer.Typer(
    cls=Group,
    help="The pretrained weight files a run needs (the recipe's, or those of --tracker and "
    "--backbone): where tats looks for each, its official URL and SHA-256, and whether it is "
    "there. `tats weights download` fetches them.",
    invoke_without_command=True,
    add_completion=False,
    rich_markup_mode=None,
)

RECIPE = typer.Option(
    None, help="A recipe (`tats recipes`): the files its run needs.",
    show_default="the files of --tracker and --backbone",
)  # fmt: skip
PAPER_TRACKER = typer.Option(
    False, "--paper-tracker", help="The recipe's paper tracker (tats run --paper-tracker)."
)
TRACKER = typer.Option(None, help="Point tracker, as for tats run.", show_default="cotracker3")
BACKBONE = typer.Option(
    None, help="Feature backbone, as for tats run.", show_default="dinov2_vitb14"
)
METHOD = typer.Option(None, help="tats or trokens, as for tats run.", show_default="tats")


def _needs(recipe, paper_tracker, tracker, backbone, method, tracker_weights=None,
           backbone_weights=None):  # fmt: skip
    from tats.chain import resolve_run
    from tats.pipeline.catalog import needed_weights

    tracks = {"tracker": tracker} if tracker is not None else {}
    features = {"backbone": backbone} if backbone is not None else {}
    config = resolve_run(
        "manifest.csv", "run", recipe=recipe, method=method, tracks=tracks, features=features,
        paper_tracker=paper_tracker,
    )  # fmt: skip
    return needed_weights(config.tracks, dict(config.tracker_options), config.features,
                          tracker_weights, backbone_weights)  # fmt: skip


@app.callback()
def weights(
    ctx: typer.Context,
    recipe: str | None = RECIPE,
    paper_tracker: bool = PAPER_TRACKER,
    tracker: str | None = TRACKER,
    backbone: str | None = BACKBONE,
    method: str | None = METHOD,
    tracker_weights: Path | None = opt.TRACKER_WEIGHTS,
    backbone_weights: Path | None = opt.BACKBONE_WEIGHTS,
) -> None:
    """List the weight files a run needs: what each is for, whether it is there (and where),
    its official URL and SHA-256 ("not published": download checks it against nothing)."""
    if ctx.invoked_subcommand is not None:
        return
    from tats.pipeline.backbones import DINOV2_MODELS, dinov2_weight_locations
    from tats.pipeline.catalog import CATALOG

    with input_errors():
        needs = _needs(recipe, paper_tracker, tracker, backbone, method, tracker_weights,
                       backbone_weights)  # fmt: skip
    if not needs:
        typer.echo("this run needs no weight files")
    stems = {f"{stem}_pretrain.pth": name for name, (_, stem) in DINOV2_MODELS.items()}
    for need in needs:
        path = need.path()
        found = path if path.is_file() else None
        if found is None and need.given is None and need.file.name in stems:
            caches = dinov2_weight_locations(stems[need.file.name])  # timm's copy counts too
            found = next((p for _, p in caches if p is not None), None)
        state = f"present: {found}" if found is not None else f"MISSING: put it at {path}"
        optional = " (optional)" if need.optional else ""
        typer.echo(f"{need.file.name}  {need.file.model}; {need.role}{optional}")
        typer.echo(f"  {state}")
        typer.echo(f"  url     {need.file.url}")
        sha = need.file.sha256 or "not published (download prints it, for pinning)"
        typer.echo(f"  sha256  {sha}")
    if any(n.path().is_file() is False for n in needs):
        typer.echo("fetch the missing ones: tats weights download (with the same options)")
    typer.echo(f"known files: {', '.join(CATALOG)}")


@app.command(cls=Command)
def download(
    ctx: typer.Context,
    names: list[str] = typer.Argument(
        None, help="Files to fetch (`tats weights` lists them).",
        show_default="the missing files the run needs",
    ),
    to: Path | None = typer.Option(
        None, help="Folder to write them to.", show_default="the torch hub cache"
    ),
    mirror: str | None = typer.Option(
        None, help="Fetch FILE from MIRROR/FILE instead of its official URL (a copy inside your "
        "network); the checksum is the same.",
    ),
    sha256: list[str] = typer.Option(
        [], "--sha256", help="NAME=HEX, repeatable: the SHA-256 NAME must have (pins a file "
        "with none published, or overrides one).", show_default=False,
    ),
    force: bool = typer.Option(False, "--force", help="Fetch again files already there."),
    progress: bool = opt.PROGRESS,
) -> None:
    """Fetch weight files with a progress bar, check each against its SHA-256 and write it
    atomically: a wrong checksum (exit 2) or a broken transfer (exit 3) leaves nothing
    behind. A file whose SHA-256 is not published is kept, with a warning that says how to
    pin it. Selection options (--recipe, --tracker, ...) go before `download`."""
    from tats.pipeline.catalog import CATALOG, DownloadError, fetch, file_sha256, hub_dir

    parent = ctx.parent.params
    pins = {}
    for item in sha256:
        name, sep, digest = item.partition("=")
        if not sep or len(digest) != 64 or any(c not in "0123456789abcdefABCDEF" for c in digest):
            raise fail(f"--sha256 {item!r}: expected NAME=HEX (64 hex digits)")
        pins[name] = digest.lower()
    with input_errors():
        if names:
            unknown = [n for n in names if n not in CATALOG]
            if unknown:
                raise ValueError(f"unknown weight file {unknown[0]!r}; known: {', '.join(CATALOG)}")
            files = [CATALOG[n] for n in names]
        else:
            needs = _needs(parent["recipe"], parent["paper_tracker"], parent["tracker"],
                           parent["backbone"], parent["method"])  # fmt: skip
            files = [n.file for n in needs if not n.optional]
        folder = to if to is not None else hub_dir()
    for file in files:
        dest = folder / file.name
        expected = pins.get(file.name, file.sha256)
        if dest.is_file() and not force:
            if expected is None or file_sha256(dest) == expected:
                typer.echo(f"{dest}: already there")
                continue
            raise fail(f"{dest}: already there but its SHA-256 is not {expected}; --force "
                       "fetches it again")  # fmt: skip
        url = f"{mirror.rstrip('/')}/{file.name}" if mirror else file.url
        try:
            found = fetch(url, dest, expected, progress)
        except DownloadError as error:
            raise fail(str(error), INFRASTRUCTURE) from None
        except ValueError as error:
            raise fail(str(error)) from None
        if expected is None:
            typer.echo(
                f"warning: {file.name}: no official SHA-256 is published, so it could not be "
                f"verified; its SHA-256 is {found}: compare it with a copy you trust, and pin "
                f"it elsewhere with --sha256 {file.name}={found}",
                err=True,
            )
        typer.echo(f"{dest}: {file.model}, sha256 {found}")
