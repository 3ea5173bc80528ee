"""Work units (whole store shards) and the order in which a process takes them.

`--shard-index i --num-shards n` gives process i an even, contiguous share of the units to
start with. Shares are a starting order, not a guarantee: after its own share a process helps
with the others' (from their ends), and unit leases (leases.py) make sure that each unit is
computed by one process at a time. So any mix of processes, with any shares, finishes a store.

Under a Slurm job array the index defaults to the array task id, under torchrun to the rank.
The count defaults to the array size fixed in the script (`tats-extract sbatch` writes
`--num-shards`), else to the highest task id + 1, else to the world size. The index is taken
modulo the count, so a task resubmitted alone (`--array=3`), a list (`--array=3,6`) or a
step array (`--array=0-30:2`) each keep their place.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import numpy as np


def default_share(env: Mapping[str, str] = os.environ) -> tuple[int, int | None]:
    """(index, count) from Slurm job-array or torchrun variables, else (0, 1); count None
    when only the index is known (a Slurm task whose array size the caller fixes)."""
    if "SLURM_ARRAY_TASK_ID" in env:
        task = int(env["SLURM_ARRAY_TASK_ID"])
        top = env.get("SLURM_ARRAY_TASK_MAX")
        return task, int(top) + 1 if top is not None else None
    if "RANK" in env and "WORLD_SIZE" in env:
        return int(env["RANK"]), int(env["WORLD_SIZE"])
    return 0, 1


def resolve_share(
    index: int | None, count: int | None, env: Mapping[str, str] = os.environ
) -> tuple[int, int]:
    """The explicit share where given, else the environment's; checked. An index taken from
    the environment wraps around the count."""
    env_index, env_count = default_share(env)
    count = count if count is not None else env_count if env_count is not None else 1
    if count < 1:
        raise ValueError(f"--num-shards must be at least 1, not {count}")
    if index is None:
        return env_index % count, count
    if not 0 <= index < count:
        raise ValueError(f"--shard-index {index} is not in 0..{count - 1} (--num-shards {count})")
    return index, count


def my_units(num_units: int, index: int, count: int) -> list[int]:
    """The contiguous share of `num_units` units that process `index` of `count` starts with."""
    return [int(u) for u in np.array_split(np.arange(num_units), count)[index]]


def unit_order(num_units: int, index: int, count: int) -> list[int]:
    """Every unit, in the order process `index` of `count` tries them: its own share first,
    then each following share from its end (where that share's owner arrives last)."""
    shares = np.array_split(np.arange(num_units), count)
    order = list(shares[index])
    for k in range(1, count):
        order += list(shares[(index + k) % count][::-1])
    return [int(u) for u in order]
