"""The package as `pip install .` leaves it: a built wheel installed into a folder of its own and run
from another directory, so nothing can come from the source tree."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    root = tmp_path_factory.mktemp("package")
    source = root / "source"  # a clean copy: no build/ left over from an earlier build can reach the wheel
    shutil.copytree(ROOT, source, symlinks=True, ignore=shutil.ignore_patterns(
        ".git", ".venv", ".venv-*", "build", "*.egg-info", "__pycache__", "outputs", "runs", "wandb", ".pytest_cache"))
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", str(source), "--no-deps", "--no-build-isolation",
                            "-w", str(root / "wheels"), "-q"], capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stderr[-3000:]
    (wheel,) = (root / "wheels").glob("relaxrec_megatron-*.whl")
    target = root / "site"
    install = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target),
                              str(wheel)], capture_output=True, text=True, timeout=300)
    assert install.returncode == 0, install.stderr[-3000:]
    elsewhere = root / "elsewhere"
    elsewhere.mkdir()
    return target, elsewhere


def relaxrec(installed, *argv):
    target, cwd = installed
    env = {**os.environ, "PYTHONPATH": str(target)}  # ahead of the editable install of the source tree
    return subprocess.run([sys.executable, "-m", "relaxrec_megatron.cli.main", *argv], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_the_wheel_ships_its_configs_tasks_and_type_marker(installed):
    target, _ = installed
    package = target / "relaxrec_megatron"
    for name in ("py.typed", "configs/tiny-cpu.yaml", "configs/gemma-2b-relaxed-fp8.yaml", "configs/models/gemma-2b.json",
                 "evaluation/tasks/relaxrec_pydoc_lastword.yaml"):
        assert (package / name).is_file(), name


@pytest.mark.slow
def test_installed_commands_find_shipped_configs_from_another_directory(installed):
    target, _ = installed
    out = relaxrec(installed, "params", "gemma-2b", "--rank", "512")
    assert out.returncode == 0, out.stderr
    assert "2.506B" in out.stdout and "2.122B" in out.stdout  # vanilla and relaxed r=512 totals
    where = subprocess.run([sys.executable, "-c", "from relaxrec_megatron.cli import demo; print(demo.CONFIG)"],
                           cwd=installed[1], env={**os.environ, "PYTHONPATH": str(target)}, capture_output=True,
                           text=True, timeout=120)
    assert Path(where.stdout.strip()).is_file() and str(target) in where.stdout  # the demo's default config
    printed = relaxrec(installed, "train", "--config", "tiny-cpu", "--print-config")
    assert printed.returncode == 0 and '"source": "builtin:smollm2-135m"' in printed.stdout, printed.stderr
    bad = relaxrec(installed, "train", "--config", "no-such-run", "--print-config")
    assert bad.returncode == 2 and "nor a shipped config (" in bad.stderr and "gemma-2b-relaxed," in bad.stderr


@pytest.mark.slow
def test_installed_commands_load_relaxed_checkpoints_without_remote_code(installed, chat_model):
    """A fresh process registers the relaxed model itself: no trust_remote_code prompt, no warning."""
    folder, _ = chat_model
    out = relaxrec(installed, "generate", str(folder), "Hello", "--max-new-tokens", "2")
    assert out.returncode == 0, out.stderr
    assert "custom code" not in out.stdout + out.stderr and "to instantiate a model of type" not in out.stderr
