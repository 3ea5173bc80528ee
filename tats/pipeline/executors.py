"""Where a stage's work units run: in this process (with its decoders), or on a Dask cluster.

A stage is described by a recipe: a small picklable object that can build the stage (tracker
or backbone included) and open its store in any process, checking the store's provenance
there too. Both executors run units through `run_stage`, so leases, durable writes and the
per-video bounds are the same everywhere.

On Dask, the manifest is sent to each worker once (in a worker plugin, which the scheduler
also gives to workers that join or restart later; a unit's task holds only the recipe, the
store's path, the options and the plugin's name, so submitting one costs the same at a
thousand rows and at a million, and the tasks stay free of dependencies: the scheduler keeps
them queued until a worker is free, so a worker's death costs only the unit it computed), and
each task runs one unit with one decoding process of its own (a decoder that crashes takes
only that process down). A worker lost while holding a unit has its task retried once
elsewhere (on the LocalCluster this module starts; a scheduler of your own retries as its
`distributed.scheduler.allowed-failures` says); a unit whose task keeps killing its worker
(`KilledWorker`) gets the video its worker was computing recorded as failed, from the dead
holder's lease progress, and runs again without it. Any other error of a task is reported
with its unit and stops the run as an infrastructure error once the other units are done.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, replace
from functools import lru_cache
from pathlib import Path
from typing import Protocol

from tqdm import tqdm

from tats.manifest import Manifest
from tats.pipeline.leases import read_lease, read_progress
from tats.pipeline.ledger import FINISHED, Ledger, UnitRecord, current_run
from tats.pipeline.plan import my_units, resolve_share, unit_order
from tats.pipeline.runner import (
    DEFAULT_MAX_ATTEMPTS,
    Blame,
    RunOptions,
    RunSummary,
    Stage,
    check_share,
    left_failures,
    run_stage,
    sweep,
)
from tats.stores import RowStore

EXECUTORS = ("local", "dask")
# Retries of a Dask task whose worker died (the LocalCluster started here): once elsewhere.
ALLOWED_FAILURES = 1


class Recipe(Hashable, Protocol):
    """How to build a stage and its store; frozen and picklable."""

    name: str

    def build(self) -> Stage: ...

    def open_store(self, out: str | Path, manifest: Manifest, stage: Stage) -> RowStore:
        """Create the store for this recipe, or open it if it was made for the same input."""
        ...


class InfrastructureError(RuntimeError):
    """The run could not go on for a reason that is not a video's: lost workers, a cluster
    that failed a unit. The message names the units; rerunning the command resumes."""


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
    video_timeout: float | None = RunOptions.video_timeout,
    lease_timeout: float = RunOptions.lease_timeout,
    shard_index: int | None = None,
    num_shards: int | None = None,
    executor: str = "local",
    scheduler: str | None = None,
    progress: bool = True,
    max_attempts: int = DEFAULT_MAX_ATTEMPTS,
) -> RunSummary:
    """Run a stage: this process's share first, then whatever units nobody holds.

    Finished units are skipped, failed rows retried (once per run, up to `max_attempts` tries
    in all). `executor="dask"` sends each unit to the Dask cluster at `scheduler` instead (see
    `run_on_dask`).
    """
    if executor not in EXECUTORS:
        raise ValueError(f"unknown executor {executor!r}; use {' or '.join(EXECUTORS)}")
    options = RunOptions(workers, video_timeout, lease_timeout, progress, max_attempts,
                         current_run())  # fmt: skip
    out = Path(out).absolute()  # remote workers have other working directories
    index, count = resolve_share(shard_index, num_shards)
    stage = build_stage(recipe)
    store = recipe.open_store(out, manifest, stage)
    num_units = len(store.shards())
    share = my_units(num_units, index, count)
    order = unit_order(num_units, index, count)
    if executor == "dask":
        with Ledger(store.ledger_dir) as ledger:
            states = ledger.snapshot(num_units)
            left = check_share(store, manifest, ledger, share, states, max_attempts)
        sweep(store, states, lease_timeout)
        name = f"tats-manifest-{uuid.uuid4().hex[:12]}"
        task = UnitTask(recipe, str(out), replace(options, workers=1, progress=False), name)
        return run_on_dask(
            task, manifest, store, share, scheduler, progress, desc=f"{recipe.name} units",
            left=left,
        )  # fmt: skip
    return run_stage(stage, store, manifest, order, options, recipe.name, share=share)


@dataclass(frozen=True)
class UnitTask:
    """One unit of a stage, as a Dask task (picklable), with what is known of the videos that
    killed its earlier workers (`blame`). The manifest is the one the worker plugin named
    `manifest` brought to this worker, not pickled into every task."""

    recipe: Recipe
    out: str
    options: RunOptions
    manifest: str  # the name of the worker plugin that holds it
    blame: Blame = Blame(record=True)

    def __call__(self, unit: int) -> RunSummary:
        from distributed import get_worker

        manifest = get_worker().plugins[self.manifest].manifest
        stage = build_stage(self.recipe)
        store = self.recipe.open_store(self.out, manifest, stage)  # provenance checked
        result = run_stage(stage, store, manifest, [unit], self.options, share=[],
                           blame=self.blame)  # fmt: skip
        # A dead holder's lease was waited for and taken over in `run_stage`, so a video that
        # kills worker after worker fails this same task again (`KilledWorker`). A unit left
        # here is held by a live worker outside this run: give it time before the next look.
        if result.units_elsewhere:
            time.sleep(self.options.lease_timeout / 6)
        return result


def run_on_dask(
    task: UnitTask,
    manifest: Manifest,
    store: RowStore,
    units: Sequence[int],
    scheduler: str | None,
    progress: bool = True,
    desc: str = "units",
    left: Sequence[UnitRecord] = (),
) -> RunSummary:
    """Run `task(unit)` for every unit not finished, on the cluster at `scheduler`, with
    `manifest` on every worker (a plugin named `task.manifest`). The units of `left`
    (`check_share`: failed too often) are not sent: their failures are reported here.

    `scheduler` is a scheduler address (tcp://host:8786, or a scheduler file path ending in
    .json), or `local` / `local:N` for a LocalCluster of N single-threaded worker processes.
    Units held by workers outside this run are waited for (their holders finish them or
    their leases go stale and are taken over).
    """
    import dask
    from dask.distributed import Client, LocalCluster, as_completed
    from distributed import KilledWorker

    summary = RunSummary(failures=left_failures(left, task.options.max_attempts))
    with Ledger(store.ledger_dir) as ledger:
        states = ledger.snapshot(len(store.shards()))
    first, kept = set(units), {record.unit for record in left}
    todo = [u for u in units if states[u] != FINISHED and u not in kept]
    todo += [u for u in range(len(states))
             if states[u] != FINISHED and u not in first and u not in kept]  # fmt: skip
    summary.units_skipped = len(store.shards()) - len(todo)
    if not todo:
        return summary
    cluster = None
    scheduler = scheduler or "local"
    with dask.config.set({"distributed.scheduler.allowed-failures": ALLOWED_FAILURES}):
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
    broken: list[str] = []
    retries: dict[int, UnitTask] = {}
    try:
        client.register_plugin(_manifest_plugin(manifest), name=task.manifest)
        futures = {client.submit(task, u, pure=False): u for u in todo}
        with tqdm(total=len(todo), desc=desc, unit="unit", disable=not progress) as bar:
            pending = as_completed(futures)
            for future in pending:
                unit = futures.pop(future)
                try:
                    result = future.result()
                except KilledWorker:
                    rows = _rows_in_flight(store, unit)
                    if not rows:
                        broken.append(f"unit {unit}: its task killed its Dask worker repeatedly")
                        bar.update()
                        continue
                    retry = retries.get(unit, task)
                    blame = retry.blame
                    if len(rows) > 1:  # a batch: compute its videos alone to find the one
                        blame = replace(blame, suspects=blame.suspects | set(rows))
                    else:
                        reason = "killed its Dask worker process repeatedly while computed"
                        blame = replace(blame, excluded={**blame.excluded, rows[0]: reason})
                    retry = retries[unit] = replace(retry, blame=blame)
                    new = client.submit(retry, unit, pure=False)
                    futures[new] = unit
                    pending.add(new)
                    continue
                except Exception as error:  # noqa: BLE001 - report it with its unit, go on
                    broken.append(f"unit {unit}: {type(error).__name__}: {error}")
                    bar.update()
                    continue
                if result.units_elsewhere:  # held by a live worker outside this run: try again
                    new = client.submit(retries.get(unit, task), unit, pure=False)
                    futures[new] = unit
                    pending.add(new)
                    continue
                summary.add(result)  # units_skipped: finished by another process meanwhile
                bar.update()
                if summary.failures:
                    bar.set_postfix(failed=len(summary.failures), refresh=False)
    finally:
        if cluster is None:  # a cluster of one's own keeps running: take the manifest back
            client.unregister_worker_plugin(task.manifest)
        client.close()
        if cluster is not None:
            cluster.close()
    if broken:
        raise InfrastructureError(
            f"{len(broken)} units did not finish on Dask: {'; '.join(broken[:3])}"
            f"{' ...' if len(broken) > 3 else ''}; rerun to resume"
        )
    return summary


def _manifest_plugin(manifest: Manifest):
    """A worker plugin that holds `manifest` (defined here: distributed loads on demand; the
    class travels by value)."""
    from distributed.diagnostics.plugin import WorkerPlugin

    class ManifestPlugin(WorkerPlugin):
        def __init__(self, manifest: Manifest):
            self.manifest = manifest

    return ManifestPlugin(manifest)


def _rows_in_flight(store: RowStore, unit: int) -> list[int]:
    """The rows the dead holder of `unit` was computing (empty: it was not computing rows)."""
    lease = read_lease(store.lease_dir / f"unit-{unit:06d}.lease")
    if lease is None:
        return []
    progress = read_progress(store.lease_dir, lease.holder.id, unit)
    if not progress or progress["phase"] != "compute":
        return []
    return list(progress["rows"] or [])
