"""Relaxed recursive causal LM: K shared layers run for B loops, each unrolled layer with its own LoRA.

Self-contained (torch + transformers only): copied into every checkpoint for trust_remote_code.
Supports the Llama, Gemma and GPT-NeoX layer variants through config flags.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.activations import ACT2FN
from transformers.cache_utils import DynamicCache
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from .configuration_relaxrec import RelaxedRecursiveConfig

# transformers renamed the outputs' past_key_values to cache (5.2x); accept either
_CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"

ATTN = ("q", "k", "v", "o")
MLP = ("gate", "up", "down")


class Norm(nn.Module):
    def __init__(self, config: RelaxedRecursiveConfig):
        super().__init__()
        self.kind, self.eps, self.zero_centered = config.norm_type, config.norm_eps, config.norm_zero_centered
        init = torch.zeros if self.zero_centered else torch.ones
        self.weight = nn.Parameter(init(config.hidden_size))
        self.bias = nn.Parameter(torch.zeros(config.hidden_size)) if self.kind == "layernorm" else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "layernorm":
            return F.layer_norm(x, (x.shape[-1],), self.weight, self.bias, self.eps)
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.zero_centered:  # Gemma scales in fp32, then casts
            return (xf * (1.0 + self.weight.float())).type_as(x)
        return self.weight * xf.to(x.dtype)  # Llama casts, then scales


class LoraAdapter(nn.Module):
    """h = W'x + B A x with scale 1 (the SVD init reproduces W_l exactly at full rank)."""

    def __init__(self, d_in: int, d_out: int, rank: int):
        super().__init__()
        self.lora_A = nn.Parameter(torch.zeros(rank, d_in))
        self.lora_B = nn.Parameter(torch.zeros(d_out, rank))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.linear(x, self.lora_A), self.lora_B)


def linear_shapes(config: RelaxedRecursiveConfig) -> dict[str, tuple[int, int]]:
    """(d_out, d_in) of every linear of a layer."""
    h, f = config.hidden_size, config.intermediate_size
    q, kv = config.num_attention_heads * config.head_dim, config.num_key_value_heads * config.head_dim
    shapes = {"q": (q, h), "k": (kv, h), "v": (kv, h), "o": (h, q), "gate": (f, h), "up": (f, h), "down": (h, f)}
    if not config.gated_mlp:
        del shapes["gate"]
    return shapes


def linear_has_bias(config: RelaxedRecursiveConfig, module: str) -> bool:
    return config.attention_bias if module in ATTN else config.mlp_bias


class RelaxSlot(nn.Module):
    """What belongs to one unrolled layer: its LoRAs, and its norms/biases when those are not shared."""

    def __init__(self, config: RelaxedRecursiveConfig):
        super().__init__()
        shapes = linear_shapes(config)
        self.lora = nn.ModuleDict({
            m: LoraAdapter(shapes[m][1], shapes[m][0], r) for m, r in config.lora_ranks.items() if r > 0 and m in shapes
        })
        self.bias = nn.ParameterDict({
            m: nn.Parameter(torch.zeros(s[0])) for m, s in shapes.items()
            if not config.share_biases and linear_has_bias(config, m)
        })
        if not config.share_norms:
            self.input_norm, self.post_norm = Norm(config), Norm(config)


class SharedLayer(nn.Module):
    """One physical decoder layer, run once per loop with that loop's RelaxSlot."""

    def __init__(self, config: RelaxedRecursiveConfig):
        super().__init__()
        self.config = config
        shapes = linear_shapes(config)
        make = lambda m: nn.Linear(shapes[m][1], shapes[m][0], bias=config.share_biases and linear_has_bias(config, m))
        self.attn = nn.ModuleDict({m: make(m) for m in ATTN})
        self.mlp = nn.ModuleDict({m: make(m) for m in MLP if m in shapes})
        if config.share_norms:
            self.input_norm, self.post_norm = Norm(config), Norm(config)
        self.act = ACT2FN[config.hidden_act]

    def proj(self, group: nn.ModuleDict, m: str, x: torch.Tensor, slot: RelaxSlot) -> torch.Tensor:
        lin = group[m]
        bias = lin.bias if lin.bias is not None else (slot.bias[m] if m in slot.bias else None)
        y = F.linear(x, lin.weight, bias)
        if m in slot.lora:
            y = y + slot.lora[m](x)
        return y

    def norms(self, slot: RelaxSlot) -> tuple[Norm, Norm]:
        owner = self if self.config.share_norms else slot
        return owner.input_norm, owner.post_norm

    def forward(self, x, slot, cos, sin, mask, cache, layer_idx):
        input_norm, post_norm = self.norms(slot)
        attn = self.attention(input_norm(x), slot, cos, sin, mask, cache, layer_idx)
        if self.config.parallel_residual:
            return x + attn + self.feed_forward(post_norm(x), slot)
        h = x + attn
        return h + self.feed_forward(post_norm(h), slot)

    def feed_forward(self, x, slot):
        up = self.proj(self.mlp, "up", x, slot)
        inner = self.act(self.proj(self.mlp, "gate", x, slot)) * up if "gate" in self.mlp else self.act(up)
        return self.proj(self.mlp, "down", inner, slot)

    def attention(self, x, slot, cos, sin, mask, cache, layer_idx):
        cfg = self.config
        b, s, _ = x.shape
        q = self.proj(self.attn, "q", x, slot).view(b, s, -1, cfg.head_dim).transpose(1, 2)
        k = self.proj(self.attn, "k", x, slot).view(b, s, -1, cfg.head_dim).transpose(1, 2)
        v = self.proj(self.attn, "v", x, slot).view(b, s, -1, cfg.head_dim).transpose(1, 2)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if cache is not None:  # indexed by unrolled layer: loop 2 must not overwrite loop 1
            k, v = cache.update(k, v, layer_idx)
        rep = cfg.num_attention_heads // cfg.num_key_value_heads
        if rep > 1:
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=cfg.head_dim**-0.5)
        return self.proj(self.attn, "o", out.transpose(1, 2).reshape(b, s, -1), slot)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotates the first cos.shape[-1] dims of each head (partial rotary for GPT-NeoX)."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    d = cos.shape[-1]
    rot, rest = x[..., :d], x[..., d:]
    return torch.cat(((rot * cos) + (rotate_half(rot) * sin), rest), dim=-1)


class RotaryEmbedding(nn.Module):
    def __init__(self, config: RelaxedRecursiveConfig):
        super().__init__()
        rp = config.rope_parameters
        rope_type = rp.get("rope_type", "default")
        if rope_type == "default":
            dim = int(config.head_dim * rp.get("partial_rotary_factor", 1.0))
            inv_freq = 1.0 / (rp["rope_theta"] ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
            self.attention_scaling = 1.0
        elif rope_type in ROPE_INIT_FUNCTIONS and not rope_type.startswith("dynamic"):
            inv_freq, self.attention_scaling = ROPE_INIT_FUNCTIONS[rope_type](config)
        else:
            raise ValueError(f"unsupported rope_type {rope_type!r}")
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    @torch.no_grad()
    def forward(self, x: torch.Tensor, position_ids: torch.Tensor):
        freqs = position_ids[..., None].float() * self.inv_freq.to(x.device)
        emb = torch.cat((freqs, freqs), dim=-1)
        return (emb.cos() * self.attention_scaling).to(x.dtype), (emb.sin() * self.attention_scaling).to(x.dtype)


class RelaxedRecursivePreTrainedModel(PreTrainedModel):
    config_class = RelaxedRecursiveConfig
    config: RelaxedRecursiveConfig
    base_model_prefix = "model"
    _no_split_modules = ["SharedLayer"]
    _supports_sdpa = True

    @torch.no_grad()
    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            module.weight.normal_(0.0, 0.02)
            if module.bias is not None:
                module.bias.zero_()
        elif isinstance(module, nn.Embedding):
            module.weight.normal_(0.0, 0.02)
        elif isinstance(module, Norm):
            module.weight.fill_(0.0 if module.zero_centered else 1.0)
            if module.bias is not None:
                module.bias.zero_()
        elif isinstance(module, LoraAdapter):
            module.lora_A.normal_(0.0, module.lora_A.shape[1] ** -0.5)
            module.lora_B.zero_()
        elif isinstance(module, RelaxSlot):
            for p in module.bias.values():
                p.zero_()
        elif isinstance(module, RotaryEmbedding):
            module.inv_freq.copy_(RotaryEmbedding(self.config).inv_freq)


class RelaxedRecursiveModel(RelaxedRecursivePreTrainedModel):
    def __init__(self, config: RelaxedRecursiveConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.layers = nn.ModuleList(SharedLayer(config) for _ in range(config.num_shared_layers))
        self.relax = nn.ModuleList(RelaxSlot(config) for _ in range(config.num_hidden_layers))
        self.norm = Norm(config)
        self.rotary = RotaryEmbedding(config)
        self.post_init()

    def get_input_embeddings(self):
        return self.embed_tokens

    def set_input_embeddings(self, value):
        self.embed_tokens = value

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None, inputs_embeds=None,
                use_cache=None, past_key_values=None, output_hidden_states=None, **kwargs) -> BaseModelOutputWithPast:
        """output_hidden_states: the input of the first layer and the output of every unrolled layer,
        before the final norm; loop b of a CYCLE model ends at hidden_states[(b + 1) * K]."""
        cache = cache if cache is not None else past_key_values
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        h = inputs_embeds
        if self.config.embedding_multiplier != 1.0:
            h = h * torch.tensor(self.config.embedding_multiplier, dtype=h.dtype)
        use_cache = use_cache if use_cache is not None else self.config.use_cache
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        past = cache.get_seq_length() if cache is not None else 0
        b, s = h.shape[:2]
        if position_ids is None:
            position_ids = (torch.arange(s, device=h.device) + past).unsqueeze(0).expand(b, -1)
        mask = causal_mask(attention_mask, b, s, past, h.dtype, h.device)
        cos, sin = self.rotary(h, position_ids)
        hidden_states = [h] if output_hidden_states else None
        for idx, (shared, _loop) in enumerate(self.config.layer_plan):
            h = self.layers[shared](h, self.relax[idx], cos, sin, mask, cache if use_cache else None, idx)
            if hidden_states is not None:
                hidden_states.append(h)
        return BaseModelOutputWithPast(last_hidden_state=self.norm(h), **{_CACHE_FIELD: cache if use_cache else None},
                                       hidden_states=tuple(hidden_states) if hidden_states is not None else None)


def causal_mask(attention_mask, b, s, past, dtype, device) -> torch.Tensor:
    """Additive (b, 1, s, past + s) mask: causal over absolute positions, plus key padding."""
    kv = past + s
    allowed = torch.arange(kv, device=device)[None, :] <= (torch.arange(s, device=device) + past)[:, None]
    allowed = allowed[None, None].expand(b, 1, s, kv)
    if attention_mask is not None:
        allowed = allowed & attention_mask[:, None, None, -kv:].bool()
    return torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill(~allowed, torch.finfo(dtype).min)


class RelaxedRecursiveForCausalLM(RelaxedRecursivePreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: RelaxedRecursiveConfig):
        super().__init__(config)
        self.model = RelaxedRecursiveModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def get_output_embeddings(self):
        return self.lm_head

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None, inputs_embeds=None,
                labels=None, use_cache=None, logits_to_keep: int = 0, past_key_values=None, output_hidden_states=None,
                **kwargs):
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         cache=cache if cache is not None else past_key_values, inputs_embeds=inputs_embeds,
                         use_cache=use_cache, output_hidden_states=output_hidden_states)
        h = out.last_hidden_state
        if logits_to_keep:
            h = h[:, -logits_to_keep:]
        logits = self.lm_head(h)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits, hidden_states=out.hidden_states,
                                      **{_CACHE_FIELD: getattr(out, _CACHE_FIELD)})
