"""benchmarks/gpu_check.sh on a machine without a GPU: the plan, the arguments, the skips with
their reasons, and a failing or hanging step that does not stop the others (real processes)."""

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "gpu_check.sh"
spec = importlib.util.spec_from_file_location("gpu_check", REPO / "benchmarks" / "gpu_check.py")
gpu_check = sys.modules["gpu_check"] = importlib.util.module_from_spec(spec)
spec.loader.exec_module(gpu_check)
STEP_NAMES = ["install", "tests", "cotracker", "features", "train"]


def run_script(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHON": sys.executable}
    return subprocess.run([str(SCRIPT), *args], capture_output=True, text=True, env=env,
                          timeout=timeout)  # fmt: skip


def alive(pid: int, wait: float = 5.0) -> bool:
    """Whether process `pid` still runs (a zombie waiting to be reaped does not) after `wait` s."""
    end = time.monotonic() + wait
    while True:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (FileNotFoundError, ProcessLookupError):
            return False
        if state == "Z" or time.monotonic() > end:
            return state != "Z"
        time.sleep(0.1)


def test_the_steps_fit_the_slot():
    assert [s.name for s in gpu_check.STEPS] == STEP_NAMES
    assert gpu_check.TOTAL_BUDGET_S <= 8 * 60
    # the budgets leave room for probing the machine (a torch import) and the report
    assert sum(s.budget_s for s in gpu_check.STEPS) <= gpu_check.TOTAL_BUDGET_S - 15
    assert [s.name for s in gpu_check.STEPS if not s.needs_cuda] == ["install"]


def test_dry_run_lists_every_step_and_runs_nothing(tmp_path):
    done = run_script("--dry-run", "--wheels", str(tmp_path / "none"))
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    for step in gpu_check.STEPS:
        line = next(x for x in lines if x.startswith(step.name + " "))
        assert f"{step.budget_s:.0f}s" in line and step.what in line
    assert "480 s in all" in lines[0] and "nothing ran" in lines[-1]
    assert f"wheels: 0 in {tmp_path / 'none'}" in done.stdout

    only = run_script("--dry-run", "--only", "tests", "--budget", "960").stdout.splitlines()
    plan = {line.split()[0]: line for line in only[2:-2]}
    assert plan["tests"].split()[1] == "300s"  # budgets scale with --budget
    assert plan["install"].endswith("[not selected (--only)]")
    assert "not selected" not in plan["tests"]


@pytest.mark.parametrize(
    "args, message",
    [
        ([], "give the output folder OUT_DIR (or --dry-run)"),
        (["out", "--only", "nope"], "argument --only: invalid choice: 'nope'"),
        (["out", "--budget", "0"], "--budget must be positive, got 0.0"),
    ],
)
def test_bad_arguments_exit_2_with_one_line(args, message):
    done = run_script(*args)
    assert done.returncode == 2 and done.stdout == ""
    (line,) = done.stderr.splitlines()
    assert line.startswith(f"gpu_check: error: {message}")


def test_an_output_path_that_is_a_file_is_refused(tmp_path):
    (tmp_path / "taken").write_text("mine")
    done = run_script(str(tmp_path / "taken"))
    assert done.returncode == 2 and "taken: exists and is not a folder" in done.stderr
    assert (tmp_path / "taken").read_text() == "mine"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the run on a machine without CUDA")
def test_without_cuda_every_gpu_step_is_skipped_with_the_reason(tmp_path):
    out = tmp_path / "out"
    done = run_script(str(out), "--wheels", str(tmp_path / "no_wheels"))
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads((out / "gpu_check.json").read_text())
    steps = {s["name"]: s for s in report["steps"]}
    assert list(steps) == STEP_NAMES and report["failed"] == []
    assert steps["install"]["status"] == "skipped"  # the modules import here already
    assert "import already" in steps["install"]["reason"]
    reason = f"no CUDA device: torch {torch.__version__}"
    for name in STEP_NAMES[1:]:
        assert steps[name]["status"] == "skipped" and steps[name]["reason"].startswith(reason)
        assert f"=== {name}: skipped: {reason}" in done.stdout
    assert report["machine"]["cuda"] is False and report["machine"]["torch"] == torch.__version__
    log = (out / "gpu_check.log").read_text()
    assert f"=== train: skipped: {reason}" in log and "| step | status |" in log
    assert "| cotracker | skipped |" in done.stdout


def hang_script(pid_file: Path) -> str:
    """A step that starts a child, writes both pids, says 'hanging' and sleeps."""
    return (
        "import os, subprocess, sys, time\n"
        "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
        f"open({str(pid_file)!r}, 'w').write(f'{{os.getpid()}} {{child.pid}}')\n"
        "print('hanging', flush=True)\n"
        "time.sleep(60)\n"
    )


def test_a_failing_or_hanging_step_does_not_stop_the_others(tmp_path):
    pid_file = tmp_path / "pids"
    hang = hang_script(pid_file)
    Step = gpu_check.Step
    steps = (
        Step("fails", 20, False, "exits 3", (sys.executable, "-c", "print('bad input'); exit(3)")),
        Step("hangs", 3, False, "sleeps past its budget", (sys.executable, "-c", hang)),
        Step("passes", 20, False, "prints", (sys.executable, "-c", "print('fine')")),
        Step("gpu", 20, True, "needs CUDA", (sys.executable, "-c", "print('ran')")),
    )
    args = gpu_check.parse_args([str(tmp_path / "out"), "--skip", "install"])
    tic = time.monotonic()
    report = gpu_check.run_check(steps, args)
    assert time.monotonic() - tic < 40
    status = {s["name"]: (s["status"], s.get("reason")) for s in report["steps"]}
    assert status["fails"] == ("failed", "exit code 3: bad input")
    assert status["hangs"] == ("timeout", "ran past its 3 s budget and was killed")
    assert status["passes"] == ("passed", None)
    assert report["failed"] == ["fails", "hangs"]
    if torch.cuda.is_available():
        assert status["gpu"] == ("passed", None)
    else:
        assert status["gpu"][0] == "skipped" and status["gpu"][1].startswith("no CUDA device")
    for pid in map(int, pid_file.read_text().split()):  # the step and its child were killed
        assert not alive(pid)
    written = json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    assert [s["status"] for s in written["steps"]] == [s["status"] for s in report["steps"]]
    hung = next(s for s in written["steps"] if s["name"] == "hangs")
    assert hung["output_tail"] == ["hanging"]
    log = (tmp_path / "out" / "gpu_check.log").read_text()
    assert "bad input" in log and "hanging" in log and "fine" in log


def test_sigterm_stops_the_running_step_and_the_report_is_written(tmp_path):
    pid_file, out = tmp_path / "pids", tmp_path / "out"
    driver = tmp_path / "driver.py"
    driver.write_text(
        "import sys\n"
        f"sys.path.insert(0, {str(REPO / 'benchmarks')!r})\n"
        "import gpu_check\n"
        "steps = (\n"
        f"    gpu_check.Step('hangs', 60, False, 'sleeps', (sys.executable, '-c', "
        f"{hang_script(pid_file)!r})),\n"
        "    gpu_check.Step('after', 60, False, 'prints', (sys.executable, '-c', 'print(1)')),\n"
        ")\n"
        f"report = gpu_check.run_check(steps, gpu_check.parse_args([{str(out)!r}]))\n"
        "sys.exit(1 if report['failed'] else 0)\n"
    )
    proc = subprocess.Popen([sys.executable, str(driver)], stdout=subprocess.PIPE, text=True)
    for line in proc.stdout:
        if line.startswith("hanging"):
            break
    proc.send_signal(signal.SIGTERM)
    rest = proc.communicate(timeout=30)[0]
    assert proc.returncode == 1, rest
    report = json.loads((out / "gpu_check.json").read_text())
    hangs, after = report["steps"]
    assert hangs["status"] == "interrupted" and hangs["reason"].startswith("SIGTERM received")
    assert after["status"] == "skipped" and after["reason"] == "the check was stopped (SIGTERM)"
    assert report["failed"] == ["hangs"] and "| hangs | interrupted |" in rest
    for pid in map(int, pid_file.read_text().split()):
        assert not alive(pid)


def test_missing_modules_without_wheels_fail_the_install_step_loudly(tmp_path):
    # python -S: no site-packages, so zarr and the others do not import, as on a GPU machine
    result = tmp_path / "result.json"
    done = subprocess.run(
        [sys.executable, "-S", str(REPO / "benchmarks" / "gpu_check.py"), "--run-step",
         "install", "--result", str(result), "--scratch", str(tmp_path), "--timeout", "60",
         "--wheels", str(tmp_path / "empty")],
        capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONPATH": ""},
    )  # fmt: skip
    assert done.returncode == 1, done.stderr
    written = json.loads(result.read_text())
    assert written["status"] == "failed"
    assert written["reason"].startswith("zarr, numcodecs, av, dask, distributed do not import")
    assert "run benchmarks/fetch_wheels.sh" in written["reason"]


def test_the_tests_step_records_each_test_and_its_skip_reason(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("on a CUDA machine the CUDA tests run for real (benchmarks/gpu_check.sh)")
    result = tmp_path / "result.json"
    done = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), "--run-step", "tests",
         "--result", str(result), "--scratch", str(tmp_path), "--timeout", "120"],
        capture_output=True, text=True, timeout=180, cwd=REPO,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    written = json.loads(result.read_text())
    assert written["status"] == "skipped"
    assert written["reason"].startswith("every test skipped: ")
    assert f"needs a CUDA device; torch {torch.__version__} sees none" in written["reason"]
    tests = {t["test"]: t for t in written["tests"]}
    assert "tests/test_cuda.py::test_out_of_memory_falls_back_to_online_windows" in tests
    assert "tests/test_backbones.py::test_cuda_bf16_path_matches_cpu" in tests
    assert all(t["outcome"] == "skipped" and t["message"] for t in tests.values())


def test_the_table_shows_tests_and_measurements():
    report = {
        "budget_s": 480, "wall_s": 400,
        "machine": {"gpus": ["NVIDIA H100 80GB HBM3"], "torch": "2.11.0"},
        "steps": [
            {"name": "tests", "status": "failed", "seconds": 90.2, "timeout_s": 140,
             "reason": "1 failed", "result": {"tests": [
                 {"test": "tests/test_cuda.py::test_x", "outcome": "failed", "seconds": 1.5,
                  "message": "assert 1 | 2"}]}},
            {"name": "train", "status": "passed", "seconds": 80, "timeout_s": 110, "result": {
                "measurements": [{"name": "training from the stores", "value": 41.25,
                                  "unit": "episodes/s", "peak_gpu_mb": 3072.0,
                                  "detail": "data wait 2.0%"}]}},
        ],
    }  # fmt: skip
    lines = gpu_check.table(report).splitlines()
    assert lines[0] == "GPU check on NVIDIA H100 80GB HBM3 (torch 2.11.0), 400 s of 480"
    assert "| tests | failed | 90 / 140 | 1 failed |" in lines
    assert "| tests/test_cuda.py::test_x | failed | 1.5 | assert 1 / 2 |" in lines
    assert "| training from the stores | 41.25 episodes/s | 3.00 GiB | data wait 2.0% |" in lines
