"""The source models' norm numerics, shared by the Megatron model and the serving engine (torch only).

megatron-core's WrappedTorchNorm has no zero-centred RMSNorm (Gemma's 1 + w) and its RMSNorm does
not cast like HF Llama's; this matches the HF reference in any dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, kind: str, zero_centered: bool,
         eps: float) -> torch.Tensor:
    """weight/bias are (h,), or (tokens, h) when every token has its own (a loop's) norm."""
    h = x.shape[-1]
    if kind == "layernorm":
        if weight.dim() == 1:
            return F.layer_norm(x, (h,), weight, bias, eps)
        return F.layer_norm(x, (h,), None, None, eps) * weight + bias
    xf = F.rms_norm(x.float(), (h,), eps=eps)  # fp32 statistics, like HF
    if zero_centered:  # Gemma scales in fp32, then casts
        return (xf * (1.0 + weight.float())).type_as(x)
    return weight * xf.to(x.dtype)  # Llama casts, then scales
