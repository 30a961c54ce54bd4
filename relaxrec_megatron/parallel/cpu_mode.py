"""Run megatron-core on CPU with gloo (tests, CI, debugging a Megatron run on a laptop).

megatron-core assumes CUDA: `torch.cuda.current_device()` used as a device, CUDA RNG state in the
model-parallel RNG tracker, literal `device="cuda"` / `.cuda()` in schedules, optimizer and DDP
buffers, `torch.cuda.synchronize` and streams. `enable()` redirects exactly these to the CPU.
It is inert when CUDA is available: nothing is patched there.
"""

from __future__ import annotations

import contextlib

import torch
from torch.overrides import TorchFunctionMode

_ENABLED = False
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


def enable() -> bool:
    """Patch megatron-core's CUDA assumptions for CPU use. Returns False (and does nothing) with CUDA."""
    global _ENABLED
    if cuda_available():
        return False
    if _ENABLED:
        return True
    torch.cuda.current_device = lambda: _CPU
    torch.cuda.synchronize = lambda *a, **k: None
    torch.cuda.current_stream = lambda *a, **k: contextlib.nullcontext()
    torch.cuda.manual_seed = lambda *a, **k: None
    torch.cuda.manual_seed_all = lambda *a, **k: None
    torch.cuda.get_rng_state = lambda *a, **k: torch.get_rng_state()
    torch.cuda.set_rng_state = lambda state, *a, **k: torch.set_rng_state(state)
    torch.cuda.device_count = lambda: 0

    from megatron.core.tensor_parallel import random as mp_random

    mp_random._get_cuda_rng_state = lambda *a, **k: torch.get_rng_state()
    mp_random._set_cuda_rng_state = lambda state, *a, **k: torch.set_rng_state(state)
    _CudaToCpu().__enter__()  # process-wide: megatron creates CUDA tensors from many places
    _ENABLED = True
    return True


def enabled() -> bool:
    return _ENABLED


def without_deepspeed_shm_comm() -> None:
    """DeepSpeed's CPU accelerator compiles a shared-memory all-reduce on its first initialize: a C++
    build of tens of seconds, again for each environment and install path, whose compiler a stop
    signal to the job step kills. Only DeepSpeed's inference all-reduce uses it; a run here does
    every collective over gloo."""
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
