"""Slurm job arrays: one sbatch script runs a stage command in every array task.

Each task runs the same command line, which fixes the array size it was written for
(`--num-shards`); a task starts with share SLURM_ARRAY_TASK_ID of it (see plan.py), so a task
resubmitted alone (`sbatch --array=3 script`) keeps its share, and leases keep it from
redoing what the running tasks hold. Submitting the whole script again resumes: finished
units are skipped, failed videos retried. The script names every file by its absolute path
and changes to the folder it was written from, so it runs the same from wherever it is
submitted.
"""

from __future__ import annotations

import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class SlurmOptions:
    tasks: int
    job_name: str = "tats"
    partition: str | None = None
    time: str | None = None
    cpus_per_task: int | None = None
    gpus_per_task: int | None = None
    mem: str | None = None
    logs: Path = Path("slurm-logs")
    max_parallel: int | None = None

    def __post_init__(self) -> None:
        if self.tasks < 1:
            raise ValueError(f"--tasks must be at least 1, not {self.tasks}")


def sbatch_script(command: list[str], options: SlurmOptions, workdir: Path | None = None) -> str:
    """The text of an sbatch script that runs `command` in every task of the array, in
    `workdir` (absolute; default: the current folder)."""
    workdir = Path(workdir or Path.cwd()).absolute()
    array = f"0-{options.tasks - 1}"
    if options.max_parallel:
        array += f"%{options.max_parallel}"
    lines = [
        "#!/bin/bash",
        f"#SBATCH --job-name={options.job_name}",
        f"#SBATCH --array={array}",
        f"#SBATCH --output={Path(options.logs).resolve()}/%x-%A_%a.out",
    ]
    for flag, value in (
        ("partition", options.partition),
        ("time", options.time),
        ("cpus-per-task", options.cpus_per_task),
        ("gpus-per-task", options.gpus_per_task),
        ("mem", options.mem),
    ):
        if value is not None:
            lines.append(f"#SBATCH --{flag}={value}")
    lines += [
        f"# Every task runs the same command; it starts with share SLURM_ARRAY_TASK_ID of "
        f"{options.tasks},",
        "# then helps with the units nobody holds. Resubmit one task with --array=K, or the",
        "# whole script to resume.",
        "set -euo pipefail",
        f"cd {shlex.quote(str(workdir))}",
        "exec " + shlex.join(command),
        "",
    ]
    return "\n".join(lines)


SHARE_OPTIONS = ("--shard-index", "--num-shards")


def absolute_paths(args: list[str], path_options: set[str]) -> list[str]:
    """`args` with the values of `path_options` (`--out X` or `--out=X`) made absolute."""

    def absolute(value: str) -> str:
        return str(Path(value).expanduser().absolute())

    out, i = [], 0
    while i < len(args):
        name, eq, value = args[i].partition("=")
        if name in path_options and eq:
            out.append(f"{name}={absolute(value)}")
        elif name in path_options and i + 1 < len(args):
            out += [name, absolute(args[i + 1])]
            i += 1
        else:
            out.append(args[i])
        i += 1
    return out


def stage_command(
    stage: str, args: list[str], tasks: int, path_options: set[str] = frozenset()
) -> list[str]:
    """`tats-extract STAGE ARGS --num-shards TASKS` with this installation's executable (by
    its absolute path), the values of `path_options` absolute, without a progress bar."""
    args = absolute_paths(args, path_options)
    given = [a for a in args if a.split("=", 1)[0] in SHARE_OPTIONS]
    if given:
        raise ValueError(
            f"{given[0]}: the array task picks its share; leave out --shard-index and --num-shards"
        )
    executable = Path(sys.executable).parent / "tats-extract"
    if not executable.exists():
        executable = Path(shutil.which("tats-extract") or "tats-extract")
    command = [str(executable.absolute()) if executable.exists() else "tats-extract", stage, *args]
    if not {"--progress", "--no-progress"} & set(args):
        command.append("--no-progress")
    return [*command, "--num-shards", str(tasks)]


def submit(script: Path) -> str:
    """Submit `script` with sbatch; returns the job id."""
    if shutil.which("sbatch") is None:
        raise FileNotFoundError("sbatch is not on PATH: submit the script on a Slurm login node")
    result = subprocess.run(
        ["sbatch", "--parsable", str(script)], capture_output=True, text=True, check=False
    )
    if result.returncode != 0:
        raise ValueError(f"sbatch {script} failed: {result.stderr.strip()}")
    return result.stdout.strip().split(";")[0]
