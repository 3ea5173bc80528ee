"""Where a stage's work units run: in this process (with its decoders), or on a Dask cluster.

A stage is described by a recipe: a small picklable object that can build the stage (tracker
or backbone included) and open its store in any process. A Dask task rebuilds the stage once
per worker process, runs one unit decoding inline, and writes its own shard and ledger record
exactly as a local run would; the ledger makes a task that Dask retries or runs twice harmless,
and rerunning the command resumes a cluster run like any other.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from functools import lru_cache, partial
from pathlib import Path
from typing import Protocol

from tqdm import tqdm

from tats.manifest import Manifest
from tats.pipeline.plan import my_units, resolve_share
from tats.pipeline.runner import RunSummary, Stage, run_stage
from tats.stores import RowStore

EXECUTORS = ("local", "dask")


class Recipe(Hashable, Protocol):
    """How to build a stage and its store; frozen and picklable."""

    name: str

    def build(self) -> Stage: ...

    def open_store(self, out: str | Path, manifest: Manifest, stage: Stage) -> RowStore:
        """Create the store for this recipe, or open it if it was made for the same input."""
        ...


@lru_cache(maxsize=2)
def build_stage(recipe: Recipe) -> Stage:
    """The recipe's stage, built once per process (models are expensive to load)."""
    return recipe.build()


def extract(
    recipe: Recipe,
    manifest: Manifest,
    out: str | Path,
    *,
    workers: int = 2,
    shard_index: int | None = None,
    num_shards: int | None = None,
    executor: str = "local",
    scheduler: str | None = None,
    progress: bool = True,
) -> RunSummary:
    """Run this process's share of a stage; finished units are skipped, failed rows retried.

    `executor="dask"` sends each unit to the Dask cluster at `scheduler` instead.
    """
    if executor not in EXECUTORS:
        raise ValueError(f"unknown executor {executor!r}; use {' or '.join(EXECUTORS)}")
    index, count = resolve_share(shard_index, num_shards)
    stage = build_stage(recipe)
    store = recipe.open_store(out, manifest, stage)
    units = my_units(len(store.shards()), index, count)
    if executor == "dask":
        task = partial(_run_unit_remotely, recipe, manifest, str(out))
        return run_on_dask(task, units, scheduler, progress, desc=f"{recipe.name} units")
    return run_stage(stage, store, manifest, units, workers, progress, desc=recipe.name)


def _run_unit_remotely(recipe: Recipe, manifest: Manifest, out: str, unit: int) -> RunSummary:
    store = RowStore.open(out, writable=True)
    return run_stage(build_stage(recipe), store, manifest, [unit], workers=0, progress=False)


def run_on_dask(
    task: Callable[[int], RunSummary],
    units: Sequence[int],
    scheduler: str | None,
    progress: bool = True,
    desc: str = "units",
) -> RunSummary:
    """Run `task(unit)` for every unit on the cluster at `scheduler`.

    `scheduler` is a scheduler address (tcp://host:8786, or a scheduler file path ending in
    .json), or `local` / `local:N` for a LocalCluster of N single-threaded worker processes.
    """
    from dask.distributed import Client, LocalCluster, as_completed

    summary = RunSummary()
    if not units:
        return summary
    cluster = None
    scheduler = scheduler or "local"
    if scheduler == "local" or scheduler.startswith("local:"):
        n = int(scheduler.partition(":")[2] or 2)
        cluster = LocalCluster(
            n_workers=n, threads_per_worker=1, processes=True, dashboard_address=None
        )
        client = Client(cluster)
    elif scheduler.endswith(".json"):
        client = Client(scheduler_file=scheduler)
    else:
        client = Client(scheduler)
    try:
        futures = client.map(task, list(units), pure=False)
        with tqdm(total=len(futures), desc=desc, unit="unit", disable=not progress) as bar:
            for future in as_completed(futures):
                summary.add(future.result())
                bar.update()
                if summary.failures:
                    bar.set_postfix(failed=len(summary.failures), refresh=False)
    finally:
        client.close()
        if cluster is not None:
            cluster.close()
    return summary
