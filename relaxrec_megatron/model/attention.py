"""Causal core attention for the local (no Transformer Engine) layer spec, by torch's fused
scaled_dot_product_attention: flash or memory-efficient kernels on GPUs, and no s x s score and
probability tensors per unrolled layer kept for backward, as megatron's DotProductAttention keeps.
A drop-in for DotProductAttention in SelfAttention's spec (same arguments, same (s, b, h) output).
"""

from __future__ import annotations

import math

import torch.nn.functional as F
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule


class FusedCausalAttention(MegatronModule):
    def __init__(self, config, layer_number: int, attn_mask_type: AttnMaskType, attention_type: str,
                 attention_dropout: float | None = None, softmax_scale: float | None = None, **_):
        super().__init__(config=config)
        if attn_mask_type != AttnMaskType.causal:
            raise ValueError(f"FusedCausalAttention is causal only, got {attn_mask_type}")
        if config.context_parallel_size != 1 or getattr(config, "window_size", None) is not None:
            raise ValueError("FusedCausalAttention has no context parallelism or sliding window; use the TE spec")
        self.softmax_scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(config.kv_channels)
        self.dropout = config.attention_dropout if attention_dropout is None else attention_dropout

    def forward(self, query, key, value, attention_mask=None, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        """query (s, b, heads, d), key/value (s, b, groups, d) -> (s, b, heads * d). The mask is the
        causal one the model passes; the kernel applies it itself."""
        if attention_bias is not None or packed_seq_params is not None:
            raise ValueError("FusedCausalAttention takes no attention bias or packed sequences")
        s, b = query.shape[:2]
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # (b, heads, s, d)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.softmax_scale,
                                             dropout_p=self.dropout if self.training else 0.0,
                                             enable_gqa=q.shape[1] != k.shape[1])
        return out.permute(2, 0, 1, 3).reshape(s, b, -1)
