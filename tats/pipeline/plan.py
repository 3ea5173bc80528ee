"""Work units (whole store shards) and which of them this process takes.

`--shard-index i --num-shards n` gives process i an even, contiguous share of the units. Under
a Slurm job array they default to the array task's position and the array's size, under
torchrun to the rank and world size, so the same command line serves every array task.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import numpy as np


def default_share(env: Mapping[str, str] = os.environ) -> tuple[int, int]:
    """(index, count) from Slurm job-array or torchrun variables, else (0, 1)."""
    if "SLURM_ARRAY_TASK_ID" in env and "SLURM_ARRAY_TASK_COUNT" in env:
        first = int(env.get("SLURM_ARRAY_TASK_MIN", 0))
        return int(env["SLURM_ARRAY_TASK_ID"]) - first, int(env["SLURM_ARRAY_TASK_COUNT"])
    if "RANK" in env and "WORLD_SIZE" in env:
        return int(env["RANK"]), int(env["WORLD_SIZE"])
    return 0, 1


def resolve_share(index: int | None, count: int | None) -> tuple[int, int]:
    """The explicit share where given, else the environment's; checked."""
    env_index, env_count = default_share()
    index = env_index if index is None else index
    count = env_count if count is None else count
    if count < 1 or not 0 <= index < count:
        raise ValueError(f"--shard-index {index} is not in 0..{count - 1} (--num-shards {count})")
    return index, count


def my_units(num_units: int, index: int, count: int) -> list[int]:
    """The contiguous share of `num_units` units that process `index` of `count` takes."""
    return [int(u) for u in np.array_split(np.arange(num_units), count)[index]]
