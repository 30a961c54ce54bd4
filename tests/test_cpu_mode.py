"""CPU mode (parallel.cpu_mode) is entered with the process group and left with it: after
parallel.distributed.shutdown nothing of it is patched, no device mode is left on torch's stack, and
the groups made for the run are gone; importing the package patches nothing."""

import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
from torch.overrides import _get_current_function_mode_stack

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="CPU mode is inert where CUDA is")

PATCHED = ("current_device", "synchronize", "current_stream", "manual_seed", "manual_seed_all", "get_rng_state",
           "set_rng_state", "device_count")


def originals() -> dict:
    from megatron.core.tensor_parallel import random as mp_random

    return {**{n: getattr(torch.cuda, n) for n in PATCHED},
            **{n: getattr(mp_random, n) for n in ("_get_cuda_rng_state", "_set_cuda_rng_state")}}


def test_cpu_mode_is_left_with_the_process_group(monkeypatch):
    from relaxrec_megatron.parallel import cpu_mode, distributed

    before, modes = originals(), len(_get_current_function_mode_stack())
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(distributed.free_port()))
    for var, value in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0")):
        monkeypatch.setenv(var, value)
    distributed.init_distributed(1, 1)
    try:
        assert cpu_mode.enabled() and torch.cuda.current_device() == torch.device("cpu")
        assert torch.zeros(1, device="cuda").device.type == "cpu"  # megatron's literal device="cuda"
        distributed.subgroup((0,))
        assert originals() != before
    finally:
        distributed.shutdown()
    assert not cpu_mode.enabled() and not dist.is_initialized() and not distributed._SUBGROUPS
    assert originals() == before and len(_get_current_function_mode_stack()) == modes
    with pytest.raises((RuntimeError, AssertionError)):  # torch's own answer again: no CUDA here
        torch.zeros(1, device="cuda")


def test_importing_the_package_patches_nothing():
    code = f"""
import torch
from megatron.core.tensor_parallel import random as mp_random
from torch.overrides import _get_current_function_mode_stack
names = {PATCHED!r}
before = [getattr(torch.cuda, n) for n in names] + [mp_random._get_cuda_rng_state, mp_random._set_cuda_rng_state]
import relaxrec_megatron.cli.main, relaxrec_megatron.parallel.cpu_mode, relaxrec_megatron.training.trainer
import relaxrec_megatron.training.run, relaxrec_megatron.model.build
after = [getattr(torch.cuda, n) for n in names] + [mp_random._get_cuda_rng_state, mp_random._set_cuda_rng_state]
assert before == after and not _get_current_function_mode_stack()
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]


def test_commands_leave_the_environment_as_they_found_it(monkeypatch, tmp_path):
    """runtime: the libraries' settings and a single-process run's rendezvous are set for the command
    and taken back after it."""
    import os

    from relaxrec_megatron.cli import train as train_cli
    from relaxrec_megatron.cli.main import build_parser, main

    for var in ("RELAXREC_VERBOSE", "DS_ACCELERATOR", "WANDB_SILENT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)
    before, seen = dict(os.environ), {}
    monkeypatch.setattr("relaxrec_megatron.training.run.train", lambda cfg, hooks=None: seen.update(os.environ))
    assert train_cli.run(build_parser().parse_args(["train", "--config", "tiny-cpu", f"run.output_dir={tmp_path}"])) == 0
    assert seen["RANK"] == "0" and seen["WORLD_SIZE"] == "1" and int(seen["MASTER_PORT"]) > 0
    assert dict(os.environ) == before
    monkeypatch.setattr(train_cli, "run", lambda args: seen.update(command=dict(os.environ)))
    assert main(["train", "--config", "tiny-cpu", "--print-config"]) == 0
    assert seen["command"]["DS_ACCELERATOR"] == "cpu" and seen["command"]["WANDB_SILENT"] == "true"
    assert "RELAXREC_VERBOSE" not in seen["command"]
    assert dict(os.environ) == before
    from relaxrec_megatron.cli import evaluate

    monkeypatch.setattr(evaluate, "run_tasks", lambda args: seen.update(command=dict(os.environ)))
    assert main(["eval", "tasks", "some/model", "--verbose"]) == 0  # a command's --verbose: the libraries' own output
    assert seen["command"]["RELAXREC_VERBOSE"] == "1" and "WANDB_SILENT" not in seen["command"]
    assert dict(os.environ) == before
