"""Layer specs of the relaxed recursive model: megatron's TransformerLayer with per-loop LoRA linears.

`relaxed_layer_spec(settings, loops)` builds the spec of one physical (shared) layer that runs the
given loops on this pipeline stage; every loop-dependent piece (LoRA, unshared norms and biases)
holds one entry per loop. The Transformer Engine variant is chosen only with CUDA and TE present.
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules

from ..recursion.linears import fc1
from .attention import FusedCausalAttention
from .lora_linear import LoraColumnParallelLinear, LoraRowParallelLinear, te_linear_classes
from .norms import LoopedNorm
from .settings import RelaxedSettings


class ParallelResidualTransformerLayer(TransformerLayer):
    """GPT-NeoX: x + attn(ln1(x)) + mlp(ln2(x)) (megatron-core has only the sequential residual)."""

    def forward(self, hidden_states, attention_mask=None, rotary_pos_emb=None, **kwargs):
        attn, attn_bias = self.self_attention(self.input_layernorm(hidden_states), attention_mask=attention_mask,
                                              rotary_pos_emb=rotary_pos_emb)
        mlp, mlp_bias = self.mlp(self.pre_mlp_layernorm(hidden_states))
        branches = [attn, mlp] + [b for b in (attn_bias, mlp_bias) if b is not None]
        out = hidden_states
        for b in branches[:2]:
            out = out + F.dropout(b, p=self.hidden_dropout, training=self.training)
        for b in branches[2:]:
            out = out + b
        return out, None


def core_attention_cls(use_te: bool):
    if use_te:
        from megatron.core.extensions.transformer_engine import TEDotProductAttention

        return TEDotProductAttention
    return FusedCausalAttention


def relaxed_layer_spec(s: RelaxedSettings, loops: tuple[int, ...], use_te: bool = False) -> ModuleSpec:
    norm = partial(LoopedNorm, kind=s.norm_type, zero_centered=s.norm_zero_centered, loops=loops, shared=s.share_norms)
    lora = dict(lora_ranks=s.ranks, loops=loops, per_loop_bias=not s.share_biases)
    heads_per_group = s.num_attention_heads // s.num_key_value_heads
    column_cls, row_cls = te_linear_classes() if use_te else (LoraColumnParallelLinear, LoraRowParallelLinear)
    column, row = partial(column_cls, **lora), partial(row_cls, **lora)
    return ModuleSpec(
        module=ParallelResidualTransformerLayer if s.parallel_residual else TransformerLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=norm,
            self_attention=ModuleSpec(
                module=SelfAttention,
                params={"attn_mask_type": AttnMaskType.causal},
                submodules=SelfAttentionSubmodules(
                    linear_qkv=partial(column, lora_modules=("q", "k", "v"), heads_per_group=heads_per_group),
                    core_attention=core_attention_cls(use_te),
                    linear_proj=partial(row, lora_modules=("o",)),
                    q_layernorm=IdentityOp,
                    k_layernorm=IdentityOp,
                ),
            ),
            self_attn_bda=get_bias_dropout_add,
            pre_mlp_layernorm=norm,
            mlp=partial(MLP.as_mlp_submodule, submodules=MLPSubmodules(
                linear_fc1=partial(column, lora_modules=fc1(s.gated)), linear_fc2=partial(row, lora_modules=("down",)))),
            mlp_bda=get_bias_dropout_add,
        ),
    )


def te_available() -> bool:
    """TE is imported only where CUDA is (a half-installed TE raises more than ImportError)."""
    if not torch.cuda.is_available():
        return False
    try:
        import transformer_engine.pytorch  # noqa: F401
    except Exception:
        return False
    return True
