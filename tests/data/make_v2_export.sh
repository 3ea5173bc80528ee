#!/usr/bin/env bash
# Made tests/data/v2_tracks.h5 (an HDF5 export of a tracks store of schema version 2) with tats
# at commit 828b202; tests/test_interop.py imports it into a store of the current version.
#
#     git worktree add /tmp/oldmain 828b202
#     bash tests/data/make_v2_export.sh /tmp/oldmain OUT_FOLDER
set -euo pipefail
old=$1 out=$2
python=${PYTHON:-$PWD/.venv/bin/python}
mkdir -p "$out" && cd "$out"
export PYTHONPATH=$old
"$python" -c "from tats.cli import app; app()" synth --out synth --classes 3 \
    --videos-per-class 1 --frames 12 --size 64 --no-progress
"$python" -c "from tats.cli.extract import app; app()" tracks --manifest synth/manifest.csv \
    --out tracks.zarr --tracker lk --grid 4 --subset 8 --shard-size 2 --workers 0 --no-progress
"$python" -c "from tats.cli.extract import app; app()" export tracks.zarr v2_tracks.h5 \
    -m synth/manifest.csv
