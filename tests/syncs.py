"""Where the host would wait for the device: the operations that need a device tensor's value or
size on the host (as torch.cuda.set_sync_debug_mode reports on a GPU, and torchtitan's no-sync
checks count), recorded on any device with the code that asked for them.

Counted: aten ops that read a value (`.item()`, `float()`, `bool()` of a tensor) or produce a
data-dependent size (boolean-mask indexing's nonzero, masked_select, unique), and Tensor.tolist /
numpy, which copy to the host.
"""

from __future__ import annotations

import contextlib
import traceback

import torch
from torch.utils._python_dispatch import TorchDispatchMode

SYNC_OPS = {"_local_scalar_dense", "nonzero", "masked_select", "is_nonzero", "equal", "_unique2", "unique_dim",
            "unique_consecutive", "repeat_interleave"}
OWNERS = ("relaxrec_megatron", "deepspeed", "megatron", "torch")


def _site() -> str:
    """The innermost frame outside torch, this file and CPU mode's device rewriting: package/file:line
    function."""
    for frame in reversed(traceback.extract_stack()[:-2]):
        name = frame.filename.replace("\\", "/")
        if "/torch/" in name or name.endswith(("/syncs.py", "/parallel/cpu_mode.py")):
            continue
        for owner in OWNERS:
            if f"/{owner}/" in name:
                return f"{owner}/{name.split(f'/{owner}/', 1)[1]}:{frame.lineno} {frame.name}"
        return f"{name}:{frame.lineno} {frame.name}"
    return "torch"


class _Mode(TorchDispatchMode):
    def __init__(self, sites: list[str]):
        super().__init__()
        self.sites = sites

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket.__name__ in SYNC_OPS:
            self.sites.append(_site() + " " + func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def recording_syncs():
    """Yields the list the sync sites of the block are appended to."""
    sites: list[str] = []
    patched, inside = {}, []
    for name in ("tolist", "numpy"):
        real = getattr(torch.Tensor, name)

        def wrapper(self, *a, _real=real, _name=name, **k):
            if inside:  # a torch function mode (CPU mode's) calls the method again from inside
                return _real(self, *a, **k)
            sites.append(_site() + " " + _name)
            inside.append(True)
            try:
                return _real(self, *a, **k)
            finally:
                inside.pop()

        patched[name] = real
        setattr(torch.Tensor, name, wrapper)
    try:
        with _Mode(sites):
            yield sites
    finally:
        for name, real in patched.items():
            setattr(torch.Tensor, name, real)
