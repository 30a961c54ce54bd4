"""Process groups for TP/PP/DP (gloo on CPU, NCCL on GPUs)."""

from __future__ import annotations

import contextlib
import os
import socket
from datetime import timedelta

import torch
import torch.distributed as dist

from . import cpu_mode

DEFAULT_TIMEOUT_S = 600


def init_distributed(tp: int = 1, pp: int = 1, seed: int = 1234, timeout_s: int = DEFAULT_TIMEOUT_S) -> None:
    """torch.distributed from the torchrun env (RANK, WORLD_SIZE, MASTER_ADDR/PORT), then megatron's groups."""
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    on_cpu = cpu_mode.enable()
    if not dist.is_initialized():
        if not on_cpu:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group("gloo" if on_cpu else "nccl", timeout=timedelta(seconds=timeout_s))
    world = dist.get_world_size()
    if world % (tp * pp):
        from ..errors import UserError

        raise UserError(f"world size {world} is not a multiple of TP*PP = {tp}*{pp}")
    ps.destroy_model_parallel()
    ps.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
    model_parallel_cuda_manual_seed(seed)


@contextlib.contextmanager
def collective_timeout(seconds: float):
    """The default process group's collectives may wait `seconds` inside the block (a phase where the
    other ranks wait on rank 0 inside a library's own barrier); the group's timeout after it."""
    group = dist.distributed_c10d._get_default_group()
    try:
        before = group._get_backend(local_device()).options._timeout
    except (AttributeError, RuntimeError):
        before = timedelta(seconds=DEFAULT_TIMEOUT_S)
    _set_timeout(timedelta(seconds=seconds), group)
    try:
        yield
    finally:
        _set_timeout(before, group)


def set_collective_timeout(seconds: float) -> None:
    """From now on, every process group of this rank (the default one, megatron's, DeepSpeed's) gives
    up a collective after `seconds`."""
    for group in list(dist.distributed_c10d._world.pg_map):
        _set_timeout(timedelta(seconds=seconds), group)


def _set_timeout(timeout: timedelta, group) -> None:
    (getattr(dist, "set_timeout", None) or dist.distributed_c10d._set_pg_timeout)(timeout, group)  # torch < 2.11


def local_device() -> torch.device:
    """This rank's device: its CUDA device (where NCCL's collectives read their tensors), else the CPU (gloo)."""
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def long_wait_group(timeout_s: float):
    """A gloo group over the world with its own timeout, for a phase where ranks wait on one rank's
    work longer than the default group's collective timeout allows (NCCL's is 10 minutes)."""
    return dist.new_group(backend="gloo", timeout=timedelta(seconds=timeout_s))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def shutdown() -> None:
    """Leaves what init_distributed entered: megatron's groups, the groups made here, the process
    group and CPU mode."""
    from megatron.core import parallel_state as ps

    ps.destroy_model_parallel()
    _SUBGROUPS.clear()
    if dist.is_initialized():
        dist.destroy_process_group()
    cpu_mode.disable()


_SUBGROUPS: dict[tuple[int, ...], object] = {}


def subgroup(ranks: tuple[int, ...]):
    """The process group of these ranks, made once per world (every rank must ask for the same groups
    in the same order, members or not, as torch.distributed.new_group requires)."""
    if ranks not in _SUBGROUPS:
        _SUBGROUPS[ranks] = dist.new_group(list(ranks))
    return _SUBGROUPS[ranks]


@contextlib.contextmanager
def single_process_group():
    """dist_checkpointing needs a process group; make a 1-rank gloo one if there is none."""
    if dist.is_initialized():
        yield
        return

    entered = not cpu_mode.enabled() and cpu_mode.enable()
    # a port of its own, not MASTER_PORT: the environment may belong to a launcher's store
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()
        if entered:
            cpu_mode.disable()
