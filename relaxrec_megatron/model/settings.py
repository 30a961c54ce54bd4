"""What the Megatron model needs to know: the relaxed HF config (architecture + recursion) and the layout."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..errors import UserError
from ..recursion import SharingPlan
from ..recursion.linears import linears


@dataclass(frozen=True)
class ParallelLayout:
    tp: int = 1
    pp: int = 1
    sequence_parallel: bool = False
    recompute: bool = False  # recompute every unrolled layer's activations in backward


@dataclass(frozen=True, eq=False)
class RelaxedSettings:
    """The relaxed recursive HF config (configuration_relaxrec.py) as typed fields, read once and checked
    against the layout: what model/ reads. `hf` is the config itself, written into Megatron checkpoints."""

    hf: dict
    layout: ParallelLayout = field(default_factory=ParallelLayout)
    # architecture of the source
    vocab_size: int = field(init=False)
    hidden_size: int = field(init=False)
    intermediate_size: int = field(init=False)
    num_attention_heads: int = field(init=False)
    num_key_value_heads: int = field(init=False)
    head_dim: int = field(init=False)
    max_position_embeddings: int = field(init=False)
    norm_type: str = field(init=False)  # rmsnorm | layernorm
    norm_eps: float = field(init=False)
    norm_zero_centered: bool = field(init=False)
    hidden_act: str = field(init=False)
    gated: bool = field(init=False)
    parallel_residual: bool = field(init=False)
    linear_bias: bool = field(init=False)  # megatron-core has one switch for attention and MLP biases
    embedding_multiplier: float = field(init=False)
    tie_word_embeddings: bool = field(init=False)
    rope_parameters: dict = field(init=False)
    # recursion
    plan: SharingPlan = field(init=False)
    ranks: dict = field(init=False)  # module -> LoRA rank, for the modules that have one
    share_norms: bool = field(init=False)
    share_biases: bool = field(init=False)
    modules: tuple = field(init=False)  # the layer's linears (recursion.linears)

    def __post_init__(self):
        h = self.hf
        heads = int(h["num_attention_heads"])
        typed = dict(
            vocab_size=int(h["vocab_size"]), hidden_size=int(h["hidden_size"]),
            intermediate_size=int(h["intermediate_size"]), num_attention_heads=heads,
            num_key_value_heads=int(h.get("num_key_value_heads") or heads),
            head_dim=int(h.get("head_dim") or int(h["hidden_size"]) // heads),
            max_position_embeddings=int(h["max_position_embeddings"]), norm_type=str(h["norm_type"]),
            norm_eps=float(h["norm_eps"]), norm_zero_centered=bool(h["norm_zero_centered"]),
            hidden_act=str(h["hidden_act"]), gated=bool(h["gated_mlp"]), parallel_residual=bool(h["parallel_residual"]),
            linear_bias=bool(h["mlp_bias"]), embedding_multiplier=float(h["embedding_multiplier"]),
            tie_word_embeddings=bool(h["tie_word_embeddings"]), rope_parameters=dict(h["rope_parameters"]),
            plan=SharingPlan(h["num_hidden_layers"], h["num_loops"], h["recursion_strategy"]),
            ranks={m: int(r) for m, r in (h.get("lora_ranks") or {}).items() if r > 0},
            share_norms=bool(h["share_norms"]), share_biases=bool(h["share_biases"]),
            modules=linears(bool(h["gated_mlp"])))
        for name, value in typed.items():
            object.__setattr__(self, name, value)
        self.validate()

    def validate(self) -> None:
        tp, pp = self.layout.tp, self.layout.pp
        if tp < 1 or pp < 1:
            raise UserError(f"tensor and pipeline parallel sizes must be >= 1, got TP={tp}, PP={pp}")
        for what, n in (("num_attention_heads", self.num_attention_heads), ("intermediate_size", self.intermediate_size),
                        ("vocab_size", self.vocab_size)):
            if n % tp:
                raise UserError(f"TP={tp} does not divide {what}={n}; choose a TP that divides it")
        groups = self.num_key_value_heads
        if groups % tp and tp % groups:
            raise UserError(f"TP={tp} and num_key_value_heads={groups}: one must divide the other")
        # LoRA ranks need no TP divisibility: A and B are split on d_in / d_out, never on the rank
        L = self.plan.num_layers
        if L % pp:
            raise UserError(f"PP={pp} does not fit the unrolled depth of {L} layers; choose a PP that divides {L}")
        if self.hf["attention_bias"] != self.hf["mlp_bias"]:
            raise UserError("megatron-core has one bias switch for attention and MLP linears; "
                            f"attention_bias={self.hf['attention_bias']} with mlp_bias={self.hf['mlp_bias']} is not supported")
        if self.rope_parameters.get("rope_type", "default") not in ("default", "linear", "llama3"):
            raise UserError(f"rope_type {self.rope_parameters.get('rope_type')!r} is not supported by the Megatron model")
        activation(self.hidden_act)

    def rope(self) -> tuple[torch.Tensor, float]:
        """(inv_freq, attention scaling) of the rotary embedding, as the HF reference computes them."""
        from ..hf.configuration_relaxrec import RelaxedRecursiveConfig
        from ..numerics import rope_inv_freq

        keep = set(RelaxedRecursiveConfig.__dataclass_fields__) - {"dtype"}
        return rope_inv_freq(RelaxedRecursiveConfig(**{k: v for k, v in self.hf.items() if k in keep}))

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

    return TransformerConfig(
        num_layers=s.plan.num_layers,
        hidden_size=s.hidden_size,
        num_attention_heads=s.num_attention_heads,
        num_query_groups=s.num_key_value_heads,
        kv_channels=s.head_dim,
        ffn_hidden_size=s.intermediate_size,
        normalization="LayerNorm" if s.norm_type == "layernorm" else "RMSNorm",
        layernorm_epsilon=s.norm_eps,
        gated_linear_unit=s.gated,
        activation_func=activation(s.hidden_act),
        add_bias_linear=s.linear_bias,
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
