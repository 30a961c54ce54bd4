"""Norms with the source models' exact numerics (relaxrec_megatron/numerics.py), shared or one per loop."""

from __future__ import annotations

import torch
from torch import nn

from ..numerics import norm
from .lora_linear import LoopAware


class LoopedNorm(nn.Module, LoopAware):
    """One norm (shared) or one per loop. Built by megatron as norm(config=, hidden_size=, eps=)."""

    def __init__(self, config, hidden_size: int, eps: float = 1e-5, *, kind: str, zero_centered: bool,
                 loops: tuple[int, ...], shared: bool):
        super().__init__()
        self.kind, self.zero_centered, self.eps, self.shared = kind, zero_centered, eps, shared
        init = 0.0 if zero_centered else 1.0
        names = ["shared"] if shared else [str(b) for b in loops]
        self.weight = nn.ParameterDict({n: nn.Parameter(torch.full((hidden_size,), init, dtype=config.params_dtype))
                                        for n in names})
        self.bias = nn.ParameterDict({n: nn.Parameter(torch.zeros(hidden_size, dtype=config.params_dtype))
                                      for n in names}) if kind == "layernorm" else None
        for p in self.parameters():  # under sequence parallelism each rank sees a slice of the tokens
            p.sequence_parallel = config.sequence_parallel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        key = "shared" if self.shared else str(self.active_loop)
        return norm(x, self.weight[key], self.bias[key] if self.bias is not None else None, self.kind,
                    self.zero_centered, self.eps)
