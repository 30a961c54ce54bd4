"""One shared layer over a flat batch of tokens whose rows may be at different loops.

Every token carries (slot, loop, position). The engine orders tokens by loop, so the tokens of one
loop form a contiguous segment: each projection runs its shared weights once over all tokens and, per
segment, that loop's LoRA (one A GEMM for all modules of the projection, then B added in place into
each module's output rows); a step with several loops and few tokens takes project's masked form.
Either way each loop present reads its own LoRA factors once; no Python loop over rows. Per-loop norms
and biases are gathered by loop. Attention reads the token's KV cache row (slot, loop, layer), so loop
2 never sees loop 1's keys.

KV fill of early exits: a token that exits at loop e is never run at loops e+1..B-1, yet later tokens
of its request attend to it there. The engine keeps the exit hidden state and, in the first step that
runs loop b for any row, appends one "K/V-only" token per pending (token, loop b) after the `rows`
tokens that run the whole layer: each layer writes the K/V projections of its input norm of the exit
hidden state, with loop b's LoRA. The request's next token at loop b reads them in the same layer
call, after the write. Cost per exited token: at most (B - 1 - e) extra tokens through each layer's
k and v GEMMs, LoRA included (2 h 2 kv FLOPs a token, 6% of a layer's FLOPs in SmolLM2; no query),
and no extra pass over the weights: a fill rides a step that reads loop b's factors anyway. Fills at a
loop the request never runs again are never computed.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch
import torch.nn.functional as F

from .. import numerics
from .kv_cache import KVCache
from .weights import EngineWeights, LayerW, NormW, Projection


@dataclass
class TokenBatch:
    """The step's tokens on the device, and their loops and positions on the host as well, so the
    block's bookkeeping (loop segments, the KV span) never waits for the device."""

    slot: torch.Tensor  # (T,)
    loop: torch.Tensor  # (T,)
    pos: torch.Tensor  # (T,)
    cos: torch.Tensor  # (T, rot)
    sin: torch.Tensor
    num_loops: int
    rows: int  # the first `rows` tokens run the layer; the rest only write K/V (see the module docstring)
    loops: tuple[int, ...]  # host copies of loop and pos
    positions: tuple[int, ...]

    @classmethod
    def build(cls, slot: list[int], loop: list[int], pos: list[int], inv_freq: torch.Tensor, num_loops: int,
              rows: int | None = None, attention_scaling: float = 1.0) -> "TokenBatch":
        """From host lists: one upload for the step."""
        ids = torch.tensor([slot, loop, pos], device=inv_freq.device)
        freqs = ids[2][:, None].float() * inv_freq[None, :].float()
        emb = torch.cat((freqs, freqs), dim=-1)
        rows = len(slot) if rows is None else rows
        return cls(ids[0], ids[1], ids[2], emb.cos() * attention_scaling, emb.sin() * attention_scaling, num_loops,
                   rows, tuple(loop), tuple(pos))

    @cached_property
    def segments(self) -> list[tuple[int, int, int]]:
        """(loop, start, end) for each run of consecutive tokens at one loop."""
        loops, out, start = self.loops, [], 0
        for i in range(1, len(loops) + 1):
            if i == len(loops) or loops[i] != loops[start]:
                out.append((loops[start], start, i))
                start = i
        return out

    def loop_mask(self, p: Projection, dtype: torch.dtype) -> torch.Tensor:
        """(T, C): 1 where p's LoRA column c belongs to the token's loop (project's masked form), made
        once per step for each layout of ranks (the layers share them)."""
        key = (p.ranks, dtype)
        if key not in self._masks:
            self._masks[key] = (self.loop[:, None] == p.column_loop[None, :]).to(dtype)
        return self._masks[key]

    @cached_property
    def _masks(self) -> dict:
        return {}

    @cached_property
    def rows_only(self) -> "TokenBatch":
        """The tokens that run the whole layer."""
        if self.rows == self.slot.numel():
            return self
        n = self.rows
        return TokenBatch(self.slot[:n], self.loop[:n], self.pos[:n], self.cos[:n], self.sin[:n], self.num_loops, n,
                          self.loops[:n], self.positions[:n])


MASKED_MAX_TOKENS = 48


def project(x: torch.Tensor, p: Projection, tb: TokenBatch, rows_only: tuple[str, ...] = ()) -> list[torch.Tensor]:
    """The outputs of every module of a projection, each token with its own loop's LoRA. Modules named in
    `rows_only` run over tb's rows alone (a K/V-only token needs no query).

    Segment form: per segment of tokens at loop b, one GEMM gives A_b x for all modules, and each
    module's B_b is added in place into the segment's rows. Masked form, for steps with several loops
    present and at most MASKED_MAX_TOKENS tokens: one GEMM gives every loop's activations for every
    token, those of other loops are zeroed, and one GEMM per module adds sum_b B_b (A_b x masked). It
    does B times the LoRA FLOPs in a third of the calls (13 vs 33 a layer at 3 loops), which wins where
    calls cost more than FLOPs: at decode batch sizes, not at large ones (docs/benchmarks.md, Serving
    kernels, has the crossover on SmolLM2)."""
    ys = []
    for m, w in p.modules.items():
        n = tb.rows if m in rows_only else x.shape[0]
        y = F.linear(x if n == x.shape[0] else x[:n], w.weight, w.bias)
        ys.append(y if w.loop_bias is None else y + w.loop_bias[tb.loop[:n]])
    R = p.rank
    if R == 0:
        return ys
    if len(tb.segments) > 1 and x.shape[0] <= MASKED_MAX_TOKENS:
        z = F.linear(x, p.lora_A_by_module).mul_(tb.loop_mask(p, x.dtype))
        offset = 0
        for y, Bt, r in zip(ys, p.lora_Bt, p.ranks):
            if r:
                y.addmm_(z[:y.shape[0], offset:offset + p.loops * r], Bt)
                offset += p.loops * r
        return ys
    for b, start, end in tb.segments:
        whole = end - start == x.shape[0]
        z = F.linear(x if whole else x[start:end], p.lora_A[b * R:(b + 1) * R])
        offset = 0
        for y, Bt, r in zip(ys, p.lora_Bt, p.ranks):
            stop = min(end, y.shape[0])
            if r and stop > start:
                whole_y = start == 0 and stop == y.shape[0]
                (y if whole_y else y[start:stop]).addmm_(z[:stop - start, offset:offset + r], Bt[b * r:(b + 1) * r])
            offset += r
    return ys


def norm(x: torch.Tensor, nw: NormW, cfg, loop: torch.Tensor | None) -> torch.Tensor:
    """The source's norm; per-loop weights are gathered for each token's loop."""
    w = nw.weight[loop] if nw.per_loop else nw.weight
    b = None if nw.bias is None else (nw.bias[loop] if nw.per_loop else nw.bias)
    return numerics.norm(x, w, b, cfg.norm_type, cfg.norm_zero_centered, cfg.norm_eps)


def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (T, heads, hd); rotates the first cos.shape[-1] dims (partial rotary for GPT-NeoX)."""
    return numerics.rotate(x, cos[:, None, :].to(x.dtype), sin[:, None, :].to(x.dtype))


def attention(x: torch.Tensor, lw: LayerW, cfg, tb: TokenBatch, cache: KVCache, layer: int) -> torch.Tensor:
    """x: the input-normed hidden states of all of tb's tokens; returns the attention output of its rows."""
    T, rows = x.shape[0], tb.rows_only
    q, k, v = project(x, lw.projections["qkv"], tb, rows_only=("q",))
    k = rotary(k.view(T, cfg.num_key_value_heads, cfg.head_dim), tb.cos, tb.sin)
    cache.write(layer, tb, k, v.view(T, cfg.num_key_value_heads, cfg.head_dim))
    n = tb.rows
    q = rotary(q.view(n, cfg.num_attention_heads, cfg.head_dim), rows.cos, rows.sin)
    keys, values, valid = cache.read(layer, rows)  # (n, S, kv, hd), (n, S)
    out = F.scaled_dot_product_attention(q[:, :, None, :], keys.transpose(1, 2), values.transpose(1, 2),
                                         attn_mask=valid[:, None, None, :], scale=cfg.head_dim ** -0.5,
                                         enable_gqa=cfg.num_attention_heads != cfg.num_key_value_heads)
    (o,) = project(out.reshape(n, -1), lw.projections["o"], rows)
    return o


def feed_forward(x: torch.Tensor, lw: LayerW, tb: TokenBatch, act) -> torch.Tensor:
    parts = project(x, lw.projections["gate_up"], tb)
    inner = act(parts[0]) * parts[1] if len(parts) == 2 else act(parts[0])  # [gate, up] or [up]
    (down,) = project(inner, lw.projections["down"], tb)
    return down


def layer_forward(x: torch.Tensor, w: EngineWeights, k: int, tb: TokenBatch, cache: KVCache, act,
                  kv_only: torch.Tensor | None = None) -> torch.Tensor:
    """x: (tb.rows, h) hidden states of the rows; kv_only: (T - tb.rows, h) exit hidden states of the
    K/V-only tokens, which stay fixed from layer to layer."""
    cfg, lw, rows = w.config, w.layers[k], tb.rows_only
    attn_in = norm(x, lw.input_norm, cfg, rows.loop)
    if kv_only is not None:
        attn_in = torch.cat([attn_in, norm(kv_only, lw.input_norm, cfg, tb.loop[tb.rows:])])
    attn = attention(attn_in, lw, cfg, tb, cache, k)
    if cfg.parallel_residual:
        return x + attn + feed_forward(norm(x, lw.post_norm, cfg, rows.loop), lw, rows, act)
    h = x + attn
    return h + feed_forward(norm(h, lw.post_norm, cfg, rows.loop), lw, rows, act)
