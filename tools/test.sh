#!/usr/bin/env bash
# Fresh machine -> the tests at both ends of the supported stack, CPU only: the whole suite on the
# newest (.venv: torch 2.15), about 15-17 minutes on 2 cores, then tools/test_oldest.sh on the oldest
# (.venv-oldest: torch 2.10 as NVIDIA's PyTorch 25.12 container pins it), about 2 minutes; each
# environment takes about 3 minutes to build once. With arguments, only the main suite runs and the
# arguments go to pytest: `bash tools/test.sh -m "not slow"` leaves out the tests that spawn
# processes or run a model for long (about 1 minute).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/tools/env.sh"
set -euo pipefail  # env.sh, sourced, leaves them off
bash "$ROOT/tools/slurm_packages.sh"  # the SLURM tests' one-node cluster
cd "$ROOT"
python -m ruff check --quiet .  # lint and import order (pyproject's [tool.ruff]), in a second
[ $# -eq 0 ] || exec python -m pytest -q "$@"
python -m pytest -q
exec bash "$ROOT/tools/test_oldest.sh"
