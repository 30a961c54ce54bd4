"""What DeepSpeed's data-parallel collectives move: the tensors it hands to its communication backend,
counted while a counter is on, and the bytes a rank sends for them with ring algorithms.

Every collective of DeepSpeed's engine and optimizers goes through deepspeed.comm's TorchBackend; the
counter wraps its methods while it is entered and puts them back when it is left. The trainer's own
agree all-reduce calls torch.distributed directly and is not counted. tools/bench_dp.py and the tests
compare it with training.memory.dp_traffic, which `relaxrec plan` prints.
"""

from __future__ import annotations

import torch.distributed as dist

# TorchBackend's parameters (deepspeed/comm/torch.py: its methods are wrapped as (*args, **kwargs)),
# and the one that holds the whole buffer
PARAMS = {"all_reduce": ("tensor", "op", "group", "async_op"),
          "reduce_scatter_tensor": ("output_tensor", "input_tensor", "op", "group", "async_op"),
          "all_gather_into_tensor": ("output_tensor", "input_tensor", "group", "async_op"),
          "broadcast": ("tensor", "src", "group", "async_op"),
          "reduce": ("tensor", "dst", "op", "group", "async_op")}
WHOLE = {"reduce_scatter_tensor": "input_tensor", "all_gather_into_tensor": "output_tensor"}
SCALARS = 16  # elements: norms and flags (gradient norm, overflow), kept apart from the gradients and weights
UNCOUNTED = ("all_gather", "reduce_scatter", "all_reduce_coalesced", "all_gather_coalesced", "all_to_all_single")


def wire_bytes(op: str, size: int, world: int) -> float:
    """Bytes one rank sends for a collective over a buffer of `size` bytes with a ring: all-reduce
    2(n-1)/n of it, reduce-scatter and all-gather (n-1)/n, broadcast and reduce all of it."""
    if world < 2:
        return 0.0
    return size * {"all_reduce": 2 * (world - 1) / world, "reduce_scatter_tensor": (world - 1) / world,
                   "all_gather_into_tensor": (world - 1) / world}.get(op, 1.0)


class CollectiveCounter:
    """with CollectiveCounter() as c: ... c.start() ... c.stop() -> {op: {"calls", "bytes", "wire"}} of
    the collectives over more than one rank issued in between; those of at most SCALARS elements under
    "op (scalars)"."""

    def __init__(self):
        self.ops: dict | None = None
        self._saved = {}

    def __enter__(self):
        from deepspeed.comm.torch import TorchBackend

        for name in (*PARAMS, *UNCOUNTED):
            self._saved[name] = getattr(TorchBackend, name)
            setattr(TorchBackend, name, self._wrap(name, self._saved[name]))
        return self

    def __exit__(self, *exc):
        from deepspeed.comm.torch import TorchBackend

        for name, method in self._saved.items():
            setattr(TorchBackend, name, method)
        self._saved.clear()

    def start(self) -> None:
        self.ops = {}

    def stop(self) -> dict:
        ops, self.ops = self.ops, None
        return ops or {}

    def _wrap(self, name, method):
        counter = self

        def counted(backend, *args, **kwargs):
            if counter.ops is not None:
                if name in UNCOUNTED:
                    raise NotImplementedError(f"training.comms does not count DeepSpeed's {name}")
                bound = {**dict(zip(PARAMS[name], args)), **kwargs}
                world = dist.get_world_size(bound.get("group"))
                t = bound[WHOLE.get(name, "tensor")]
                if world > 1:
                    size = t.numel() * t.element_size()
                    key = f"{name} (scalars)" if t.numel() <= SCALARS else name
                    op = counter.ops.setdefault(key, {"calls": 0, "bytes": 0, "wire": 0.0})
                    op["calls"] += 1
                    op["bytes"] += size
                    op["wire"] += wire_bytes(name, size, world)
            return method(backend, *args, **kwargs)
        return counted
