"""Shares of work: which units a process starts with under Slurm arrays, torchrun, or by hand."""

import pytest

from tats.pipeline.plan import my_units, resolve_share, unit_order


def slurm(task: int, low: int, high: int) -> dict[str, str]:
    return {"SLURM_ARRAY_TASK_ID": str(task), "SLURM_ARRAY_TASK_MIN": str(low),
            "SLURM_ARRAY_TASK_MAX": str(high), "SLURM_ARRAY_TASK_COUNT": "1"}  # fmt: skip


@pytest.mark.parametrize(
    "env, count, share",
    [
        (slurm(3, 0, 7), 8, (3, 8)),  # a task of the script's --array=0-7
        (slurm(3, 3, 3), 8, (3, 8)),  # resubmitted alone: sbatch --array=3
        (slurm(6, 3, 6), 8, (6, 8)),  # resubmitted as --array=3,6
        (slurm(30, 0, 30), 16, (14, 16)),  # a step array 0-30:2 over a 16-task script
        (slurm(6, 3, 6), None, (6, 7)),  # a script of one's own: the count from the top id
        ({"RANK": "1", "WORLD_SIZE": "4"}, None, (1, 4)),  # torchrun
        ({}, None, (0, 1)),
    ],
)
def test_the_share_comes_from_the_task_and_the_fixed_count(env, count, share):
    assert resolve_share(None, count, env) == share


def test_an_explicit_share_is_checked():
    assert resolve_share(2, 3, {}) == (2, 3)
    with pytest.raises(ValueError, match="--shard-index 3 is not in 0..2"):
        resolve_share(3, 3, {})
    with pytest.raises(ValueError, match="--num-shards must be at least 1"):
        resolve_share(None, 0, {})


def test_a_process_starts_with_its_share_then_takes_the_others_from_their_ends():
    assert my_units(10, 1, 3) == [4, 5, 6]
    assert unit_order(10, 1, 3) == [4, 5, 6, 9, 8, 7, 3, 2, 1, 0]
    for index in range(4):
        assert sorted(unit_order(10, index, 4)) == list(range(10))
    assert unit_order(2, 2, 3) == [0, 1]  # more shares than units: an empty share
