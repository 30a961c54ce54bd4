"""Norms with the source models' exact numerics, shared or one per loop.

megatron-core's WrappedTorchNorm has no zero-centred RMSNorm (Gemma's 1 + w) and its RMSNorm does
not cast like HF Llama's; these match the HF reference in any dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .lora_linear import LoopAware


def norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, kind: str, zero_centered: bool,
         eps: float) -> torch.Tensor:
    if kind == "layernorm":
        return F.layer_norm(x, (x.shape[-1],), weight, bias, eps)
    xf = F.rms_norm(x.float(), (x.shape[-1],), eps=eps)  # fp32 statistics, like HF
    if zero_centered:
        return (xf * (1.0 + weight.float())).type_as(x)
    return weight * xf.to(x.dtype)


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
