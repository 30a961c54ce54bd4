"""Run megatron-core on CPU with gloo (tests, CI, debugging a Megatron run on a laptop).

megatron-core assumes CUDA: `torch.cuda.current_device()` used as a device, CUDA RNG state in the
model-parallel RNG tracker, literal `device="cuda"` / `.cuda()` in schedules, optimizer and DDP
buffers, `torch.cuda.synchronize` and streams. `enable()` redirects exactly these to the CPU and
`disable()` puts them back (parallel.distributed enters it with the process group and leaves it
with `shutdown`). It is inert when CUDA is available: nothing is patched there, and nothing is
patched at import.
"""

from __future__ import annotations

import contextlib

import torch
from torch.overrides import TorchFunctionMode

_CPU = torch.device("cpu")


def _to_cpu(device):
    if isinstance(device, torch.device) and device.type == "cuda":
        return _CPU
    if isinstance(device, str) and device.startswith("cuda"):
        return _CPU
    if isinstance(device, int):
        return _CPU
    return device


class _CudaToCpu(TorchFunctionMode):
    """Rewrites device='cuda' arguments of tensor factories and .to()/.cuda() calls to the CPU."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if "device" in kwargs:
            kwargs["device"] = _to_cpu(kwargs["device"])
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.to and len(args) > 1 and isinstance(args[1], (str, torch.device, int)) \
                and not isinstance(args[1], bool):
            args = (args[0], _to_cpu(args[1]), *args[2:])
        return func(*args, **kwargs)


def cuda_available() -> bool:
    return torch.cuda.is_available()


_PATCHED: dict | None = None  # while CPU mode is on: what it replaced, and its device mode


def enable() -> bool:
    """Patch megatron-core's CUDA assumptions for CPU use, until disable(). Returns False (and does
    nothing) with CUDA."""
    global _PATCHED
    if cuda_available():
        return False
    if _PATCHED is not None:
        return True
    from megatron.core.tensor_parallel import random as mp_random

    cuda = {"current_device": lambda: _CPU, "synchronize": lambda *a, **k: None,
            "current_stream": lambda *a, **k: contextlib.nullcontext(), "manual_seed": lambda *a, **k: None,
            "manual_seed_all": lambda *a, **k: None, "get_rng_state": lambda *a, **k: torch.get_rng_state(),
            "set_rng_state": lambda state, *a, **k: torch.set_rng_state(state), "device_count": lambda: 0}
    rng = {"_get_cuda_rng_state": lambda *a, **k: torch.get_rng_state(),
           "_set_cuda_rng_state": lambda state, *a, **k: torch.set_rng_state(state)}
    saved = []
    for owner, replacements in ((torch.cuda, cuda), (mp_random, rng)):
        for name, replacement in replacements.items():
            saved.append((owner, name, getattr(owner, name)))
            setattr(owner, name, replacement)
    mode = _CudaToCpu()
    mode.__enter__()  # process-wide: megatron creates CUDA tensors from many places
    _PATCHED = {"saved": saved, "mode": mode}
    return True


def disable() -> None:
    """Leaves CPU mode: puts back what enable() replaced and leaves its device mode."""
    global _PATCHED
    if _PATCHED is None:
        return
    _PATCHED["mode"].__exit__(None, None, None)
    for owner, name, original in _PATCHED["saved"]:
        setattr(owner, name, original)
    _PATCHED = None


def enabled() -> bool:
    return _PATCHED is not None


def without_deepspeed_shm_comm() -> None:
    """DeepSpeed's CPU accelerator compiles a shared-memory all-reduce on its first initialize: a C++
    build of tens of seconds, again for each environment and install path, whose compiler a stop
    signal to the job step kills. Only DeepSpeed's inference all-reduce uses it; a run here does
    every collective over gloo."""
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
