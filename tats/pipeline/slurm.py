"""Slurm job arrays: one sbatch script runs a stage command in every array task.

Each task runs the same command line; the command picks its share of the work from
SLURM_ARRAY_TASK_ID and SLURM_ARRAY_TASK_COUNT (see plan.py). Submitting the script again
resumes: finished units are skipped, failed videos retried.
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


def sbatch_script(command: list[str], options: SlurmOptions) -> str:
    """The text of an sbatch script that runs `command` in every task of the array."""
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
        "# Every task runs the same command; it takes share SLURM_ARRAY_TASK_ID of",
        "# SLURM_ARRAY_TASK_COUNT. Submit this script again to resume.",
        "set -euo pipefail",
        "exec " + shlex.join(command),
        "",
    ]
    return "\n".join(lines)


def stage_command(stage: str, args: list[str]) -> list[str]:
    """`tats-extract STAGE ARGS` with this installation's executable, without a progress bar."""
    executable = Path(sys.executable).parent / "tats-extract"
    command = [str(executable if executable.exists() else "tats-extract"), stage, *args]
    if not {"--progress", "--no-progress"} & set(args):
        command.append("--no-progress")
    return command


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
