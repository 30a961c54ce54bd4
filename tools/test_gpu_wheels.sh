#!/usr/bin/env bash
# The GPU checks as an offline GPU machine runs them, on this CPU: an environment with only torch
# 2.11, transformers, safetensors and NumPy (.venv-gpu, built once), the wheels of tools/gpu_wheels.sh
# installed with `pip install --no-index --no-deps --target`, and tools/gpu_check.py --tiny and
# tools/gpu_serve_check.py --tiny run from the checkout to their last line. Needs the network once
# (the environment and the wheels); about 5 minutes on 2 cores. Not part of tools/test.sh.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/tools/env.sh"  # the project's environment builds the wheels
set -euo pipefail  # env.sh, sourced, leaves them off
GPU_VENV="${RELAXREC_GPU_VENV:-$ROOT/.venv-gpu}"
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
if [ ! -f "$GPU_VENV/.done" ]; then
    rm -rf "$GPU_VENV"
    "$(find_python)" -m venv "$GPU_VENV"
    PIP_CONSTRAINT="" "$GPU_VENV/bin/python" -m pip install -q torch==2.11.0 transformers safetensors numpy \
        2> >(grep -v "^WARNING: Location" >&2)
    touch "$GPU_VENV/.done"
fi
bash "$ROOT/tools/gpu_wheels.sh" "$WORK/wheels" | grep "^gpu_wheels"
"$GPU_VENV/bin/python" -m pip install -q --no-index --no-deps --target "$WORK/site" "$WORK"/wheels/required/*.whl \
    2> >(grep -v "^WARNING: Location" >&2)
cd "$ROOT"
# the GPU machine's environment, not this one: no venv on PATH, the wheels' folder the only addition
export PATH="$GPU_VENV/bin:/usr/local/bin:/usr/bin:/bin" PYTHONPATH="$WORK/site" TMPDIR="$WORK"
# torch's compile caches, fresh as on a new machine: DeepSpeed's CPU op built for another torch of the
# same CUDA tag (~/.cache/torch_extensions/py312_cu130) would not load here
export TORCH_EXTENSIONS_DIR="$WORK/cache/extensions" TORCHINDUCTOR_CACHE_DIR="$WORK/cache/inductor"
unset VIRTUAL_ENV
python tools/gpu_check.py --tiny --steps 3
python tools/gpu_serve_check.py --tiny
left="$(find "$WORK" -mindepth 1 -maxdepth 1 ! -name wheels ! -name site ! -name cache)"
[ -z "$left" ] || { echo "test_gpu_wheels: the checks left files behind: $left" >&2; exit 1; }
echo "test_gpu_wheels: both checks ran to the end from the wheels alone"
