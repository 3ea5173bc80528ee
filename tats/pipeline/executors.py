"""Running a stage's work units on a Dask cluster: one task per unit.

Each task runs in a Dask worker process, decodes inline and writes its own shard and ledger
record, exactly as a local run would; the ledger makes tasks that Dask retries or runs twice
harmless, and a rerun of the command resumes a cluster run like any other.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from tqdm import tqdm

from tats.pipeline.runner import RunSummary


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
