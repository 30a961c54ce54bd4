#!/usr/bin/env bash
# The wheels an offline GPU machine needs for tools/gpu_check.py and tools/gpu_serve_check.py when it
# has only torch, transformers, safetensors and NumPy: run here, with network, in the project's
# environment (the wheels are for this Python and platform), carry DIR over, and there:
#
#   pip install --no-index --no-deps --target "$HOME/relaxrec-site" DIR/required/*.whl [DIR/optional/*.whl]
#   PYTHONPATH="$HOME/relaxrec-site" python tools/gpu_check.py          # from the checkout
#
# DIR/required: megatron-core's binary wheel, DeepSpeed built as a wheel with no prebuilt ops (they
# compile on first use, where they are used at all), the import-time dependencies of both and of
# relaxrec's training path, and relaxrec itself. DIR/optional: lm-eval and wandb (without their own
# dependencies). Transformer Engine is not among them: it builds against the machine's torch and CUDA
# (pip install --no-build-isolation 'relaxrec-megatron[te]' there). Prints each wheel's size and the
# total, and fails when all of them together exceed 64 MB.
#
#   bash tools/gpu_wheels.sh DIR
set -euo pipefail
OUT="${1:?usage: tools/gpu_wheels.sh DIR}"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
LIMIT_MB=64
PY="${PYTHON:-python}"
"$PY" -c 'import torch, setuptools' 2>/dev/null || { echo "gpu_wheels: run it in the project's environment (source tools/env.sh): building DeepSpeed's wheel imports torch" >&2; exit 2; }
rm -rf "$OUT" && mkdir -p "$OUT/required" "$OUT/optional"
pins() {  # pyproject's range of each named dependency, so that the wheels match what pip would install
    "$PY" - "$ROOT/pyproject.toml" "$@" <<'PY'
import sys, tomllib
from packaging.requirements import Requirement
deps = {Requirement(d).name: d for d in tomllib.load(open(sys.argv[1], "rb"))["project"]["dependencies"]}
print("\n".join(deps[name] for name in sys.argv[2:]))
PY
}
pip_q() { "$PY" -m pip "$@" -q 2> >(grep -v "^WARNING: Location" >&2); }
mapfile -t mcore < <(pins megatron-core)
mapfile -t deepspeed < <(pins deepspeed)
mapfile -t optional < <(pins lm-eval wandb)
# imported when megatron-core, DeepSpeed and relaxrec's trainer load (torch and transformers bring the
# rest), at the versions this environment runs: pydantic and pydantic-core, say, only work as a pair
IMPORTED=(einops hjson msgpack ninja py-cpuinfo pydantic pydantic-core annotated-types typing-inspection psutil)
mapfile -t IMPORTED < <("$PY" -c 'import sys; from importlib.metadata import version
print("\n".join(f"{n}=={version(n)}" for n in sys.argv[1:]))' "${IMPORTED[@]}")
pip_q download --no-deps --only-binary=:all: -d "$OUT/required" "${mcore[@]}" "${IMPORTED[@]}"
DS_BUILD_OPS=0 pip_q wheel --no-deps --no-build-isolation --no-binary deepspeed -w "$OUT/required" "${deepspeed[@]}"
pip_q wheel --no-deps --no-build-isolation -w "$OUT/required" "$ROOT"
pip_q download --no-deps --only-binary=:all: -d "$OUT/optional" "${optional[@]}"
"$PY" - "$OUT" "$LIMIT_MB" <<'PY'
import sys
from pathlib import Path
out, limit = Path(sys.argv[1]), float(sys.argv[2])
total = 0.0
for kind in ("required", "optional"):
    wheels = sorted((out / kind).glob("*.whl"))
    size = sum(w.stat().st_size for w in wheels) / 1e6
    total += size
    for w in wheels:
        print(f"  {kind:<8} {w.stat().st_size / 1e6:6.2f} MB  {w.name}")
    print(f"gpu_wheels: {kind} {len(wheels)} wheels, {size:.1f} MB")
print(f"gpu_wheels: {total:.1f} MB in all (limit {limit:.0f} MB) in {out}")
sys.exit(0 if total <= limit else f"gpu_wheels: {total:.1f} MB is over the {limit:.0f} MB limit")
PY
