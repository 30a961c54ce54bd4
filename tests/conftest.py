import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from tiny import save_tiny  # noqa: E402


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory):
    """One saved tiny source checkpoint per architecture, shared by the session."""
    root = tmp_path_factory.mktemp("tiny")
    return {arch: save_tiny(arch, root / arch) for arch in ("llama", "gemma", "gpt_neox")}


@pytest.fixture(scope="session")
def relaxed(tiny_dirs, tmp_path_factory):
    """The relaxed tiny models of the Megatron parity tests (parity.CASES, and the exit cases' teacher)."""
    from parity import CASES, TEACHER

    from relaxrec_megatron.hf.convert import convert_to_relaxed

    root = tmp_path_factory.mktemp("relaxed")
    for name, arch, spec in [*CASES, TEACHER]:
        convert_to_relaxed(str(tiny_dirs[arch]), root / name, spec, progress=False)
    return root


@pytest.fixture(scope="session")
def parity_runs(relaxed, tmp_path_factory):
    """One spawned world per layout runs every case (logits and gradients to files) and, in the
    exit layouts, every early-exit objective."""
    from megatron_jobs import parity_job
    from parity import CASES, EXIT_LAYOUTS, LAYOUTS, TOKENS, exit_jobs

    from relaxrec_megatron.parallel.local_world import run_world

    root = tmp_path_factory.mktemp("runs")
    cases = [(name, str(relaxed / name)) for name, _, _ in CASES]
    for name, layout in LAYOUTS.items():
        (root / name).mkdir()
        exits = exit_jobs(relaxed) if name in EXIT_LAYOUTS else []
        run_world(parity_job, layout["tp"] * layout["pp"], cases, TOKENS, layout, str(root / name), exits,
                  timeout=600)
    return root
