"""What the Megatron model needs to know: the relaxed HF config (architecture + recursion) and the layout."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..errors import UserError
from ..recursion import SharingPlan

ATTN = ("q", "k", "v", "o")
COLUMN = ("q", "k", "v", "gate", "up")  # column-parallel: A replicated, B sharded on rows
ROW = ("o", "down")  # row-parallel: A sharded on columns, B replicated


@dataclass(frozen=True)
class ParallelLayout:
    tp: int = 1
    pp: int = 1
    sequence_parallel: bool = False
    recompute: bool = False  # recompute every unrolled layer's activations in backward


@dataclass
class RelaxedSettings:
    """The relaxed recursive HF config (configuration_relaxrec.py) as plain fields."""

    hf: dict
    layout: ParallelLayout = field(default_factory=ParallelLayout)

    def __post_init__(self):
        h = self.hf
        self.plan = SharingPlan(h["num_hidden_layers"], h["num_loops"], h["recursion_strategy"])
        self.ranks: dict[str, int] = {m: r for m, r in (h.get("lora_ranks") or {}).items() if r > 0}
        self.gated = bool(h["gated_mlp"])
        self.modules = ("q", "k", "v", "o", "gate", "up", "down") if self.gated else ("q", "k", "v", "o", "up", "down")
        self.validate()

    def __getattr__(self, name):
        try:
            return self.__dict__["hf"][name]
        except KeyError:
            raise AttributeError(name) from None

    def validate(self) -> None:
        h, tp, pp = self.hf, self.layout.tp, self.layout.pp
        if tp < 1 or pp < 1:
            raise UserError(f"tensor and pipeline parallel sizes must be >= 1, got TP={tp}, PP={pp}")
        for what, n in (("num_attention_heads", h["num_attention_heads"]), ("intermediate_size", h["intermediate_size"]),
                        ("vocab_size", h["vocab_size"])):
            if n % tp:
                raise UserError(f"TP={tp} does not divide {what}={n}; choose a TP that divides it")
        groups = h["num_key_value_heads"]
        if groups % tp and tp % groups:
            raise UserError(f"TP={tp} and num_key_value_heads={groups}: one must divide the other")
        # LoRA ranks need no TP divisibility: A and B are split on d_in / d_out, never on the rank
        L = self.plan.num_layers
        if L % pp:
            raise UserError(f"PP={pp} does not fit the unrolled depth of {L} layers; choose a PP that divides {L}")
        if h["attention_bias"] != h["mlp_bias"]:
            raise UserError("megatron-core has one bias switch for attention and MLP linears; "
                            f"attention_bias={h['attention_bias']} with mlp_bias={h['mlp_bias']} is not supported")
        rope = h["rope_parameters"]
        if rope.get("rope_type", "default") not in ("default", "linear", "llama3"):
            raise UserError(f"rope_type {rope.get('rope_type')!r} is not supported by the Megatron model")

    # -- pipeline stage layout -----------------------------------------------------------------
    def stage_layers(self, pp_rank: int) -> range:
        return self.plan.stage_layers(self.layout.pp, pp_rank)

    def stage_shared(self, pp_rank: int) -> dict[int, dict[int, int]]:
        """shared layer -> {loop: unrolled layer} run on this stage."""
        out: dict[int, dict[int, int]] = {}
        for l in self.stage_layers(pp_rank):
            out.setdefault(self.plan.shared_index(l), {})[self.plan.loop_index(l)] = l
        return out

    def stages_holding(self, shared: int) -> list[int]:
        return [p for p in range(self.layout.pp) if shared in self.stage_shared(p)]


def activation(name: str):
    if name in ("silu", "swish"):
        return F.silu
    if name in ("gelu_pytorch_tanh", "gelu_new", "gelu_fast", "gelu_tanh"):
        return lambda x: F.gelu(x, approximate="tanh")
    if name == "gelu":
        return F.gelu
    raise UserError(f"activation {name!r} is not supported by the Megatron model")


def transformer_config(s: RelaxedSettings, dtype: torch.dtype = torch.float32, fp8: dict | None = None,
                       perform_initialization: bool = True):
    """megatron-core's TransformerConfig of the unrolled model; `fp8` adds its FP8 settings
    (fp8, fp8_recipe, first_last_layers_bf16, ...: training.precision.fp8_settings)."""
    from megatron.core.transformer.transformer_config import TransformerConfig

    h = s.hf
    return TransformerConfig(
        num_layers=s.plan.num_layers,
        hidden_size=h["hidden_size"],
        num_attention_heads=h["num_attention_heads"],
        num_query_groups=h["num_key_value_heads"],
        kv_channels=h["head_dim"],
        ffn_hidden_size=h["intermediate_size"],
        normalization="LayerNorm" if h["norm_type"] == "layernorm" else "RMSNorm",
        layernorm_epsilon=h["norm_eps"],
        gated_linear_unit=s.gated,
        activation_func=activation(h["hidden_act"]),
        add_bias_linear=bool(h["mlp_bias"]),
        hidden_dropout=0.0,
        attention_dropout=0.0,
        tensor_model_parallel_size=s.layout.tp,
        pipeline_model_parallel_size=s.layout.pp,
        sequence_parallel=s.layout.sequence_parallel and s.layout.tp > 1,
        params_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        pipeline_dtype=dtype,
        use_cpu_initialization=True,
        perform_initialization=perform_initialization,
        gradient_accumulation_fusion=False,
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        apply_rope_fusion=False,
        persist_layer_norm=False,
        **(fp8 or {}),
    )
