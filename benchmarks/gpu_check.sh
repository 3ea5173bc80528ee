#!/usr/bin/env bash
# The GPU check: every CUDA path and the GPU benchmarks in one run of at most 8 minutes
# (benchmarks/gpu_check.py says what each step does).
#
#     benchmarks/gpu_check.sh OUT_DIR [--wheels DIR] [--only STEP ...] [--skip STEP ...]
#     benchmarks/gpu_check.sh --dry-run          # list the steps; run nothing
#
# Its first step installs the wheels that benchmarks/fetch_wheels.sh fetched (carried to a GPU
# machine without network in benchmarks/wheels) into a temporary target, wherever zarr,
# numcodecs, av, dask or distributed do not import; the project runs from this working
# tree (PYTHONPATH). Python: $PYTHON, else .venv/bin/python where it exists (a development
# machine), else python3 (the GPU machines' Python with PyTorch).
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ -z ${PYTHON:-} ]]; then
    if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
export PYTHONUNBUFFERED=1
exec "$PYTHON" benchmarks/gpu_check.py "$@"
