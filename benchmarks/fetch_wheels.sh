#!/usr/bin/env bash
# Wheels of what tats needs and the GPU machines lack, to carry there (they have no network).
#
#     benchmarks/fetch_wheels.sh [PACKAGE ...]    # into $WHEELS, default benchmarks/wheels
#
# Downloads, for the GPU machines' CPython 3.12 on manylinux x86-64, zarr, numcodecs, PyAV,
# dask and distributed (and any PACKAGE named) at the versions installed in .venv (those
# `make test` passes with; the newest where .venv lacks one), with whatever they need, then
# deletes the wheels of projects the GPU machines' image already has (ON_GPU_IMAGE: the package
# list in the device README's KINDS.md, read 2026-11-17). benchmarks/gpu_check.sh installs the
# rest there. decord, tats' fallback decoder for files PyAV cannot open, is left out unless
# named: nothing in the GPU check uses it, and its 13 MiB would leave the working tree under
# 0.5 MiB of room. Fails, naming the sizes, when the wheels, or the wheels with the rest of the
# working tree that the device tool sends along (tracked and untracked files that git does not
# ignore), reach 64 MiB, the tool's limit for everything it sends.
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=${WHEELS:-benchmarks/wheels}
PYTHON=${PYTHON:-.venv/bin/python}
[[ -x $PYTHON ]] || PYTHON=python3
LIMIT=$((64 * 1024 * 1024))
NEEDED=(zarr numcodecs av dask distributed "$@")
ON_GPU_IMAGE="
    absl_py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated_doc anyio attrs
    botorch build certifi charset_normalizer chex click cloudpickle cmake colorama contourpy
    coverage cuda_bindings cuda_core cuda_pathfinder cuda_toolkit cupy_cuda13x cycler cython
    diffrax e3nn einops equinox etils execnet filelock flatbuffers flax fonttools formulaic
    frozenlist fsspec gpytorch grpcio h11 h5py hf_xet httpcore httpx huggingface_hub humanize
    hypothesis idna imageio iniconfig interface_meta jax jax_cuda13_pjrt jax_cuda13_plugin
    jaxlib jaxtyping jinja2 joblib kiwisolver lazy_loader lightning lightning_utilities
    linear_operator lineax llvmlite lxml markdown markdown_it_py markupsafe matplotlib mdurl
    meson ml_dtypes mpi4py mpmath msgpack multidict multipledispatch mypy_extensions nanobind
    narwhals networkx ninja numba numba_cuda numpy numpyro nvidia_cublas nvidia_cuda_cupti
    nvidia_cuda_nvrtc nvidia_cuda_runtime nvidia_cudnn_cu13 nvidia_cufft nvidia_cufile
    nvidia_curand nvidia_cusolver nvidia_cusparse nvidia_cusparselt_cu13 nvidia_ml_py
    nvidia_nccl_cu13 nvidia_nvjitlink nvidia_nvshmem_cu13 nvidia_nvtx onnx onnx_ir onnxruntime
    onnxscript opencv_python_headless optax opt_einsum opt_einsum_fx optimistix orbax_checkpoint
    packaging pandas pathspec patsy peft pillow pip pluggy portalocker prometheus_client
    propcache protobuf psutil pyarrow pybind11 py_cpuinfo pygments pyparsing pyproject_hooks
    pyre_extensions pytest pytest_benchmark pytest_cov pytest_mock pytest_timeout pytest_xdist
    python_dateutil pytorch_lightning pyyaml regex requests rich sacrebleu safetensors
    scikit_build_core scikit_image scikit_learn scipy seaborn sentencepiece
    sentence_transformers setuptools shellingham simplejson six sortedcontainers statsmodels
    sympy tabulate tensorboard tensorboard_data_server tensorstore threadpoolctl tifffile
    tiktoken timm tokenizers toolz torch torchaudio torchdiffeq torch_geometric torchmetrics
    torchvision tqdm transformers treescope triton typer typing_extensions typing_inspect
    urllib3 uvloop wadler_lindig werkzeug wheel wrapt xarray xxhash yarl zipp
"

mib() { awk -v b="$1" 'BEGIN { printf "%.1f MiB", b / 1048576 }'; }

requirements=()
for name in "${NEEDED[@]}"; do
    version=$("$PYTHON" -c 'import importlib.metadata as m, sys; print(m.version(sys.argv[1]))' \
        "$name" 2>/dev/null || true)
    requirements+=("$name${version:+==$version}")
done
echo "fetching ${requirements[*]} and what they need, for CPython 3.12, manylinux x86-64"

platforms=(manylinux1_x86_64 manylinux2010_x86_64 manylinux2014_x86_64)
for n in 5 12 17 24 27 28; do platforms+=("manylinux_2_${n}_x86_64"); done
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
"$PYTHON" -m pip download --quiet --disable-pip-version-check --only-binary=:all: \
    --python-version 3.12 --implementation cp ${platforms[@]/#/--platform } \
    --dest "$tmp" "${requirements[@]}"

mkdir -p "$DEST"
rm -f "$DEST"/*.whl
for wheel in "$tmp"/*.whl; do
    file=$(basename "$wheel")
    project=$(echo "${file%%-*}" | tr 'A-Z.-' 'a-z__')
    if [[ " ${ON_GPU_IMAGE//$'\n'/ } " == *" $project "* ]]; then
        echo "  on the GPU image already: $file"
    else
        mv "$wheel" "$DEST/"
    fi
done

size=$(find "$DEST" -maxdepth 1 -name '*.whl' -printf '%s\n' | awk '{ s += $1 } END { print s + 0 }')
# (a tracked file deleted from the working tree does not travel: stat skips it)
inside=$(realpath --relative-to=. "$DEST")/
tree=$(git ls-files -z --cached --others --exclude-standard | { grep -zv "^$inside" || true; } \
    | { xargs -0 stat -c %s 2>/dev/null || true; } | awk '{ s += $1 } END { print s + 0 }')
for wheel in "$DEST"/*.whl; do
    printf '  %-80s %6.2f MiB\n' "$(basename "$wheel")" \
        "$(stat -c %s "$wheel" | awk '{ print $1 / 1048576 }')"
done
echo "$DEST: $(ls "$DEST"/*.whl | wc -l) wheels, $(mib "$size"); with the working tree" \
    "($(mib "$tree")): $(mib $((size + tree))) of the device tool's 64 MiB"
if ((size >= LIMIT)); then
    echo "error: $DEST holds $(mib "$size") of wheels, over the 64 MiB the device tool carries" >&2
    exit 1
fi
if ((size + tree >= LIMIT)); then
    echo "error: $DEST ($(mib "$size")) and the working tree ($(mib "$tree")) reach" \
        "$(mib $((size + tree))), over the 64 MiB the device tool sends" >&2
    exit 1
fi
