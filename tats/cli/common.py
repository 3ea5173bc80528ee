"""What every command shares: exit codes, one-line errors, a graceful SIGTERM, and how its
`--help` reads (`Command`: plain value names, defaults one way, renamed options)."""

from __future__ import annotations

import re
import traceback
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import click
import typer
from typer.core import TyperCommand, TyperGroup

from tats.termination import Terminated, sigterm_raises

# Commands print library warnings as one plain line, not as source locations.
warnings.formatwarning = lambda message, category, *args, **kwargs: f"warning: {message}\n"

# Exit codes of the extraction and training commands: 0 all done; 1 some videos failed (they
# are listed; a rerun retries them); 2 bad input (nothing was computed from it); 3 the
# infrastructure failed (a full disk, a permission, lost cluster workers): finished work is
# kept and a rerun resumes; 4 an error in tats itself (its traceback is printed).
OK, SOME_FAILED, BAD_INPUT, INFRASTRUCTURE, INTERNAL = 0, 1, 2, 3, 4


def fail(message: str, code: int = BAD_INPUT) -> typer.Exit:
    """Print `message` as one line on stderr; return the exit to raise (code 2)."""
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(code)


def is_click_exception(error: BaseException) -> bool:
    """A command's own exit or usage error: click's, or the click that typer ships within
    itself (typer >= 0.20), whose classes are others of the same names."""
    names = {cls.__name__ for cls in type(error).__mro__}
    return bool(names & {"ClickException", "Exit", "Abort"})


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__


@contextmanager
def input_errors() -> Iterator[None]:
    """Turn the library's errors into one line on stderr: bad input (a video a command was
    given that cannot be read included) exits 2, the failures of
    the machine (OSError but a missing input file, lost Dask workers) exit 3. Anything else is
    a bug: its traceback, then one line, exit 4 (not 1, which says that videos failed)."""
    from tats.manifest import ManifestError
    from tats.pipeline.executors import InfrastructureError
    from tats.stores import StoreError
    from tats.video import VideoError

    try:
        yield
    except (ManifestError, StoreError, VideoError, ValueError, FileNotFoundError) as error:
        raise fail(_one_line(error)) from None
    except InfrastructureError as error:
        raise fail(_one_line(error), INFRASTRUCTURE) from None
    except OSError as error:
        where = f"{error.filename}: " if error.filename else ""
        problem = error.strerror or _one_line(error)
        message = f"{where}{problem}; finished work is kept, rerun to resume"
        raise fail(message, INFRASTRUCTURE) from None
    except Exception as error:
        if is_click_exception(error):
            raise  # a command's own exit
        traceback.print_exc()
        message = f"internal error ({type(error).__name__}): please report it with its traceback"
        raise fail(message, INTERNAL) from None


@contextmanager
def graceful_termination() -> Iterator[None]:
    """SIGTERM (Slurm's scancel, a preemption) ends the command as Ctrl-C does: the shard
    being written is finished, leases are released, decoders stopped; exit 143 (130 for
    Ctrl-C)."""

    try:
        with sigterm_raises():
            yield
    except KeyboardInterrupt as interrupt:
        what = "terminated" if isinstance(interrupt, Terminated) else "interrupted"
        typer.echo(f"error: {what}; finished units are kept, rerun to resume", err=True)
        raise typer.Exit(143 if isinstance(interrupt, Terminated) else 130) from None


# ---------------------------------------------------------------------------------------------
# --help, the same way in every command

# Value names by the parameter's type (what typer would show as <int>, <str>, <path>, ...).
VALUE_NAMES = {int: "INTEGER", float: "NUMBER", str: "TEXT", Path: "PATH"}
CLICK_VALUE_NAMES = {"integer": "INTEGER", "float": "NUMBER", "text": "TEXT", "path": "PATH"}
_DEFAULT_IN_PARENTHESES = re.compile(r"\[default: \((.*?)\)(?=[;\]])")


def value_name(param: click.Parameter) -> str | None:
    """The plain name of a parameter's value (INTEGER, NUMBER, TEXT, PATH); None where its
    type has none (a tuple: give it a metavar)."""
    descriptor = getattr(param, "type_descriptor", None)  # typer >= 0.20 keeps the annotation
    if descriptor is not None:
        annotation = descriptor.annotation
        origin = getattr(annotation, "__origin__", None)
        if origin is list:
            annotation = annotation.__args__[0]
        return VALUE_NAMES.get(annotation)
    return CLICK_VALUE_NAMES.get(getattr(getattr(param, "type", None), "name", None))


class PlainHelp:
    """How a tats command or group lists its parameters in --help (see `Command`)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        for param in self.params:
            if param.metavar is not None or getattr(param, "is_flag", False):
                continue
            if param.param_type_name == "argument":
                param.metavar = param.name.upper()
            else:
                param.metavar = value_name(param)

    def help_records(self, ctx: click.Context) -> dict[str, list[tuple[click.Parameter, str, str]]]:
        """What --help lists, by section: (parameter, name column, help text)."""
        sections: dict[str, list] = {"Arguments": [], "Options": []}
        for param in self.get_params(ctx):
            record = param.get_help_record(ctx)
            if record is None:
                continue
            name, text = record
            text = _DEFAULT_IN_PARENTHESES.sub(r"[default: \1", text)
            if param.param_type_name == "argument":
                name = param.metavar + ("..." if param.nargs != 1 else "")
                sections["Arguments"].append((param, name, text))
            else:
                sections["Options"].append((param, name, text))
        return sections

    def format_parameters(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        for title, records in self.help_records(ctx).items():
            if records:
                with formatter.section(title):
                    formatter.write_dl([(name, text) for _, name, text in records])


class Command(PlainHelp, TyperCommand):
    """A typer command whose --help names values plainly (`--grid INTEGER`, `STORE`, never a
    Python type), shows every default as `[default: X]`, and which accepts the old names of
    renamed options (`renamed`: old -> new, hidden from --help) with a one-line warning."""

    renamed: dict[str, str] = {}

    def collect_usage_pieces(self, ctx: click.Context) -> list[str]:
        pieces = [self.options_metavar] if self.options_metavar else []
        for param in self.get_params(ctx):
            if param.param_type_name != "argument":
                continue
            piece = param.metavar + ("..." if param.nargs != 1 else "")
            pieces.append(piece if param.required else f"[{piece}]")
        return pieces

    def format_options(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        self.format_parameters(ctx, formatter)

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        return super().parse_args(ctx, rename_options(args, self.renamed))


class Group(PlainHelp, TyperGroup):
    """A group of commands whose own options --help lists as `Command` does."""

    def format_options(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        self.format_parameters(ctx, formatter)
        self.format_commands(ctx, formatter)


def rename_options(args: list[str], renamed: dict[str, str]) -> list[str]:
    """`args` with the old names of renamed options replaced by the new ones (`--old X` and
    `--old=X`), each announced once on stderr; nothing after `--` is touched."""
    if not renamed:
        return list(args)
    out, warned = [], set()
    for i, arg in enumerate(args):
        if arg == "--":
            return out + list(args[i:])
        name, eq, value = arg.partition("=")
        if name in renamed:
            if name not in warned:
                typer.echo(
                    f"warning: {name} is now {renamed[name]}; the old name goes in the next "
                    "release",
                    err=True,
                )
                warned.add(name)
            arg = renamed[name] + eq + value
        out.append(arg)
    return out


def renamed(**old_names: str) -> type[Command]:
    """A Command class that accepts the old names of renamed options: `renamed(checkpoint=
    "--tracker-weights")` takes `--checkpoint` as `--tracker-weights`."""
    mapping = {f"--{old.replace('_', '-')}": new for old, new in old_names.items()}
    return type("Command", (Command,), {"renamed": mapping})
