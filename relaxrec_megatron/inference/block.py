"""One shared layer over a flat batch of tokens whose rows may be at different loops.

Every token carries (slot, loop, position). Linears apply the shared weight to all tokens at once
and each token's own loop's LoRA grouped by loop (one matmul pair per loop present, never a loop
over rows); per-loop norms and biases are gathered by loop. Attention reads the token's KV cache
row (slot, loop, layer), so loop 2 never sees loop 1's keys.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..model import numerics
from .kv_cache import KVCache
from .weights import EngineWeights, LayerW, LinearW, NormW


@dataclass
class TokenBatch:
    slot: torch.Tensor  # (T,)
    loop: torch.Tensor  # (T,)
    pos: torch.Tensor  # (T,)
    cos: torch.Tensor  # (T, rot)
    sin: torch.Tensor
    groups: list[tuple[int, torch.Tensor]]  # (loop, token indices) for each loop present

    @classmethod
    def build(cls, slot, loop, pos, inv_freq: torch.Tensor, attention_scaling: float = 1.0) -> "TokenBatch":
        freqs = pos[:, None].float() * inv_freq[None, :].float()
        emb = torch.cat((freqs, freqs), dim=-1)
        loops = torch.unique(loop).tolist()
        groups = [(b, torch.nonzero(loop == b).flatten()) for b in loops]
        return cls(slot, loop, pos, emb.cos() * attention_scaling, emb.sin() * attention_scaling, groups)


def linear(x: torch.Tensor, w: LinearW, tb: TokenBatch) -> torch.Tensor:
    shared_bias = w.bias if w.bias is not None and w.bias.dim() == 1 else None
    y = F.linear(x, w.weight, shared_bias)
    if w.bias is not None and w.bias.dim() == 2:
        y = y + w.bias[tb.loop]
    if w.lora_A is not None:
        if len(tb.groups) == 1:
            b = tb.groups[0][0]
            y = y + F.linear(F.linear(x, w.lora_A[b]), w.lora_B[b])
        else:
            for b, idx in tb.groups:
                y = y.index_add(0, idx, F.linear(F.linear(x.index_select(0, idx), w.lora_A[b]), w.lora_B[b]))
    return y


def norm(x: torch.Tensor, nw: NormW, cfg, loop: torch.Tensor | None) -> torch.Tensor:
    """The source's norm; per-loop weights are gathered for each token's loop."""
    w = nw.weight[loop] if nw.per_loop else nw.weight
    b = None if nw.bias is None else (nw.bias[loop] if nw.per_loop else nw.bias)
    return numerics.norm(x, w, b, cfg.norm_type, cfg.norm_zero_centered, cfg.norm_eps)


def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (T, heads, hd); rotates the first cos.shape[-1] dims (partial rotary for GPT-NeoX)."""
    d = cos.shape[-1]
    cos, sin = cos[:, None, :].to(x.dtype), sin[:, None, :].to(x.dtype)
    rot, rest = x[..., :d], x[..., d:]
    x1, x2 = rot.chunk(2, dim=-1)
    return torch.cat((rot * cos + torch.cat((-x2, x1), dim=-1) * sin, rest), dim=-1)


def kv_projections(x_normed: torch.Tensor, lw: LayerW, cfg, tb: TokenBatch) -> tuple[torch.Tensor, torch.Tensor]:
    T = x_normed.shape[0]
    k = linear(x_normed, lw.linears["k"], tb).view(T, cfg.num_key_value_heads, cfg.head_dim)
    v = linear(x_normed, lw.linears["v"], tb).view(T, cfg.num_key_value_heads, cfg.head_dim)
    return rotary(k, tb.cos, tb.sin), v


def attention(x: torch.Tensor, lw: LayerW, cfg, tb: TokenBatch, cache: KVCache, layer: int) -> torch.Tensor:
    T = x.shape[0]
    q = rotary(linear(x, lw.linears["q"], tb).view(T, cfg.num_attention_heads, cfg.head_dim), tb.cos, tb.sin)
    k, v = kv_projections(x, lw, cfg, tb)
    cache.write(layer, tb, k, v)
    keys, values, valid = cache.read(layer, tb)  # (T, S, kv, hd), (T, S)
    out = F.scaled_dot_product_attention(q[:, :, None, :], keys.transpose(1, 2), values.transpose(1, 2),
                                         attn_mask=valid[:, None, None, :], scale=cfg.head_dim ** -0.5,
                                         enable_gqa=cfg.num_attention_heads != cfg.num_key_value_heads)
    return linear(out.reshape(T, -1), lw.linears["o"], tb)


def feed_forward(x: torch.Tensor, lw: LayerW, cfg, tb: TokenBatch, act) -> torch.Tensor:
    up = linear(x, lw.linears["up"], tb)
    inner = act(linear(x, lw.linears["gate"], tb)) * up if "gate" in lw.linears else act(up)
    return linear(inner, lw.linears["down"], tb)


def layer_forward(x: torch.Tensor, w: EngineWeights, k: int, tb: TokenBatch, cache: KVCache, act) -> torch.Tensor:
    cfg, lw = w.config, w.layers[k]
    attn = attention(norm(x, lw.input_norm, cfg, tb.loop), lw, cfg, tb, cache, k)
    if cfg.parallel_residual:
        return x + attn + feed_forward(norm(x, lw.post_norm, cfg, tb.loop), lw, cfg, tb, act)
    h = x + attn
    return h + feed_forward(norm(h, lw.post_norm, cfg, tb.loop), lw, cfg, tb, act)


def fill_skipped_kv(hidden: torch.Tensor, w: EngineWeights, tb: TokenBatch, cache: KVCache) -> None:
    """KV entries of loops a token skipped by exiting early, from its exit hidden state.

    Later tokens still attend to this position at deeper loops. Each skipped (loop, layer) gets the
    K/V projections (with that loop's LoRA) of the input norm of the exit hidden state, in one batched
    computation per layer. Cost per exited token: (B - 1 - exit_loop) * K * (norm + K and V
    projections), i.e. 2 * h * 2 * kv_heads * head_dim FLOPs each, about 5-10% of the layers skipped.
    """
    for k in range(w.num_shared):
        lw = w.layers[k]
        kk, vv = kv_projections(norm(hidden, lw.input_norm, w.config, tb.loop), lw, w.config, tb)
        cache.write(k, tb, kk, vv)


def logits(hidden: torch.Tensor, w: EngineWeights) -> torch.Tensor:
    return F.linear(norm(hidden, w.final_norm, w.config, None), w.lm_head)
