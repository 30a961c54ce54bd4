# Sourced by the launch and SLURM scripts, with ROOT set to the checkout: puts a Python that has
# relaxrec_megatron first on PATH (the one already there, else the checkout's .venv, which
# tools/env.sh builds), or stops with one line that says how to provide one.
_find='import importlib.util, sys; sys.exit(importlib.util.find_spec("relaxrec_megatron") is None)'
if ! python -c "$_find" 2>/dev/null; then
    if [ -x "$ROOT/.venv/bin/python" ] && "$ROOT/.venv/bin/python" -c "$_find" 2>/dev/null; then
        export PATH="$ROOT/.venv/bin:$PATH"
    else
        echo "relaxrec: no Python environment with relaxrec_megatron: run 'source tools/env.sh' in the checkout (or activate the environment it is installed in) before launching or submitting" >&2
        exit 2
    fi
fi
unset _find
