"""Stage one's bookkeeping from 1k to 1M manifest rows and 8 to 64 processes (issue 19), before
and after, side by side in one run.

    nice -n 10 .venv/bin/python benchmarks/bench_scale.py [--only CASE ...] [--rows 1000 ...]
        [--workers 8 16 32 64] [--old /tmp/oldmain] [--out benchmarks/results/scale.json]

"Before" is tats at commit 828b202 (a `git worktree` at `--old`, made when missing), run in
subprocesses with PYTHONPATH pointing at it; "after" is this tree. Every measurement runs in a
fresh process of its own, which counts what it does from Python's audit events (each file
opened, folder listed, hard link made): counts do not depend on the machine, times do (a busy
2-core machine here; the page cache warm, as for a rerun).

Cases (`--only NAME`, repeatable; a case is a function of `Context` returning result rows, so
more can be added to CASES):

- resume: a task of 1,000 array tasks resumed on a finished store (Slurm's rerun of a
  finished job): records opened, folders read, files opened, seconds, the debris scan alone.
  The stores are synthetic: one real shard per array, hard-linked into every unit, and one
  real record per unit (64 rows: digests and video stamps).
- claims: W processes on one store of 128 units of one video each (computing takes 50 ms a
  unit): claim attempts lost in the first look, claim attempts while waiting at the end, lease
  files read, ledger records opened.
- dask: the pickled size of one unit's Dask task, and the time to pickle it, against the
  manifest's rows.
- files: files and folders of a tracks store and a features store of 1,000 videos, all done.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import bench_scale_readers
import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
OLD_COMMIT = "828b202"
SHARD = 64
TASKS = 1000  # array tasks of the resume case


# ----------------------------------------------------------------------------- counting


class Counts:
    """What this process did, from audit events (installed once, at import of a probe)."""

    def __init__(self) -> None:
        self.opens = 0
        self.records = 0  # ledger records opened
        self.lease_reads = 0
        self.folders = 0  # folder listings (os.scandir, os.listdir: glob and rglob use them)
        self.links: list[bool] = []  # a lease hard link tried: True while waiting at the end
        self.waiting = False

    def hook(self, event: str, args: tuple) -> None:
        if event == "open" and isinstance(args[0], str | bytes | os.PathLike):
            path = os.fsdecode(args[0])
            self.opens += 1
            if "/ledger/unit-" in path and path.endswith(".json"):
                self.records += 1
            elif "/leases/unit-" in path and path.endswith(".lease"):
                self.lease_reads += 1
        elif event in ("os.scandir", "os.listdir"):
            self.folders += 1
        elif event == "os.link" and "/leases/unit-" in os.fsdecode(args[1]):
            self.links.append(self.waiting)


COUNTS = Counts()


def _count_waiting() -> None:
    """Links tried in the second look (waiting on held units) are counted apart."""
    from tats.pipeline import runner

    original = runner._Claims.second_look

    def second_look(self):
        COUNTS.waiting = True
        yield from original(self)

    runner._Claims.second_look = second_look


# ----------------------------------------------------------------------------- probes
# Run in subprocesses under either code (old or new tats); they use only APIs both have.


def _load(row):
    return row.row


class _Stage:
    """A stage that writes a constant row; `sleep` seconds per batch of compute."""

    loader = staticmethod(_load)
    batch_size = 1

    def __init__(self, fields, sleep: float = 0.0):
        self.fields, self.sleep = fields, sleep

    def compute(self, rows, inputs):
        time.sleep(self.sleep)
        return [_row(self.fields) for _ in rows]


@dataclass(frozen=True)
class _Recipe:
    """A recipe as executors pickle it into Dask tasks."""

    name: str = "bench"

    def build(self):
        return None

    def open_store(self, out, manifest, stage):
        raise NotImplementedError


def _row(fields) -> dict:
    """One plausible row of a tracks or features store."""
    rng = np.random.default_rng(0)
    row = {}
    for name, f in fields.items():
        if name == "num_frames":
            row[name] = np.int32(80)
        elif name == "frames":
            row[name] = np.linspace(0, 79, f.shape[0]).astype(np.int32)
        elif name == "frame_size":
            row[name] = np.array([240, 320], np.int32)
        elif f.dtype == "bool":
            row[name] = np.ones(f.shape, bool)
        elif f.dtype.startswith("float"):
            row[name] = rng.uniform(0, 200, f.shape).astype(f.dtype)
        else:
            row[name] = np.zeros(f.shape, f.dtype)
    return row


def _manifest(folder: Path, rows: int) -> Path:
    """A manifest of `rows` videos, all the same small file (only its stamp is read)."""
    path = folder / "manifest.csv"
    if not path.exists():
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "video.mp4").write_bytes(np.random.default_rng(0).bytes(16384))
        with open(path, "w") as f:
            f.write("video_id,path,label,split\n")
            f.writelines(f"v{i},video.mp4,c{i % 50},train\n" for i in range(rows))
    return path


def probe_build(folder: str, rows: int) -> dict:
    """A finished tracks store of `rows` rows: unit 0 written for real, its shard files
    hard-linked into every other unit, one record per unit."""
    from tats.manifest import read_manifest
    from tats.pipeline.ledger import Ledger, UnitRecord
    from tats.pipeline.sources import stamp
    from tats.stores import TRACKS, RowStore, row_digest, tracks_fields

    folder = Path(folder)
    tic = time.perf_counter()
    manifest = read_manifest(_manifest(folder, rows))
    out = folder / "tracks.zarr"
    fields = tracks_fields(8, 256, 256)
    store = RowStore.create_or_open(out, TRACKS, fields, rows, SHARD, {"bench": manifest.sha256})
    first = range(0, min(SHARD, rows))
    data = {n: np.stack([_row(fields)[n]] * len(first)) for n in fields}
    store.write_rows(first, data)
    digests = {r: row_digest(data, r) for r in first}
    video = stamp(manifest.rows[0].path)
    ledger = Ledger(store.ledger_dir)
    ledger.write(UnitRecord(0, (0, len(first)), digests, [], sources={r: video for r in first}))
    arrays = {n: store.group[n] for n in fields}
    units = len(store.shards())
    for unit, shard in enumerate(store.shards()[1:], start=1):
        for name, array in arrays.items():
            ndim = len(fields[name].shape)
            src = out / name / array.metadata.encode_chunk_key((0,) + (0,) * ndim)
            dst = out / name / array.metadata.encode_chunk_key((unit,) + (0,) * ndim)
            dst.parent.mkdir(parents=True, exist_ok=True)
            os.link(src, dst)
        record = UnitRecord(unit, (shard.start, shard.stop),
                            {r: digests[r % SHARD] for r in shard}, [],
                            sources={r: video for r in shard})  # fmt: skip
        (store.ledger_dir / f"unit-{unit:06d}.json").write_text(record.to_json())
    if hasattr(ledger, "snapshot"):  # the units map, as the writers of the records leave it
        ledger.snapshot(units)
    return {"rows": rows, "units": units, "build_seconds": round(time.perf_counter() - tic, 1)}


def probe_resume(folder: str, rows: int, tasks: int) -> dict:
    """Task 0 of `tasks` resumed on the finished store: what it reads."""
    from tats.manifest import read_manifest
    from tats.pipeline.plan import my_units, unit_order
    from tats.pipeline.runner import RunOptions, run_stage
    from tats.stores import RowStore

    folder = Path(folder)
    manifest = read_manifest(folder / "manifest.csv")
    store = RowStore.open(folder / "tracks.zarr", writable=True)
    units = len(store.shards())
    share = my_units(units, 0, tasks)
    order = unit_order(units, 0, tasks)
    before = dict(vars(COUNTS))
    tic = time.perf_counter()
    summary = run_stage(_Stage(store.fields), store, manifest, order,
                        RunOptions(workers=0, progress=False), share=share)  # fmt: skip
    seconds = time.perf_counter() - tic
    assert summary.units_skipped == units, summary
    run = {k: COUNTS.__dict__[k] - before[k] for k in ("opens", "records", "folders")}
    folders = COUNTS.folders
    tic = time.perf_counter()
    store.remove_debris(older_than=3600)
    return {"rows": rows, "units": units, "share": len(share), "seconds": round(seconds, 3),
            "records_opened": run["records"], "files_opened": run["opens"],
            "folders_read": run["folders"],
            "debris_scan": {"seconds": round(time.perf_counter() - tic, 3),
                            "folders_read": COUNTS.folders - folders}}  # fmt: skip


def probe_claimer(folder: str, index: int, count: int) -> dict:
    """One of `count` processes on the claims store; waits for folder/go to start."""
    from tats.manifest import read_manifest
    from tats.pipeline.plan import my_units, unit_order
    from tats.pipeline.runner import RunOptions, run_stage
    from tats.stores import RowStore

    _count_waiting()
    folder = Path(folder)
    manifest = read_manifest(folder / "manifest.csv")
    store = RowStore.open(folder / "s.zarr", writable=True)
    units = len(store.shards())
    (folder / f"ready-{index}").touch()
    while not (folder / "go").exists():
        time.sleep(0.01)
    before = dict(vars(COUNTS))
    order, share = unit_order(units, index, count), my_units(units, index, count)
    options = RunOptions(workers=0, progress=False)
    summary = run_stage(_Stage(store.fields, 0.05), store, manifest, order, options, share=share)
    return {"computed": summary.units,
            "links_first_look": COUNTS.links.count(False),
            "links_waiting": COUNTS.links.count(True),
            "lease_reads": COUNTS.lease_reads - before["lease_reads"],
            "records_opened": COUNTS.records - before["records"]}  # fmt: skip


def probe_claims(folder: str, workers: int, units: int = 128) -> dict:
    from tats.manifest import read_manifest
    from tats.pipeline.leases import read_log
    from tats.stores import FEATURES, RowStore, features_fields

    folder = Path(folder)
    shutil.rmtree(folder, ignore_errors=True)
    manifest = read_manifest(_manifest(folder, units))
    fields = features_fields(1, 2, 1, 3)
    RowStore.create_or_open(
        folder / "s.zarr", FEATURES, fields, units, 1, {"bench": manifest.sha256}
    )
    env = dict(os.environ)
    runs = [
        subprocess.Popen(
            [sys.executable, __file__, "_probe", "claimer", json.dumps([str(folder), i, workers])],
            env=env,
            stdout=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        for i in range(workers)
    ]
    while not all((folder / f"ready-{i}").exists() for i in range(workers)):
        if any(r.poll() is not None for r in runs):
            raise RuntimeError("a claimer died before starting")
        time.sleep(0.05)
    tic = time.perf_counter()
    (folder / "go").touch()
    results = [json.loads(r.communicate()[0].splitlines()[-1]) for r in runs]
    wall = time.perf_counter() - tic
    claims = sum(e["event"] == "claim" for e in read_log(folder / "s.zarr" / "leases"))
    first = sum(r["links_first_look"] for r in results)
    waiting = sum(r["links_waiting"] for r in results)
    assert sum(r["computed"] for r in results) == units
    return {"workers": workers, "units": units, "claims_won": claims,
            "claims_lost": first + waiting - claims, "claim_attempts_while_waiting": waiting,
            "lease_reads": sum(r["lease_reads"] for r in results),
            "records_opened": sum(r["records_opened"] for r in results),
            "seconds": round(wall, 2)}  # fmt: skip


def probe_dask(folder: str, rows: int) -> dict:
    """The pickled unit task, as `extract(executor="dask")` builds it."""
    from dataclasses import fields as dataclass_fields

    from distributed.protocol.pickle import dumps

    from tats.manifest import read_manifest
    from tats.pipeline.executors import UnitTask
    from tats.pipeline.runner import RunOptions

    manifest = read_manifest(_manifest(Path(folder), rows))
    options = RunOptions(workers=1, progress=False)
    if [f.name for f in dataclass_fields(UnitTask)][1] == "manifest":  # before: in every task
        task = UnitTask(_Recipe(), manifest, "/tmp/x.zarr", options)
        once = 0
    else:  # after: a worker plugin's name; the plugin takes the manifest to each worker once
        task = UnitTask(_Recipe(), "/tmp/x.zarr", options, "tats-manifest-0123456789ab")
        once = len(dumps(manifest))
    tic = time.perf_counter()
    size = len(dumps((task, 7)))
    return {"rows": rows, "task_bytes": size, "pickle_seconds": round(time.perf_counter() - tic, 4),
            "manifest_bytes_once_per_worker": once}  # fmt: skip


def probe_files(folder: str, rows: int = 1000) -> dict:
    from tats.stores import FEATURES, TRACKS, RowStore, features_fields, tracks_fields

    folder = Path(folder)
    shutil.rmtree(folder, ignore_errors=True)
    found = {}
    # Small rows: the count of files and folders does not depend on their size.
    kinds = (("tracks", TRACKS, tracks_fields(8, 16, 16)),
             ("features", FEATURES, features_fields(2, 8, 2, 8)))  # fmt: skip
    for kind, schema, fields in kinds:
        store = RowStore.create_or_open(folder / kind, schema, fields, rows, SHARD, {"b": 1})
        for shard in store.shards():
            store.write_rows(shard, {n: np.stack([_row(fields)[n]] * len(shard)) for n in fields})
        paths = list((folder / kind).rglob("*"))
        files = sum(p.is_file() for p in paths) + len(store.shards())  # + one record per unit
        found[kind] = {"files": files, "folders": sum(p.is_dir() for p in paths)}
    total = {k: sum(v[k] for v in found.values()) for k in ("files", "folders")}
    return {"videos": rows, **found, "inodes_per_1000_videos": round(
        (total["files"] + total["folders"]) * 1000 / rows)}  # fmt: skip


PROBES: dict[str, Callable[..., dict]] = {
    "build": probe_build, "resume": probe_resume, "claimer": probe_claimer,
    "claims": probe_claims, "dask": probe_dask, "files": probe_files,
}  # fmt: skip


# ----------------------------------------------------------------------------- cases


@dataclass
class Context:
    rows: list[int]
    workers: list[int]
    work: Path
    codes: dict[str, Path | None]  # "before": old checkout, "after": None (this tree)
    log: Callable[[str], None] = print
    notes: list[str] = field(default_factory=list)

    def probe(self, code: str, name: str, *args) -> dict:
        env = dict(os.environ)
        old = self.codes[code]
        env["PYTHONPATH"] = str(old) if old else str(REPO)
        run = subprocess.run(
            ["nice", "-n", "10", sys.executable, __file__, "_probe", name, json.dumps(args)],
            env=env, capture_output=True, text=True,
        )  # fmt: skip
        if run.returncode:
            raise RuntimeError(f"{code} {name}{args}: {run.stderr[-3000:]}")
        return json.loads(run.stdout.splitlines()[-1])


def case_resume(ctx: Context) -> list[dict]:
    results = []
    for rows in ctx.rows:
        for code in ctx.codes:
            folder = ctx.work / f"resume-{code}-{rows}"
            if not (folder / "built.json").exists():
                shutil.rmtree(folder, ignore_errors=True)
                built = ctx.probe(code, "build", str(folder), rows)
                (folder / "built.json").write_text(json.dumps(built))
            result = ctx.probe(code, "resume", str(folder), rows, TASKS)
            result |= {"code": code, "tasks": TASKS,
                       "records_opened_by_all_tasks": result["records_opened"] * TASKS}  # fmt: skip
            ctx.log(f"resume {code} {rows}: {result}")
            results.append(result)
    return results


def case_claims(ctx: Context) -> list[dict]:
    results = []
    for workers in ctx.workers:
        for code in ctx.codes:
            result = ctx.probe(code, "claims", str(ctx.work / f"claims-{code}"), workers)
            result["code"] = code
            ctx.log(f"claims {code} W={workers}: {result}")
            results.append(result)
    return results


def case_dask(ctx: Context) -> list[dict]:
    results = []
    for rows in ctx.rows:
        for code in ctx.codes:
            result = ctx.probe(code, "dask", str(ctx.work / f"dask-{rows}"), rows)
            result["code"] = code
            ctx.log(f"dask {code} {rows}: {result}")
            results.append(result)
    return results


def case_files(ctx: Context) -> list[dict]:
    results = []
    for code in ctx.codes:
        result = ctx.probe(code, "files", str(ctx.work / f"files-{code}"))
        result["code"] = code
        ctx.log(f"files {code}: {result}")
        results.append(result)
    return results


def case_verify(ctx: Context) -> list[dict]:
    """`tats-extract verify --workers 1|2` on finished stores of up to 100k rows (this tree;
    linked_stores.py builds them)."""
    import linked_stores

    command = str(Path(sys.executable).with_name("tats-extract"))
    out = []
    for rows in [r for r in ctx.rows if r <= 100_000]:
        folder = ctx.work / f"verify-{rows}"
        if not (folder / "features.zarr").exists():
            shutil.rmtree(folder, ignore_errors=True)
            linked_stores.build(folder, rows, 1.0)
        for store in ("tracks", "features"):
            for workers in (1, 2):
                before, tic = os.times(), time.perf_counter()
                run = subprocess.run([command, "verify", str(folder / f"{store}.zarr"),
                                      "--workers", str(workers), "--no-progress"],
                                     capture_output=True, text=True)  # fmt: skip
                seconds, after = time.perf_counter() - tic, os.times()
                cpu = after.children_user + after.children_system
                cpu -= before.children_user + before.children_system
                ctx.log(f"verify {store} {rows} rows, {workers} workers: {seconds:.1f} s")
                out.append({"rows": rows, "store": store, "workers": workers, "code": "after",
                            "seconds": round(seconds, 2), "cpu_seconds": round(cpu, 2),
                            "exit": run.returncode})  # fmt: skip
    return out


CASES: dict[str, Callable[[Context], list[dict]]] = {
    "resume": case_resume, "claims": case_claims, "dask": case_dask, "files": case_files,
    "verify": case_verify,
}  # fmt: skip
# The readers' cases (trainer start-up, manifest memory, predict's prototypes).
CASES.update(bench_scale_readers.CASES)
PROBES.update(bench_scale_readers.PROBES)


def _old_checkout(path: Path) -> Path:
    if not (path / "tats" / "stores.py").exists():
        subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(path),
                        OLD_COMMIT], check=True)  # fmt: skip
    return path


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "_probe":
        sys.addaudithook(COUNTS.hook)
        sys.path.insert(0, str(HERE))
        result = PROBES[sys.argv[2]](*json.loads(sys.argv[3]))
        print(json.dumps(result))
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", action="append", choices=sorted(CASES))
    parser.add_argument("--rows", type=int, nargs="+", default=[1000, 10_000, 100_000, 1_000_000])
    parser.add_argument("--workers", type=int, nargs="+", default=[8, 16, 32, 64])
    parser.add_argument(
        "--old",
        type=Path,
        default=Path("/tmp/oldmain"),
        help=f"a checkout of {OLD_COMMIT} (made here when missing)",
    )
    parser.add_argument("--no-old", action="store_true", help="measure this tree only")
    parser.add_argument("--work", type=Path, default=Path("/tmp/tats-bench-scale"))
    parser.add_argument("--out", type=Path, default=HERE / "results" / "scale.json")
    args = parser.parse_args()
    codes = {"after": None} if args.no_old else {"before": _old_checkout(args.old), "after": None}
    ctx = Context(args.rows, args.workers, args.work, codes)
    args.work.mkdir(parents=True, exist_ok=True)
    results = json.loads(args.out.read_text()) if args.out.exists() else {}
    results.setdefault("cases", {})
    for name in args.only or list(CASES):
        results["cases"][name] = CASES[name](ctx)
        results["machine"] = {"cpus": os.cpu_count(), "python": platform.python_version(),
                              "platform": platform.platform()}  # fmt: skip
        results["before"] = f"tats at {OLD_COMMIT}"
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
