"""What relaxrec sets in its process's environment, in one place, as contexts that put back what was
there when they are left: the libraries' settings for every command (DeepSpeed's accelerator where
there is no CUDA, wandb's console) and the rendezvous of a `relaxrec train` run as a single process.
CPU mode and the process groups are entered and left by parallel.distributed (init_distributed and
shutdown); nothing is set or patched when a module is imported."""

from __future__ import annotations

import os
from contextlib import contextmanager


@contextmanager
def environment(values: dict[str, str], replace: bool = False):
    """`values` in os.environ for the block (only those not set already, unless `replace`); after it,
    the environment as it was."""
    saved = {k: os.environ.get(k) for k in values if replace or k not in os.environ}
    os.environ.update({k: values[k] for k in saved})
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def library_settings() -> dict[str, str]:
    """Read by the libraries when first used, so set before a command imports them."""
    import torch

    from .console import verbose

    out = {} if verbose() else {"WANDB_SILENT": "true"}
    if not torch.cuda.is_available():  # DeepSpeed picks the CPU either way; named, it says nothing
        out["DS_ACCELERATOR"] = "cpu"
    return out


def single_process_launch() -> dict[str, str]:
    """`relaxrec train` without torchrun: rank 0 of 1, on a port of its own."""
    from .parallel.distributed import free_port

    return dict(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
