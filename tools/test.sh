#!/usr/bin/env bash
# Fresh machine -> the test suite, CPU only: about 15-18 minutes on 2 cores once the environment
# exists (about 3 minutes to build). `bash tools/test.sh -m "not slow"` leaves out the tests that
# spawn processes or run a model for long (about 3 minutes); arguments go to pytest.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/tools/env.sh"
bash "$ROOT/tools/slurm_packages.sh"  # the SLURM tests' one-node cluster
cd "$ROOT"
python -m ruff check --quiet .  # lint and import order (pyproject's [tool.ruff]), in a second
exec python -m pytest -q "$@"
