"""The GPU check: every CUDA path of tats and the GPU benchmarks, in one run for a short GPU slot.

    benchmarks/gpu_check.sh OUT_DIR [--wheels DIR] [--only STEP ...] [--skip STEP ...]
    benchmarks/gpu_check.sh --dry-run             # list the steps; run nothing
    benchmarks/gpu_check.sh OUT_DIR --smoke --budget 3600   # tiny sizes, any device: a CPU
                                                  # pre-flight of the steps' own code

Each step runs in its own process group with its own time budget; a step that fails or runs
out of time is killed and recorded as such, and the next step runs. The budgets add up to
465 s, inside the run's 8 minutes (`--budget` scales them all). Steps:

  install    the wheels carried in (benchmarks/fetch_wheels.sh) into a temporary target,
             where zarr, numcodecs, av, dask or distributed do not import; the
             project itself runs from the working tree (PYTHONPATH)
  tests      the CUDA tests (pytest): tests/test_cuda.py and the backbones' CUDA test
  cotracker  CoTracker3 clips per second for TATs tracks (a 16 x 16 grid at the 7 query
             frames of `uniform:8`) on 24- and 80-frame clips at 320x240: the default (bf16)
             at 1, 8 and 16 clips a call, the default in fp32, the exact mode (seven passes,
             fp32, no TF32); the px between bf16 and fp32 tracks
  features   DINOv2 ViT-B/14 frames per second through the features stage, decode workers
  train      training episodes per second from the stores (5-way 1-shot, default model) and
             the data-wait share; the original data path (decode + ViT-B/14 in the step)

Benchmarks use random weights of the real architectures (speed does not depend on them) and
reuse the code of bench_cotracker.py, bench_features.py and bench_train.py. Every throughput
comes with the peak GPU memory PyTorch allocated for it. GPU steps are skipped, with the
reason, on a machine without CUDA (`--smoke` runs them anyway, at tiny sizes).

Writes OUT_DIR/gpu_check.json (the machine, each step's status, reason, time and results,
rewritten after every step) and OUT_DIR/gpu_check.log (everything the steps printed), and
prints a table. SIGTERM, SIGHUP or Ctrl-C stop the running step's processes and skip the rest,
and the report is still written. Exit code 0 when no step failed (skipped steps included), 1
when one failed, ran out of time or was interrupted, 2 for bad arguments.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BENCHMARKS = REPO / "benchmarks"
TOTAL_BUDGET_S = 480.0
MIN_STEP_S = 10.0  # a step with less time than this left is skipped
DEFAULT_WHEELS = BENCHMARKS / "wheels"
# What tats imports that the GPU machines' image lacks (the device README's KINDS.md); decord,
# the fallback decoder, is not carried (benchmarks/fetch_wheels.sh says why).
CARRIED_MODULES = ("zarr", "numcodecs", "av", "dask", "distributed")
CUDA_TESTS = ("tests/test_cuda.py", "tests/test_backbones.py::test_cuda_bf16_path_matches_cpu")
RESULT_FILE, LOG_FILE = "gpu_check.json", "gpu_check.log"


@dataclass(frozen=True)
class Step:
    """One step: `command` runs it (default: this file's own step of that name)."""

    name: str
    budget_s: float
    needs_cuda: bool
    what: str
    command: tuple[str, ...] | None = None


STEPS = (
    Step("install", 40, False, "carried wheels into a temporary target, where modules are missing"),
    Step("tests", 150, True, "pytest " + " ".join(CUDA_TESTS)),
    Step("cotracker", 110, True, "CoTracker3 clips/s, 24 and 80 frames at 320x240: the default "
         "at batches 1, 8, 16, in fp32, the exact mode; bf16 vs fp32 px"),
    Step("features", 70, True, "DINOv2 ViT-B/14 frames/s through the features stage, decode "
         "workers, 1 and 5 views"),
    Step("train", 95, True, "training episodes/s from the stores (5-way 1-shot, default model) "
         "and data wait; the original data path"),
)  # fmt: skip


@dataclass(frozen=True)
class Preset:
    """The sizes of the benchmark steps."""

    cotracker_clips: tuple[tuple[int, int], ...]  # (frames, clips) per clip length
    cotracker_size: str  # WxH of the synthetic clips
    cotracker_grid: int
    cotracker_batches: tuple[int, ...]  # clips per tracker call
    features_backbone: str
    features_clips: int  # distinct synthetic clips (features_clip_size) ...
    features_repeat: int  # ... each listed this many times in the manifest
    features_clip_size: tuple[int, int, int]  # frames, width, height
    features_workers: tuple[int, ...]
    features_views: tuple[int, ...]
    features_batch: int
    train_classes: int
    train_videos_per_class: int
    train_frames: int
    train_way: int
    train_queries: int
    train_episodes: int  # per epoch from the stores; two epochs, the second reported
    original_episodes: int  # per epoch through the original data path
    workers: int  # decode workers and DataLoader workers


PRESETS = {
    # the GPU machines: 16 CPU cores, one H100 or H200
    "gpu": Preset(
        cotracker_clips=((24, 16), (80, 4)), cotracker_size="320x240", cotracker_grid=16,
        cotracker_batches=(1, 8, 16),
        features_backbone="dinov2_vitb14", features_clips=16, features_repeat=16,
        features_clip_size=(60, 480, 360), features_workers=(8,), features_views=(1, 5),
        features_batch=16, train_classes=10, train_videos_per_class=7, train_frames=16,
        train_way=5, train_queries=6, train_episodes=100, original_episodes=30, workers=8,
    ),
    # a pre-flight of the steps' own code on any machine, minutes on 2 CPU cores
    "smoke": Preset(
        cotracker_clips=((4, 2), (6, 1)), cotracker_size="96x64", cotracker_grid=4,
        cotracker_batches=(1, 2),
        features_backbone="dinov2_vits14", features_clips=4, features_repeat=2,
        features_clip_size=(12, 160, 120), features_workers=(1,), features_views=(1,),
        features_batch=4, train_classes=6, train_videos_per_class=2, train_frames=8,
        train_way=3, train_queries=1, train_episodes=1, original_episodes=1, workers=1,
    ),
}  # fmt: skip


class StepFailed(Exception):
    """A step ran and found a failure (its results so far are kept)."""


class StepSkipped(Exception):
    """A step has nothing to do here; the message says why."""


# ---------------------------------------------------------------------------------------------
# The driver


class ArgumentError(Exception):
    pass


class Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit code 2 (argparse prints usage too)
        raise ArgumentError(message)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    names = [s.name for s in STEPS]
    parser = Parser(prog="gpu_check.sh", description=__doc__.split("\n\n")[0])
    parser.add_argument("out", nargs="?", type=Path, help="folder for the JSON and the log")
    parser.add_argument("--dry-run", action="store_true", help="list the steps, run nothing")
    parser.add_argument("--wheels", type=Path, default=DEFAULT_WHEELS, help="carried wheels")
    parser.add_argument("--only", nargs="+", choices=names, metavar="STEP", help="these steps")
    parser.add_argument("--skip", nargs="+", choices=names, metavar="STEP", default=[])
    parser.add_argument(
        "--budget",
        type=float,
        default=TOTAL_BUDGET_S,
        help="wall-time limit of the whole run in seconds; step budgets scale",
    )
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="tiny sizes, GPU steps run on any device (a pre-flight)",
    )
    parser.add_argument("--run-step", choices=names, help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--scratch", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--timeout", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.run_step:
        if args.result is None or args.scratch is None or args.timeout is None:
            parser.error("--run-step needs --result, --scratch and --timeout")
    elif args.out is None and not args.dry_run:
        parser.error("give the output folder OUT_DIR (or --dry-run)")
    elif args.out is not None and args.out.exists() and not args.out.is_dir():
        parser.error(f"{args.out}: exists and is not a folder")
    if args.budget <= 0:
        parser.error(f"--budget must be positive, got {args.budget}")
    return args


def selected(steps, only, skip) -> dict[str, str | None]:
    """Step name -> None if it runs, else why not."""
    return {
        s.name: (
            "not selected (--only)" if only and s.name not in only
            else "not selected (--skip)" if s.name in skip else None
        )
        for s in steps
    }  # fmt: skip


def dry_run(steps, args) -> str:
    """The plan as text: every step, its budget and what it runs."""
    scale = args.budget / TOTAL_BUDGET_S
    why_not = selected(steps, args.only, args.skip)
    lines = [
        f"GPU check plan ({'smoke' if args.smoke else 'gpu'} sizes), {args.budget:.0f} s in all:",
        f"{'step':<10} {'budget':>7}  {'needs':<5}  what",
    ]
    for step in steps:
        need = "CUDA" if step.needs_cuda else "-"
        line = f"{step.name:<10} {step.budget_s * scale:>6.0f}s  {need:<5}  {step.what}"
        lines.append(line + (f" [{why_not[step.name]}]" if why_not[step.name] else ""))
    wheels = sorted(args.wheels.glob("*.whl")) if args.wheels.is_dir() else []
    size = sum(w.stat().st_size for w in wheels) / 2**20
    lines.append(f"wheels: {len(wheels)} in {args.wheels} ({size:.1f} MiB)")
    lines.append(f"writes OUT_DIR/{RESULT_FILE} and OUT_DIR/{LOG_FILE}; nothing ran (--dry-run)")
    return "\n".join(lines)


PROBE = """
import json, os, platform, torch
info = {"python": platform.python_version(), "torch": torch.__version__,
        "cuda_build": torch.version.cuda, "cuda": torch.cuda.is_available(),
        "cpus": os.cpu_count()}
if info["cuda"]:
    info["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    info["gpu_memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
    info["bf16"] = torch.cuda.is_bf16_supported()
print(json.dumps(info))
"""


def probe_machine(env: dict) -> dict:
    """Python, torch and the GPUs as the steps will see them; `no_cuda` says why not, if so."""
    info: dict = {"host": platform.node(), "platform": platform.platform()}
    try:
        done = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True,
                              text=True, timeout=120)  # fmt: skip
    except subprocess.TimeoutExpired:
        return info | {"cuda": False, "no_cuda": "probing torch took over 120 s"}
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return info | {"cuda": False, "no_cuda": f"cannot probe torch: {last}"}
    info |= json.loads(done.stdout.strip().splitlines()[-1])
    if shutil.which("nvidia-smi"):
        smi = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=30,
        )  # fmt: skip
        info["nvidia_smi"] = smi.stdout.strip().splitlines()
    if not info["cuda"]:
        build = info["cuda_build"] or "none"
        info["no_cuda"] = (
            f"no CUDA device: torch {info['torch']} (CUDA build {build}) sees none "
            "(torch.cuda.is_available() is False)"
        )
    return info


def run_command(command, env: dict, timeout: float, log, tail: deque) -> tuple[int | None, float]:
    """Run `command` in its own process group, copying its output to stdout and `log` (the
    last lines to `tail`); stop the group after `timeout` seconds, or when this process is
    interrupted. Returns (exit code or None on timeout, seconds)."""
    started = time.monotonic()
    proc = subprocess.Popen(
        command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        preexec_fn=os.setpgrp, text=True, errors="replace", bufsize=1,
    )  # fmt: skip

    def copy() -> None:
        for line in proc.stdout:
            sys.stdout.write(line)
            sys.stdout.flush()
            log.write(line)
            log.flush()
            if line.strip():
                tail.append(line.rstrip())

    reader = threading.Thread(target=copy, daemon=True)
    reader.start()
    try:
        code = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        code = None
        stop_group(proc)
    except BaseException:  # interrupted (Interrupted, KeyboardInterrupt): leave nothing behind
        stop_group(proc)
        raise
    finally:
        reader.join(timeout=10)
    return code, time.monotonic() - started


def stop_group(proc: subprocess.Popen) -> None:
    """SIGTERM the process group that `proc` leads; SIGKILL what is left of it 5 s later."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass


class Interrupted(Exception):
    """This process got SIGTERM or SIGHUP (a wall-clock limit around the whole check)."""


def interrupt(signum, frame) -> None:
    raise Interrupted(signal.Signals(signum).name)


def step_command(step: Step, args, result: Path, scratch: Path, timeout: float) -> list[str]:
    if step.command is not None:
        return list(step.command)
    command = [sys.executable, str(Path(__file__).resolve()), "--run-step", step.name,
               "--result", str(result), "--scratch", str(scratch), "--timeout", f"{timeout:.0f}",
               "--wheels", str(args.wheels.resolve())]  # fmt: skip
    return command + (["--smoke"] if args.smoke else [])


def read_result(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def run_check(steps, args) -> dict:
    """Run the selected steps within args.budget seconds; write and return the report."""
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    started, clock = time.monotonic(), datetime.now(timezone.utc)
    deadline = started + args.budget
    scale = args.budget / TOTAL_BUDGET_S
    scratch = Path(tempfile.mkdtemp(prefix="tats-gpu-check-"))
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    why_not = selected(steps, args.only, args.skip)
    report = {
        "check": "tats GPU check (benchmarks/gpu_check.py)",
        "preset": "smoke" if args.smoke else "gpu",
        "started": clock.isoformat(timespec="seconds"),
        "budget_s": args.budget,
        "command": " ".join(sys.argv),
        "machine": None,
        "steps": [],
    }
    with open(out / LOG_FILE, "w") as log:

        def say(text: str) -> None:
            print(text, flush=True)
            log.write(text + "\n")
            log.flush()

        stopped = None
        handlers = {sig: signal.signal(sig, interrupt) for sig in (signal.SIGTERM, signal.SIGHUP)}
        for step in steps:
            entry = {"name": step.name, "what": step.what, "budget_s": step.budget_s * scale}
            left = deadline - time.monotonic()
            if stopped:
                entry |= {"status": "skipped", "reason": f"the check was stopped ({stopped})"}
            elif why_not[step.name]:
                entry |= {"status": "skipped", "reason": why_not[step.name]}
            elif left < MIN_STEP_S:
                entry |= {"status": "skipped", "reason": f"out of time: {left:.0f} s left"}
            else:
                tic = time.monotonic()
                try:
                    if step.needs_cuda and report["machine"] is None:
                        report["machine"] = probe_machine(env)
                    machine = report["machine"]
                    if step.needs_cuda and not machine["cuda"] and not args.smoke:
                        entry |= {"status": "skipped", "reason": machine["no_cuda"]}
                    else:
                        timeout = min(step.budget_s * scale, deadline - time.monotonic())
                        say(f"=== {step.name}: {step.what} (budget {timeout:.0f} s)")
                        entry |= run_step(step, args, env, scratch, timeout, log)
                        site = entry.get("result", {}).get("site")
                        if site:  # the installed wheels, for every later step
                            env["PYTHONPATH"] = os.pathsep.join([site, env["PYTHONPATH"]])
                except (Interrupted, KeyboardInterrupt) as signal_name:
                    stopped = str(signal_name) or "SIGINT"  # KeyboardInterrupt has no text
                    entry |= {
                        "status": "interrupted",
                        "seconds": round(time.monotonic() - tic, 1),
                        "reason": f"{stopped} received; the step's processes were stopped",
                    }
            if entry["status"] == "skipped":
                say(f"=== {step.name}: skipped: {entry['reason']}")
            else:
                say(f"=== {step.name}: {entry['status']} in {entry['seconds']:.1f} s"
                    + (f": {entry['reason']}" if entry.get("reason") else ""))  # fmt: skip
            report["steps"].append(entry)
            report["wall_s"] = round(time.monotonic() - started, 1)
            write_json(out / RESULT_FILE, report)
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
        if report["machine"] is None:
            report["machine"] = {"host": platform.node(), "platform": platform.platform()}
        report["finished"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
        report["wall_s"] = round(time.monotonic() - started, 1)
        report["failed"] = [s["name"] for s in report["steps"] if s["status"] in FAILED]
        write_json(out / RESULT_FILE, report)
        say(table(report))
        say(f"wrote {out / RESULT_FILE} and {out / LOG_FILE}")
    shutil.rmtree(scratch, ignore_errors=True)
    return report


FAILED = ("failed", "timeout", "interrupted")


def run_step(step: Step, args, env: dict, scratch: Path, timeout: float, log) -> dict:
    """Run one step's process; its status, reason, seconds and results."""
    result_path = scratch / f"{step.name}.result.json"
    step_scratch = scratch / step.name
    step_scratch.mkdir(exist_ok=True)
    command = step_command(step, args, result_path, step_scratch, timeout)
    tail: deque[str] = deque(maxlen=30)
    code, seconds = run_command(command, env, timeout, log, tail)
    result = read_result(result_path)
    status, reason = result.pop("status", None), result.pop("reason", None)
    if code is None:
        status, reason = "timeout", f"ran past its {timeout:.0f} s budget and was killed"
    elif code != 0:
        status = "failed"
        reason = reason or f"exit code {code}: {tail[-1] if tail else 'no output'}"
    elif status is None:
        status = "passed"
    entry = {"status": status, "reason": reason, "seconds": round(seconds, 1),
             "timeout_s": round(timeout, 1), "exit_code": code, "result": result}  # fmt: skip
    if status in FAILED:
        entry["output_tail"] = list(tail)
    return entry


def write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str) + "\n")
    os.replace(tmp, path)


def table(report: dict) -> str:
    """The steps, the tests and the measurements as markdown tables."""
    machine = report.get("machine") or {}
    gpus = ", ".join(machine.get("gpus", [])) or "no GPU"
    lines = [f"GPU check on {gpus} (torch {machine.get('torch', '?')}), "
             f"{report.get('wall_s', 0):.0f} s of {report['budget_s']:.0f}", "",
             "| step | status | seconds | note |", "|---|---|---|---|"]  # fmt: skip
    for s in report["steps"]:
        seconds = f"{s['seconds']:.0f}" if "seconds" in s else "-"
        seconds += f" / {s['timeout_s']:.0f}" if "timeout_s" in s else ""
        lines.append(f"| {s['name']} | {s['status']} | {seconds} | {s.get('reason') or ''} |")
    tests = [t for s in report["steps"] for t in s.get("result", {}).get("tests", [])]
    if tests:
        lines += ["", "| test | outcome | seconds | message |", "|---|---|---|---|"]
        for t in tests:
            message = (t.get("message") or "").replace("|", "/").replace("\n", " ")[:160]
            lines.append(f"| {t['test']} | {t['outcome']} | {t['seconds']:.1f} | {message} |")
    rows = [m for s in report["steps"] for m in s.get("result", {}).get("measurements", [])]
    if rows:
        lines += ["", "| measurement | throughput | peak GPU memory | detail |",
                  "|---|---|---|---|"]  # fmt: skip
        for m in rows:
            peak = f"{m['peak_gpu_mb'] / 1024:.2f} GiB" if m.get("peak_gpu_mb") else "-"
            lines.append(
                f"| {m['name']} | {m['value']:.4g} {m['unit']} | {peak} | {m.get('detail', '')} |"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse_args(argv)
    except ArgumentError as error:
        print(f"gpu_check: error: {error}", file=sys.stderr)
        return 2
    if args.run_step:
        return run_step_here(args)
    if args.dry_run:
        print(dry_run(STEPS, args))
        return 0
    report = run_check(STEPS, args)
    return 1 if report["failed"] else 0


# ---------------------------------------------------------------------------------------------
# The steps, each run in its own process (`--run-step NAME`)


@dataclass
class Context:
    """What a step gets: its scratch folder, result file, deadline, device and sizes."""

    scratch: Path
    result_path: Path
    deadline: float
    preset: Preset
    wheels: Path
    results: dict = field(default_factory=dict)

    def remaining(self) -> float:
        return max(1.0, self.deadline - time.monotonic())

    def record(self, key: str, value) -> None:
        """Keep a result now, so that it survives a kill at the step's budget."""
        self.results[key] = value
        write_json(self.result_path, self.results)

    def measure(self, name: str, value: float, unit: str, peak_gpu_mb, detail: str, **more):
        """Add a throughput row (the printed table's) to the results."""
        row = {"name": name, "value": value, "unit": unit, "peak_gpu_mb": peak_gpu_mb,
               "detail": detail, **more}  # fmt: skip
        self.record("measurements", [*self.results.get("measurements", []), row])

    @property
    def device(self) -> str:
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"


def run_step_here(args) -> int:
    ctx = Context(args.scratch, args.result, time.monotonic() + args.timeout,
                  PRESETS["smoke" if args.smoke else "gpu"], args.wheels)  # fmt: skip
    sys.path.insert(0, str(BENCHMARKS))  # the benchmark modules whose code the steps reuse
    try:
        STEP_FUNCTIONS[args.run_step](ctx)
    except StepSkipped as why:
        ctx.record("status", "skipped")
        ctx.record("reason", str(why))
    except StepFailed as why:
        ctx.record("status", "failed")
        ctx.record("reason", str(why))
        return 1
    return 0


IMPORT_CHECK = """
import importlib, importlib.metadata as md, json, sys
from packaging.requirements import Requirement
site, modules = sys.argv[1], sys.argv[2:]
versions = {m: getattr(importlib.import_module(m), "__version__", "?") for m in modules}
import tats.stores, tats.video  # the project from the working tree, with its dependencies
unmet = []
for dist in md.distributions(path=[site]):
    for text in dist.requires or []:
        req = Requirement(text)
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue
        try:
            have = md.version(req.name)
        except md.PackageNotFoundError:
            unmet.append(f"{dist.metadata['Name']} needs {text}: missing")
            continue
        if not req.specifier.contains(have, prereleases=True):
            unmet.append(f"{dist.metadata['Name']} needs {text}: {have} found")
print(json.dumps({"versions": versions, "unmet": sorted(set(unmet))}))
"""


def step_install(ctx: Context) -> None:
    """Install the carried wheels into a temporary target where a needed module is missing."""
    missing = [m for m in CARRIED_MODULES if importlib.util.find_spec(m) is None]
    if not missing:
        raise StepSkipped(f"{', '.join(CARRIED_MODULES)} import already")
    wheels = sorted(ctx.wheels.glob("*.whl")) if ctx.wheels.is_dir() else []
    if not wheels:
        raise StepFailed(
            f"{', '.join(missing)} do not import and {ctx.wheels} holds no wheels: run "
            "benchmarks/fetch_wheels.sh where pip reaches the registries, and carry the folder"
        )
    site = ctx.scratch / "site"
    ctx.record("wheels", [w.name for w in wheels])
    pip = [sys.executable, "-m", "pip", "install", "--quiet", "--no-index", "--no-deps",
           "--no-compile", "--no-cache-dir", "--disable-pip-version-check", "--target", str(site),
           *map(str, wheels)]  # fmt: skip
    done = subprocess.run(pip, timeout=ctx.remaining())
    if done.returncode != 0:
        raise StepFailed(f"pip install of {len(wheels)} wheels failed (exit {done.returncode})")
    ctx.record("site", str(site))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), os.environ["PYTHONPATH"]])}
    check = subprocess.run(
        [sys.executable, "-c", IMPORT_CHECK, str(site), *CARRIED_MODULES], env=env,
        capture_output=True, text=True, timeout=ctx.remaining(),
    )  # fmt: skip
    if check.returncode != 0:
        print(check.stderr)
        last = (check.stderr.strip().splitlines() or ["no output"])[-1]
        raise StepFailed(f"installed, but the imports fail: {last}")
    found = json.loads(check.stdout.strip().splitlines()[-1])
    ctx.record("versions", found["versions"])
    ctx.record("unmet_requirements", found["unmet"])
    print(f"installed {len(wheels)} wheels into {site}: {found['versions']}")
    if found["unmet"]:
        raise StepFailed(f"requirements not met: {'; '.join(found['unmet'])}")


def step_tests(ctx: Context) -> None:
    """The CUDA tests, each test's outcome recorded as it finishes."""
    import pytest

    class Recorder:
        def __init__(self) -> None:
            self.tests: list[dict] = []

        def pytest_runtest_logreport(self, report) -> None:
            if report.when == "call" or (report.when == "setup" and not report.passed):
                message = None
                if report.skipped and isinstance(report.longrepr, tuple):
                    message = report.longrepr[2].removeprefix("Skipped: ")
                elif report.failed:
                    crash = getattr(report.longrepr, "reprcrash", None)
                    message = crash.message if crash else str(report.longrepr)[-500:]
                outcome = "error" if report.when == "setup" and report.failed else report.outcome
                self.tests.append(
                    {
                        "test": report.nodeid,
                        "outcome": outcome,
                        "seconds": round(report.duration, 2),
                        "message": message,
                    }
                )
                ctx.record("tests", self.tests)  # fmt: skip

    recorder = Recorder()
    code = pytest.main(["-ra", "-p", "no:cacheprovider", "--rootdir", str(REPO), *CUDA_TESTS],
                       plugins=[recorder])  # fmt: skip
    outcomes = [t["outcome"] for t in recorder.tests]
    bad = [t["test"] for t in recorder.tests if t["outcome"] in ("failed", "error")]
    if bad or code not in (0, 5):
        raise StepFailed(f"{len(bad)} failed: {', '.join(bad)}" if bad else f"pytest exit {code}")
    if outcomes and all(o == "skipped" for o in outcomes):
        reasons = sorted({t["message"] for t in recorder.tests})
        raise StepSkipped(f"every test skipped: {'; '.join(reasons)}")


def peak_gpu_mb(device: str) -> float | None:
    import torch

    return round(torch.cuda.max_memory_allocated() / 2**20, 1) if device == "cuda" else None


def reset_peak(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def step_cotracker(ctx: Context) -> None:
    """The default (bf16 on the GPU) at batches of 1, 8 and 16 clips a call, the default in
    fp32 and the exact mode (seven passes, fp32, no TF32), each in its own process (its own
    peak memory), through bench_cotracker.py's worker; then how far bf16 is from fp32 and
    from the exact mode, in px."""
    import bench_cotracker as bc
    import numpy as np

    p, device = ctx.preset, ctx.device
    folder = ctx.scratch
    checkpoint = bc.random_checkpoint("offline", folder / "offline.pth", 0)
    online = bc.random_checkpoint("online", folder / "online.pth", 10)
    runs = [(f"batch {b}", "batched", b) for b in p.cotracker_batches]
    runs += [("fp32", "default_fp32", 1), ("exact", "exact", 1)]
    for frames, videos in p.cotracker_clips:
        clip_folder = folder / f"clips-{frames}"
        clip_folder.mkdir()
        options = argparse.Namespace(video=[], size=p.cotracker_size, frames=frames,
                                     videos=videos, seed=0, queries="uniform:8",
                                     grid=p.cotracker_grid)  # fmt: skip
        clips = bc.make_clips(options, clip_folder)
        points = sum(c["points"] for c in clips)
        arrays = {}
        for label, procedure, batch in runs:
            name = label.replace(" ", "_")
            spec = {"procedure": procedure, "clips": clips, "device": device,
                    "checkpoint": str(checkpoint), "online_checkpoint": str(online),
                    "result": str(clip_folder / name), "batch": batch}  # fmt: skip
            spec_path = clip_folder / f"{name}.spec.json"
            spec_path.write_text(json.dumps(spec))
            done = subprocess.run([sys.executable, bc.__file__, "--worker", str(spec_path)],
                                  timeout=ctx.remaining())  # fmt: skip
            if done.returncode != 0:
                raise StepFailed(f"{label} on {frames}-frame clips: exit {done.returncode}")
            run = json.loads(Path(spec["result"] + ".json").read_text())
            arrays[label] = dict(np.load(spec["result"] + ".npz"))
            seconds = sum(run["seconds"])
            ctx.measure(
                f"CoTracker3 {frames} frames, {label}", len(clips) / seconds, "clips/s",
                run.get("peak_gpu_mb"),
                f"{len(clips)} clips of {p.cotracker_size}, {points // len(clips)} points each, "
                f"{seconds / len(clips):.3f} s/clip",
                frames=frames, clips=len(clips), batch=batch, seconds=run["seconds"],
                mode=run["identity"]["mode"],
            )  # fmt: skip
        bf16 = arrays[f"batch {p.cotracker_batches[0]}"]
        ctx.record(f"bf16_vs_fp32_{frames}_frames", bc.compare(clips, bf16, arrays["fp32"], 16.0))
        ctx.record(f"bf16_vs_exact_{frames}_frames",
                   bc.compare(clips, bf16, arrays["exact"], 16.0))  # fmt: skip


def step_features(ctx: Context) -> None:
    """bench_features.run on the device: each distinct synthetic clip is listed
    `features_repeat` times, so that the GPU has work enough while the clips render fast."""
    import bench_features as bf

    from tats.manifest import VideoRow, read_manifest, write_manifest
    from tats.synth import SynthConfig, generate

    p, device = ctx.preset, ctx.device
    frames, width, height = p.features_clip_size
    synth = SynthConfig(classes=4, videos_per_class=p.features_clips // 4, frames=frames,
                        width=width, height=height)  # fmt: skip
    clips = read_manifest(generate(synth, ctx.scratch / "synth", progress=False)).rows
    rows = [VideoRow(0, f"{r.video_id}_{k}", r.path, r.label, r.split)
            for k in range(p.features_repeat) for r in clips]  # fmt: skip
    manifest = ctx.scratch / "manifest.csv"
    write_manifest(rows, manifest)
    weights = bf.random_weights(p.features_backbone, ctx.scratch)
    for workers in p.features_workers:
        for views in p.features_views:
            reset_peak(device)
            run = bf.run(manifest, weights, p.features_backbone, workers, views,
                         p.features_batch, ctx.scratch, device=device)  # fmt: skip
            ctx.measure(
                f"features stage, {p.features_backbone}, {views} view{'s' * (views > 1)}",
                run["frames_per_s"], "frames/s", peak_gpu_mb(device),
                f"{run['videos']} videos of {width}x{height}, {workers} decode workers, "
                f"batches of {p.features_batch} videos; backbone {run['backbone_share']:.0%} "
                "of wall time",
                **run,
            )  # fmt: skip


def step_train(ctx: Context) -> None:
    """bench_train's two data paths on the device, at this preset's episode counts."""
    import bench_train as bt

    from tats.episodes import EpisodeData
    from tats.model import ModelConfig
    from tats.pipeline.backbones import create_backbone
    from tats.synth import SynthConfig
    from tats.train import train
    from tats.train_config import TrainConfig

    p, device, work = ctx.preset, ctx.device, ctx.scratch
    synth = SynthConfig(classes=p.train_classes, videos_per_class=p.train_videos_per_class,
                        frames=p.train_frames)  # fmt: skip
    manifest, tracks, features = bt.build(work, synth, device, p.workers)
    cfg = TrainConfig(
        tracks=str(tracks), features=str(features), manifest=str(manifest), out=str(work / "run"),
        way=p.train_way, train_queries=p.train_queries, episodes=p.train_episodes, epochs=2,
        val_episodes=0, test_episodes=0, device=device, workers=p.workers,
        log_every=p.train_episodes,
    )  # fmt: skip
    episode = f"{cfg.way}-way {cfg.shot}-shot, {cfg.train_queries} queries per class"
    reset_peak(device)
    stores = bt.summarize(train(cfg).history)
    ctx.measure(
        "training from the stores", stores["episodes_per_second"], "episodes/s",
        peak_gpu_mb(device),
        f"{episode}, default model; data wait {stores['data_wait_share']:.1%} of step time",
        **stores,
    )  # fmt: skip
    data = EpisodeData.open(tracks, features, manifest)
    model_cfg = ModelConfig(num_classes=len(data.manifest.classes("train")))
    backbone = create_backbone(
        bt.BACKBONE, weights=work / "dinov2_vitb14_random.pth", device=device
    )
    reset_peak(device)
    original = bt.original_path(data, manifest, backbone, model_cfg, cfg, p.original_episodes)
    ratio = stores["episodes_per_second"] / original["episodes_per_second"]
    ctx.measure(
        "original data path (decode + ViT-B/14 in the step)", original["episodes_per_second"],
        "episodes/s", peak_gpu_mb(device),
        f"{episode}; data wait {original['data_wait_share']:.1%}; the stores are "
        f"{ratio:.1f}x faster",
        **original,
    )  # fmt: skip
    ctx.record("stores_vs_original", ratio)


STEP_FUNCTIONS = {
    "install": step_install,
    "tests": step_tests,
    "cotracker": step_cotracker,
    "features": step_features,
    "train": step_train,
}


if __name__ == "__main__":
    sys.exit(main())
