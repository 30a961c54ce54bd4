"""Run a function on N local processes (gloo on 127.0.0.1 without CUDA): free port, timeout, the
first failing rank's traceback surfaced, nothing left running. Used by the demo and the tests;
clusters use torchrun.

The ranks start from a fork server that has imported torch, megatron-core, DeepSpeed and the
function's module once (seconds per process otherwise, every world again); each rank gets the
caller's environment, working folder and sys.path as a spawned process would."""

from __future__ import annotations

import os
import signal
import traceback

import torch.multiprocessing as mp

from .distributed import free_port

PRELOAD = ["relaxrec_megatron.parallel.world_preload", "torch.distributed", "megatron.core", "deepspeed", "transformers",
           "relaxrec_megatron.training.run", "relaxrec_megatron.training.trainer"]


def _entry(rank, world, port, fn, args, errors, env):
    os.setsid()  # a process group of its own: run_world ends the rank's helpers with it
    os.environ.clear()
    os.environ.update(env)  # the fork server's is that of the first call
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), OMP_NUM_THREADS="1")
    import torch

    torch.set_num_threads(1)
    try:
        fn(*args)
    except BaseException:
        errors.put((rank, traceback.format_exc()))
        raise
    finally:
        from .distributed import shutdown

        shutdown()


def _context(fn):
    if "forkserver" not in mp.get_all_start_methods():
        return mp.get_context("spawn")
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload([*PRELOAD, fn.__module__])  # takes effect when the server starts: the first call
    return ctx


def run_world(fn, world: int, *args, timeout: float = 300.0) -> None:
    ctx = _context(fn)
    errors = ctx.SimpleQueue()
    port = free_port()
    env = dict(os.environ)
    procs = [ctx.Process(target=_entry, args=(r, world, port, fn, args, errors, env)) for r in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout)
    alive = [p for p in procs if p.is_alive()]
    for p in procs:  # the rank if still running, and any helper process it left behind
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    for p in alive:
        p.join(10)
    if not errors.empty():
        rank, tb = errors.get()
        raise RuntimeError(f"rank {rank} failed:\n{tb}")
    if alive:
        raise TimeoutError(f"{len(alive)} of {world} processes still running after {timeout}s")
    bad = [p.exitcode for p in procs if p.exitcode != 0]
    if bad:
        raise RuntimeError(f"processes exited with codes {bad}")
