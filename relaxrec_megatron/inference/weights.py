"""The relaxed recursive HF model's weights, arranged for serving: per shared layer, every loop's
LoRA factors stacked on a leading loop axis so one batch can hold rows at different loops."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..hf.modeling_relaxrec import Norm, RelaxedRecursiveForCausalLM

MODULES = ("q", "k", "v", "o", "gate", "up", "down")


@dataclass
class LinearW:
    weight: torch.Tensor  # (d_out, d_in)
    bias: torch.Tensor | None  # (d_out,) shared, or (B, d_out) one per loop
    lora_A: torch.Tensor | None = None  # (B, r, d_in)
    lora_B: torch.Tensor | None = None  # (B, d_out, r)


@dataclass
class NormW:
    weight: torch.Tensor  # (h,) shared or (B, h) per loop
    bias: torch.Tensor | None
    per_loop: bool


@dataclass
class LayerW:
    linears: dict[str, LinearW]
    input_norm: NormW
    post_norm: NormW


@dataclass
class EngineWeights:
    config: object
    embed: torch.Tensor
    lm_head: torch.Tensor
    final_norm: NormW
    layers: list[LayerW] = field(default_factory=list)
    inv_freq: torch.Tensor | None = None
    num_loops: int = 1
    num_shared: int = 1


def _unrolled(config, k: int, b: int) -> int:
    return next(l for l, (kk, bb) in enumerate(config.layer_plan) if kk == k and bb == b)


def _norm(shared: Norm | None, slots: list, attr: str) -> NormW:
    if shared is not None:
        return NormW(shared.weight.detach(), None if shared.bias is None else shared.bias.detach(), False)
    norms = [getattr(s, attr) for s in slots]
    bias = None if norms[0].bias is None else torch.stack([n.bias.detach() for n in norms])
    return NormW(torch.stack([n.weight.detach() for n in norms]), bias, True)


@torch.no_grad()
def engine_weights(model: RelaxedRecursiveForCausalLM) -> EngineWeights:
    cfg, inner = model.config, model.model
    out = EngineWeights(config=cfg, embed=inner.embed_tokens.weight.detach(), lm_head=model.lm_head.weight.detach(),
                        final_norm=_norm(inner.norm, [], "norm"), inv_freq=inner.rotary.inv_freq.detach(),
                        num_loops=cfg.num_loops, num_shared=cfg.num_shared_layers)
    for k, layer in enumerate(inner.layers):
        slots = [inner.relax[_unrolled(cfg, k, b)] for b in range(cfg.num_loops)]
        linears = {}
        for group in (layer.attn, layer.mlp):
            for m, lin in group.items():
                if lin.bias is not None:
                    bias = lin.bias.detach()
                elif m in slots[0].bias:
                    bias = torch.stack([s.bias[m].detach() for s in slots])
                else:
                    bias = None
                A = B = None
                if m in slots[0].lora:
                    A = torch.stack([s.lora[m].lora_A.detach() for s in slots])
                    B = torch.stack([s.lora[m].lora_B.detach() for s in slots])
                linears[m] = LinearW(lin.weight.detach(), bias, A, B)
        shared_in = layer.input_norm if cfg.share_norms else None
        shared_post = layer.post_norm if cfg.share_norms else None
        out.layers.append(LayerW(linears, _norm(shared_in, slots, "input_norm"), _norm(shared_post, slots, "post_norm")))
    return out


@torch.no_grad()
def unrolled_weights(w: EngineWeights) -> EngineWeights:
    """The same model as a vanilla L-layer stack (W' + B_l A_l per layer, one loop): the
    hf-unrolled export, served by the same engine."""
    layers = []
    for l, (k, b) in enumerate(w.config.layer_plan):
        lw = w.layers[k]
        linears = {}
        for m, lin in lw.linears.items():
            weight = lin.weight if lin.lora_A is None else lin.weight + lin.lora_B[b] @ lin.lora_A[b]
            bias = lin.bias if lin.bias is None or lin.bias.dim() == 1 else lin.bias[b]
            linears[m] = LinearW(weight, bias)
        pick = lambda n: NormW(n.weight[b], None if n.bias is None else n.bias[b], False) if n.per_loop else n
        layers.append(LayerW(linears, pick(lw.input_norm), pick(lw.post_norm)))
    return EngineWeights(config=w.config, embed=w.embed, lm_head=w.lm_head, final_norm=w.final_norm, layers=layers,
                         inv_freq=w.inv_freq, num_loops=1, num_shared=len(layers))
