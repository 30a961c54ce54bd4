#!/usr/bin/env bash
# The oldest supported stack, pinned as NVIDIA's PyTorch container 25.12 pins it
# (tools/constraints/ngc-25.12.txt: torch 2.10, NumPy 1.26, transformers 5.13), in its own
# environment .venv-oldest: every test that spawns no processes, a 2-process torchrun training run
# stopped with SIGUSR1 and resumed, and a 2-process run's checkpoint exported to HF. About 2 minutes
# once the environment exists (about 3 minutes to build). tools/test.sh runs it after the main suite;
# arguments go to pytest.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export RELAXREC_VENV="$ROOT/.venv-oldest" RELAXREC_CONSTRAINTS="$ROOT/tools/constraints/ngc-25.12.txt"
source "$ROOT/tools/env.sh"
set -euo pipefail  # env.sh, sourced, leaves them off
cd "$ROOT"
# installing the package kept the pinned torch, NumPy and transformers
python - "$RELAXREC_CONSTRAINTS" <<'PY'
import sys
from importlib.metadata import version

pins = dict(line.split("#")[0].strip().split("==") for line in open(sys.argv[1]) if "==" in line.split("#")[0])
got = {name: version(name) for name in pins}
if got != pins:
    sys.exit(f"test_oldest: the environment has {got}, not the pinned {pins}")
print("[oldest] " + ", ".join(f"{name} {v}" for name, v in got.items()))
PY
exec python -m pytest -q -m "not slow or oldest" "$@"
