#!/usr/bin/env bash
# Fresh machine -> the test suite (CPU only: about 17 minutes on 2 cores once the environment exists,
# which takes about 3 minutes to build).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/tools/env.sh"
cd "$ROOT"
exec python -m pytest -q "$@"
