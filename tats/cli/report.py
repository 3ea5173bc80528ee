"""`tats report`: report.md of a run folder."""

from __future__ import annotations

from pathlib import Path

import typer

from tats.cli.common import input_errors


def report(
    run_dir: Path = typer.Argument(..., help="A `tats run` folder."),
    started: float | None = typer.Option(
        None,
        help="Unix time the whole run started (e.g. $(date +%s)): the report then states "
        "the wall time up to now as well.",
    ),
    video_id: str | None = typer.Option(
        None, "--video-id", help="The test clip whose tracks are drawn.",
        show_default="the first",
    ),
) -> None:
    """Write RUN_DIR/report.md: test accuracy of every model trained in the folder (mean +-
    95% CI, chance level), the stored tracks of a test clip, the curves and confusion matrices,
    and the time each stage took (timings.json); links are relative."""
    from tats.report import write_report

    with input_errors():
        path = write_report(run_dir, started, video_id)
    typer.echo(f"wrote {path}")
