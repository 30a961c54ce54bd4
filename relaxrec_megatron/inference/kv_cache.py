"""Preallocated KV cache indexed by (slot, loop, shared layer, position): every unrolled layer
(loop, layer) has its own entries, so a later loop never overwrites an earlier one."""

from __future__ import annotations

import torch


class KVCache:
    def __init__(self, slots: int, loops: int, layers: int, max_len: int, kv_heads: int, head_dim: int,
                 dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
        shape = (slots, loops, layers, max_len, kv_heads, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.max_len = max_len
        self.free = list(range(slots))[::-1]

    def allocate(self) -> int:
        return self.free.pop()

    def release(self, slot: int) -> None:
        self.free.append(slot)  # stale entries are never read: reads stop at the token's position

    def write(self, layer: int, tb, k: torch.Tensor, v: torch.Tensor) -> None:
        self.k[tb.slot, tb.loop, layer, tb.pos] = k
        self.v[tb.slot, tb.loop, layer, tb.pos] = v

    def read(self, layer: int, tb) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Keys/values of each token's (slot, loop, layer) row up to the batch's furthest position,
        and which of them the token may attend to (positions <= its own)."""
        span = max(tb.positions) + 1  # host bookkeeping: no wait for the device
        keys = self.k[tb.slot, tb.loop, layer, :span]
        values = self.v[tb.slot, tb.loop, layer, :span]
        valid = torch.arange(span, device=tb.pos.device)[None, :] <= tb.pos[:, None]
        return keys, values, valid
