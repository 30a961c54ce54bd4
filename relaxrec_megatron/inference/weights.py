"""The relaxed recursive HF model's weights, arranged for serving.

Linears that read the same input form one `Projection` (q,k,v; gate,up; o; down). Their shared weights
stay separate (on CPU, x @ W^T per module beat one fused GEMM at decode batch sizes). The LoRA A
factors of all modules are stacked loop by loop into one matrix, so one GEMM over a loop's slice gives
that loop's rank-r activations of every module (see block.project), and the B factors of a module are
stacked by loop; a batch whose rows sit at different loops slices each loop's factors from them. A
second copy of the A factors, module by module, serves project's masked form (one GEMM for all loops).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch

from ..hf.modeling_relaxrec import Norm, RelaxedRecursiveForCausalLM

PROJECTIONS = {"qkv": ("q", "k", "v"), "o": ("o",), "gate_up": ("gate", "up"), "down": ("down",)}


@dataclass
class ModuleW:
    """One linear as the HF model has it: shared weight, bias (shared or per loop), per-loop LoRA."""
    weight: torch.Tensor  # (d_out, d_in)
    bias: torch.Tensor | None = None  # (d_out,)
    loop_bias: torch.Tensor | None = None  # (loops, d_out)
    lora_A: torch.Tensor | None = None  # (loops, r, d_in)
    lora_B: torch.Tensor | None = None  # (loops, d_out, r)


@dataclass
class Projection:
    modules: dict[str, ModuleW]  # shared weights and biases; their LoRA lives only in the stacks below
    ranks: tuple[int, ...]  # LoRA rank of each module (0: none)
    loops: int
    lora_A: torch.Tensor | None  # (loops * sum(ranks), d_in): for each loop b, [A_m,b for m with a LoRA]
    lora_Bt: tuple[torch.Tensor | None, ...]  # per module (loops * r_m, d_out): B_m,b^T in rows [b r_m, (b+1) r_m)
    # The same A factors module by module, each module's loops together (rows [A_m,0; A_m,1; ...]), so
    # that one GEMM over them gives every loop's activations in the column order of lora_Bt, and the
    # loop of each of those rows (block.project's masked form).
    lora_A_by_module: torch.Tensor | None = None  # (loops * sum(ranks), d_in)
    column_loop: torch.Tensor | None = None  # (loops * sum(ranks),)

    @property
    def rank(self) -> int:
        return sum(self.ranks)

    def lora(self, i: int, b: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Module i's loop-b factors A (r, d_in) and B (d_out, r): views into the stacks."""
        r = self.ranks[i]
        if not r:
            return None
        start = b * self.rank + sum(self.ranks[:i])
        return self.lora_A[start:start + r], self.lora_Bt[i][b * r:(b + 1) * r].t()


def fuse(modules: dict[str, ModuleW], loops: int) -> Projection:
    ws = list(modules.values())
    ranks = tuple(0 if w.lora_A is None else w.lora_A.shape[1] for w in ws)
    a_rows = [w.lora_A[b] for b in range(loops) for w in ws if w.lora_A is not None]
    lora_A = torch.cat(a_rows).contiguous() if a_rows else None
    lora_Bt = tuple(None if w.lora_B is None else torch.cat([B.t() for B in w.lora_B]).contiguous() for w in ws)
    by_module = [w.lora_A.reshape(-1, w.lora_A.shape[-1]) for w in ws if w.lora_A is not None]
    column_loop = [b for r in ranks for b in range(loops) for _ in range(r)]
    shared = {m: replace(w, lora_A=None, lora_B=None) for m, w in modules.items()}
    return Projection(shared, ranks, loops, lora_A, lora_Bt,
                      torch.cat(by_module).contiguous() if by_module else None,
                      torch.tensor(column_loop, device=ws[0].weight.device) if by_module else None)


@dataclass
class NormW:
    weight: torch.Tensor  # (h,) shared or (B, h) per loop
    bias: torch.Tensor | None
    per_loop: bool


@dataclass
class LayerW:
    projections: dict[str, Projection]  # keys of PROJECTIONS ("gate_up" holds only "up" without a gated MLP)
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


def _layer(modules: dict[str, ModuleW], loops: int, input_norm: NormW, post_norm: NormW) -> LayerW:
    projections = {name: fuse({m: modules[m] for m in group if m in modules}, loops)
                   for name, group in PROJECTIONS.items()}
    return LayerW(projections, input_norm, post_norm)


@torch.no_grad()
def engine_weights(model: RelaxedRecursiveForCausalLM) -> EngineWeights:
    cfg, inner = model.config, model.model
    out = EngineWeights(config=cfg, embed=inner.embed_tokens.weight.detach(), lm_head=model.lm_head.weight.detach(),
                        final_norm=_norm(inner.norm, [], "norm"), inv_freq=inner.rotary.inv_freq.detach(),
                        num_loops=cfg.num_loops, num_shared=cfg.num_shared_layers)
    for k, layer in enumerate(inner.layers):
        slots = [inner.relax[_unrolled(cfg, k, b)] for b in range(cfg.num_loops)]
        modules = {}
        for group in (layer.attn, layer.mlp):
            for m, lin in group.items():
                w = ModuleW(lin.weight.detach(), None if lin.bias is None else lin.bias.detach())
                if m in slots[0].bias:
                    w.loop_bias = torch.stack([s.bias[m].detach() for s in slots])
                if m in slots[0].lora:
                    w.lora_A = torch.stack([s.lora[m].lora_A.detach() for s in slots])
                    w.lora_B = torch.stack([s.lora[m].lora_B.detach() for s in slots])
                modules[m] = w
        shared_in = layer.input_norm if cfg.share_norms else None
        shared_post = layer.post_norm if cfg.share_norms else None
        out.layers.append(_layer(modules, cfg.num_loops, _norm(shared_in, slots, "input_norm"),
                                 _norm(shared_post, slots, "post_norm")))
    return out


@torch.no_grad()
def unrolled_weights(w: EngineWeights) -> EngineWeights:
    """The same model as a vanilla L-layer stack (W' + B_l A_l per layer, one loop): the
    hf-unrolled export, served by the same engine."""
    layers = []
    for k, b in w.config.layer_plan:
        merged = {}
        for p in w.layers[k].projections.values():
            for i, (m, mw) in enumerate(p.modules.items()):
                lora = p.lora(i, b)
                weight = mw.weight if lora is None else mw.weight + lora[1] @ lora[0]
                merged[m] = ModuleW(weight, mw.bias if mw.loop_bias is None else mw.loop_bias[b])
        pick = lambda n: NormW(n.weight[b], None if n.bias is None else n.bias[b], False) if n.per_loop else n
        layers.append(_layer(merged, 1, pick(w.layers[k].input_norm), pick(w.layers[k].post_norm)))
    return EngineWeights(config=w.config, embed=w.embed, lm_head=w.lm_head, final_norm=w.final_norm, layers=layers,
                         inv_freq=w.inv_freq, num_loops=1, num_shared=len(layers))
