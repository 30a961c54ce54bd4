#!/usr/bin/env bash
# Fresh machine -> the test suite (CPU only, about 1-2 minutes once the environment exists).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/tools/env.sh"
cd "$ROOT"
exec python -m pytest -q "$@"
