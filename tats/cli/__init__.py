"""The `tats` command: every stage as a sub-command (`tats extract`, `tats train`, ...)."""

import typer

from tats.cli import extract, manifest, predict, report, run, synth, train, viz, weights
from tats.cli.common import Command, renamed
from tats.cli.options import RENAMED

app = typer.Typer(
    help="Few-shot action recognition with trajectory-aligned tokens: manifests, synthetic data, "
    "extraction of tracks and features into Zarr stores, training and evaluation, prediction.",
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode=None,
)
app.add_typer(manifest.app, name="manifest")
app.add_typer(extract.app, name="extract")
app.command("train", help=train.HELP, cls=renamed(**RENAMED["train"]))(train.main)
app.command("synth", cls=Command)(synth.synth)
app.command("run", cls=renamed(**RENAMED["run"]))(run.run)
app.command("recipes", cls=Command)(run.recipes)
app.command("predict", help=predict.HELP, cls=renamed(**RENAMED["predict"]))(predict.predict)
app.add_typer(viz.app, name="viz")
app.command("report", cls=Command)(report.report)
app.add_typer(weights.app, name="weights")
