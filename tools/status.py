"""The status box of README.md and the site's front page: what has been measured where, read
from the benchmark results (`benchmarks/results/**/*.json`) and the README's reproduction table.

    python tools/status.py            # exit 1, naming the file, where a box is out of date
    python tools/status.py --write    # rewrite both boxes (make status-box)

A result file counts as a GPU measurement where it names a CUDA device that measured: a
`device` of "cuda...", a non-empty `gpu` or `gpus`, or (the GPU check's gpu_check.json) a step
that passed on a machine with CUDA. It counts as a real-dataset measurement where a `dataset`,
`source`, `manifest` or `data` value names one of the papers' datasets. A figure in the
reproduction table's "ours" column counts as a real-dataset run too. The box changes only when
these facts change, not with every new result file.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
START = "<!-- status box: made by `python tools/status.py --write` from benchmarks/results/ -->"
END = "<!-- end of status box -->"
# Where each box is, and how its links to the docs pages start.
TARGETS = {"README.md": "docs/", "docs/index.md": ""}
DATASETS = re.compile(r"ssv2|something-something|kinetics|k100|k400|hmdb|ucf|finegym", re.I)
DATA_KEYS = {"dataset", "source", "manifest", "data"}
CORE_KEYS = {"cpus", "threads", "torch_threads"}


@dataclass(frozen=True)
class Status:
    """What the results hold: the GPUs and the real datasets measured on (file names beside),
    and the CPU core counts of the other files."""

    gpus: dict[str, list[str]]  # GPU name (or "CUDA") -> result files
    datasets: dict[str, list[str]]  # dataset (as named) -> result files or "README.md"
    cores: set[int]


def _walk(data, key: str = ""):
    """(key, value) of every leaf of a JSON document, with its innermost key."""
    if isinstance(data, dict):
        for k, v in data.items():
            yield from _walk(v, k)
    elif isinstance(data, list):
        for v in data:
            yield from _walk(v, key)
    else:
        yield key, data


def gpus_of(path: Path, data) -> list[str]:
    """The CUDA devices a result file measured on (empty: none)."""
    if path.name == "gpu_check.json":
        machine = data.get("machine") or {}
        passed = any(step.get("status") == "passed" for step in data.get("steps", []))
        return (machine.get("gpus") or ["CUDA"]) if machine.get("cuda") and passed else []
    found = []
    for key, value in _walk(data):
        if key == "device" and isinstance(value, str) and value.startswith("cuda"):
            found.append("CUDA")
        elif key in ("gpu", "gpus") and value:
            found.append(str(value))
    return found


def datasets_of(data) -> list[str]:
    """The papers' datasets a result file names as its data."""
    return sorted(
        {m.group(0).lower() for key, value in _walk(data) if key in DATA_KEYS and
         isinstance(value, str) for m in [DATASETS.search(value)] if m}
    )  # fmt: skip


def cores_of(data) -> set[int]:
    cores = {v for k, v in _walk(data) if k in CORE_KEYS and isinstance(v, int) and v > 0}
    for key, value in _walk(data):
        if key == "machine" and isinstance(value, str):
            cores |= {int(n) for n in re.findall(r"(\d+) threads", value)}
    return cores


def our_figures(readme: str) -> list[str]:
    """The cells of the README's reproduction table's "ours" column that hold a figure."""
    figures, column = [], None
    for line in readme.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if not line.startswith("|"):
            column = None
        elif column is None and "ours" in cells:
            column = cells.index("ours")
        elif column is not None and len(cells) > column and re.match(r"\d", cells[column]):
            figures.append(cells[column])
    return figures


def read_status(results: Path = RESULTS, readme: Path = ROOT / "README.md") -> Status:
    gpus: dict[str, list[str]] = {}
    datasets: dict[str, list[str]] = {}
    cores: set[int] = set()
    for path in sorted(results.rglob("*.json")):
        data = json.loads(path.read_text())
        name = str(path.relative_to(results))
        found = gpus_of(path, data)
        for gpu in found:
            gpus.setdefault(gpu, []).append(name)
        for dataset in datasets_of(data):
            datasets.setdefault(dataset, []).append(name)
        if not found:
            cores |= cores_of(data)
    if our_figures(readme.read_text()):
        datasets.setdefault("the reproduction table", []).append("README.md")
    return Status(gpus, datasets, cores)


def _listed(found: dict[str, list[str]]) -> str:
    return "; ".join(f"{name} ({', '.join(sorted(set(files)))})" for name, files in found.items())


def box_rows(status: Status, docs: str) -> list[str]:
    """The box: a table of what has been measured where; `docs` starts links to docs pages."""
    cores = sorted(status.cores)
    where = (
        f"{cores[0]} CPU cores" if len(cores) == 1
        else f"{cores[0]} to {cores[-1]} CPU cores" if cores else "a CPU"
    )  # fmt: skip
    which = "The other benchmarks" if status.gpus else "Every benchmark so far"
    data = "" if status.datasets else " on synthetic clips"
    gpu = (
        f"Measured: {_listed(status.gpus)}."
        if status.gpus
        else f"No run yet. The [GPU check]({docs}gpu-check.md) runs the CUDA paths and the GPU "
        "benchmarks in one go."
    )
    real = (
        f"Measured: {_listed(status.datasets)}."
        if status.datasets
        else "No run yet. Every accuracy so far is on synthetic clips (`tats synth`); the "
        "reproduction table's figures are the papers'."
    )
    return [
        "| where | what has been measured |",
        "|---|---|",
        f"| CPU | {which}: speed, memory and accuracy{data}, on {where}. |",
        f"| GPU | {gpu} |",
        f"| real datasets | {real} |",
    ]


def render(target: str, status: Status) -> str:
    """The box as it stands in `target` (README.md: a table; the site: inside a note)."""
    rows = box_rows(status, TARGETS[target])
    if target == "README.md":
        body = rows
    else:
        body = ['!!! note "Status: what has been measured, and where"', ""]
        body += [f"    {row}" for row in rows]
    return "\n".join([START, *body, END])


def current(text: str) -> str | None:
    """The box in a file's text (None: no box)."""
    start, end = text.find(START), text.find(END)
    return text[start : end + len(END)] if start >= 0 and end > start else None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--write", action="store_true", help="Rewrite the boxes.")
    args = parser.parse_args()
    status, stale = read_status(), []
    for target in TARGETS:
        path = ROOT / target
        text, box = path.read_text(), render(target, status)
        found = current(text)
        if found is None:
            print(f"{target}: no status box (the lines {START!r} ... {END!r})", file=sys.stderr)
            return 1
        if found != box:
            if args.write:
                path.write_text(text.replace(found, box))
                print(f"{target}: status box rewritten")
            else:
                stale.append(target)
    for target in stale:
        print(f"{target}: status box out of date: python tools/status.py --write", file=sys.stderr)
    return 1 if stale else 0


if __name__ == "__main__":
    sys.exit(main())
