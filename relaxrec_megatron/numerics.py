"""The source models' norm and rotary numerics, in torch alone: one definition for the Megatron model
and the serving engine. hf/modeling_relaxrec.py keeps its own copy, because a checkpoint's remote code
must load without this package; tests/test_numerics.py pins the two equal.

megatron-core's WrappedTorchNorm has no zero-centred RMSNorm (Gemma's 1 + w) and its RMSNorm does
not cast like HF Llama's; `norm` matches the HF reference in any dtype.
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


def rope_inv_freq(config) -> tuple[torch.Tensor, float]:
    """(inv_freq (rotary dims / 2,), attention scaling) of an HF config's rope_parameters: the default
    rope (with GPT-NeoX's partial rotary factor) here, the scaled kinds from transformers' table."""
    rp = config.rope_parameters
    rope_type = rp.get("rope_type", "default")
    if rope_type == "default":
        dim = int(config.head_dim * rp.get("partial_rotary_factor", 1.0))
        return 1.0 / (rp["rope_theta"] ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim)), 1.0
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    if rope_type in ROPE_INIT_FUNCTIONS and not rope_type.startswith("dynamic"):
        return ROPE_INIT_FUNCTIONS[rope_type](config)
    raise ValueError(f"unsupported rope_type {rope_type!r}")


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotates the first cos.shape[-1] dims of each head's last axis (partial rotary for GPT-NeoX);
    cos and sin broadcast against x[..., :d]."""
    d = cos.shape[-1]
    rot, rest = x[..., :d], x[..., d:]
    x1, x2 = rot.chunk(2, dim=-1)
    return torch.cat((rot * cos + torch.cat((-x2, x1), dim=-1) * sin, rest), dim=-1)
