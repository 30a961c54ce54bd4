"""Config of the relaxed recursive causal LM.

Self-contained (torch + transformers only): it is copied into every checkpoint so that
`trust_remote_code=True` loads the model without this package installed.
"""

from __future__ import annotations

from transformers import PreTrainedConfig


class RelaxedRecursiveConfig(PreTrainedConfig):
    model_type = "relaxed_recursive"

    # -- architecture of the source model ---------------------------------------------------------
    vocab_size: int = 32000
    hidden_size: int = 256
    intermediate_size: int = 1024
    num_attention_heads: int = 4
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    max_position_embeddings: int = 2048
    rope_parameters: dict | None = None  # {"rope_type", "rope_theta", "partial_rotary_factor", ...}
    norm_type: str = "rmsnorm"  # rmsnorm | layernorm
    norm_eps: float = 1e-6
    norm_zero_centered: bool = False  # Gemma: y = norm(x) * (1 + w)
    hidden_act: str = "silu"
    gated_mlp: bool = True  # act(gate(x)) * up(x); False: act(up(x))
    parallel_residual: bool = False  # GPT-NeoX: x + attn(ln1(x)) + mlp(ln2(x))
    attention_bias: bool = False
    mlp_bias: bool = False
    embedding_multiplier: float = 1.0  # Gemma: sqrt(hidden_size), applied in the activation dtype
    tie_word_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    use_cache: bool = True

    # -- recursion -----------------------------------------------------------------------------
    num_hidden_layers: int = 2  # unrolled depth L (also the depth of the KV cache)
    num_shared_layers: int = 1  # K unique layers
    num_loops: int = 2  # B
    recursion_strategy: str = "cycle"  # cycle | sequence
    layer_plan: list | None = None  # [shared, loop] for every unrolled layer, in execution order
    shared_init: str = "average"
    lora_ranks: dict | None = None  # module -> rank after clipping; absent or 0: no LoRA
    lora_init: str = "svd"
    share_norms: bool = True
    share_biases: bool = True
    source_model: str | None = None
    source_model_type: str | None = None
    source_config: dict | None = None  # the source's config.json, for export back to its architecture

    def __post_init__(self, **kwargs):
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.rope_parameters is None:
            self.rope_parameters = {"rope_type": "default", "rope_theta": 10000.0}
        if self.lora_ranks is None:
            self.lora_ranks = {}
        if self.layer_plan is None:
            K, B = self.num_shared_layers, self.num_loops
            if self.recursion_strategy == "cycle":
                self.layer_plan = [[l % K, l // K] for l in range(K * B)]
            else:
                self.layer_plan = [[l // B, l % B] for l in range(K * B)]
        super().__post_init__(**kwargs)

    def validate_architecture(self):
        if len(self.layer_plan) != self.num_hidden_layers:
            raise ValueError(f"layer_plan has {len(self.layer_plan)} entries for {self.num_hidden_layers} layers")
        if self.num_shared_layers * self.num_loops != self.num_hidden_layers:
            raise ValueError("num_shared_layers * num_loops must equal num_hidden_layers")
