"""One adapter per source architecture: HF tensor names and layouts <-> the canonical layer form.

Canonical layer tensors are keyed "<module>.weight" / "<module>.bias" with modules
q, k, v, o, gate, up, down (linears, weight shape (d_out, d_in)) and input_norm, post_norm.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from ..errors import UserError
from ..recursion.linears import ATTENTION, linear_shapes, linears

NORMS = ("input_norm", "post_norm")


class ArchError(UserError):
    pass


@dataclass(frozen=True)
class Unit:
    """A group of HF tensors that is read together and split into canonical tensors."""

    hf_names: tuple[str, ...]
    to_canonical: Callable[[list[torch.Tensor]], dict[str, torch.Tensor]]


def _one(canon: str) -> Callable[[list[torch.Tensor]], dict[str, torch.Tensor]]:
    return lambda ts: {canon: ts[0]}


class ArchAdapter:
    model_types: tuple[str, ...] = ()
    layer_prefix = ""

    def __init__(self, cfg: dict):
        self.cfg = cfg
        try:
            self.num_layers = int(cfg["num_hidden_layers"])
            self.hidden = int(cfg["hidden_size"])
            self.heads = int(cfg["num_attention_heads"])
            self.intermediate = int(cfg["intermediate_size"])
            self.vocab = int(cfg["vocab_size"])
        except KeyError as e:
            raise ArchError(f"config.json lacks {e.args[0]!r}; is this a {self.model_types[0]} checkpoint?") from None
        self.kv_heads = int(cfg.get("num_key_value_heads") or self.heads)
        self.head_dim = int(cfg.get("head_dim") or self.hidden // self.heads)
        self.tied = bool(cfg.get("tie_word_embeddings", self._default_tied()))

    # -- shapes -------------------------------------------------------------------------------
    gated = True  # a gate in the MLP (recursion.linears)

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        return linear_shapes(self.hidden, self.heads, self.kv_heads, self.head_dim, self.intermediate, self.gated)

    def linears(self) -> tuple[str, ...]:
        return linears(self.gated)

    def linear_has_bias(self, module: str) -> bool:
        return False

    def norm_has_bias(self) -> bool:
        return False

    def layer_tensor_shapes(self) -> dict[str, tuple[int, ...]]:
        shapes: dict[str, tuple[int, ...]] = {}
        for m, s in self.linear_shapes().items():
            shapes[f"{m}.weight"] = s
            if self.linear_has_bias(m):
                shapes[f"{m}.bias"] = (s[0],)
        for n in NORMS:
            shapes[f"{n}.weight"] = (self.hidden,)
            if self.norm_has_bias():
                shapes[f"{n}.bias"] = (self.hidden,)
        return shapes

    def global_tensor_shapes(self) -> dict[str, tuple[int, ...]]:
        shapes: dict[str, tuple[int, ...]] = {"embed.weight": (self.vocab, self.hidden), "final_norm.weight": (self.hidden,)}
        if self.norm_has_bias():
            shapes["final_norm.bias"] = (self.hidden,)
        if not self.tied:
            shapes["lm_head.weight"] = (self.vocab, self.hidden)
        return shapes

    # -- names ----------------------------------------------------------------------------------
    def _default_tied(self) -> bool:
        return False

    def global_names(self) -> dict[str, str]:
        """canonical global name -> HF name."""
        raise NotImplementedError

    def layer_names(self, i: int) -> dict[str, str]:
        """canonical layer tensor -> HF name, for architectures whose tensors map one to one."""
        raise NotImplementedError

    def layer_units(self, i: int) -> list[Unit]:
        return [Unit((hf,), _one(canon)) for canon, hf in self.layer_names(i).items()]

    def layer_from_canonical(self, i: int, canon: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        names = self.layer_names(i)
        return {names[c]: t for c, t in canon.items()}

    def expected_hf_shapes(self) -> dict[str, tuple[int, ...]]:
        """Every HF tensor name the checkpoint must hold, with the shape config.json implies."""
        shapes = {hf: self.global_tensor_shapes()[c] for c, hf in self.global_names().items()}
        for i in range(self.num_layers):
            meta = {c: torch.empty(s, device="meta") for c, s in self.layer_tensor_shapes().items()}
            shapes.update({n: tuple(t.shape) for n, t in self.layer_from_canonical(i, meta).items()})
        return shapes

    # -- the relaxed model's architecture fields -----------------------------------------------
    def rope_parameters(self) -> dict:
        rp = dict(self.cfg.get("rope_parameters") or {})
        if not rp:  # transformers 4.x style configs
            rp = dict(self.cfg.get("rope_scaling") or {})
            if "type" in rp and "rope_type" not in rp:
                rp["rope_type"] = rp.pop("type")
            rp["rope_theta"] = float(self.cfg.get("rope_theta", 10000.0))
        rp.setdefault("rope_type", "default")
        return rp

    def arch_fields(self) -> dict:
        raise NotImplementedError

    def common_fields(self) -> dict:
        return dict(
            vocab_size=self.vocab,
            hidden_size=self.hidden,
            intermediate_size=self.intermediate,
            num_attention_heads=self.heads,
            num_key_value_heads=self.kv_heads,
            head_dim=self.head_dim,
            max_position_embeddings=int(self.cfg.get("max_position_embeddings", 2048)),
            rope_parameters=self.rope_parameters(),
            tie_word_embeddings=self.tied,
            bos_token_id=self.cfg.get("bos_token_id"),
            eos_token_id=self.cfg.get("eos_token_id"),
            pad_token_id=self.cfg.get("pad_token_id"),
        )


class LlamaAdapter(ArchAdapter):
    """Llama 2/3, TinyLlama, SmolLM/SmolLM2 (RMSNorm, SwiGLU, GQA)."""

    model_types = ("llama",)

    def linear_has_bias(self, module: str) -> bool:
        if module in ATTENTION:
            return bool(self.cfg.get("attention_bias", False))
        return bool(self.cfg.get("mlp_bias", False))

    def global_names(self) -> dict[str, str]:
        names = {"embed.weight": "model.embed_tokens.weight", "final_norm.weight": "model.norm.weight"}
        if not self.tied:
            names["lm_head.weight"] = "lm_head.weight"
        return names

    def layer_names(self, i: int) -> dict[str, str]:
        p = f"model.layers.{i}."
        path = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.o_proj",
                "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj",
                "input_norm": "input_layernorm", "post_norm": "post_attention_layernorm"}
        return {c: p + path[c.split(".")[0]] + "." + c.split(".")[1] for c in self.layer_tensor_shapes()}

    def arch_fields(self) -> dict:
        act = self.cfg.get("hidden_act", "silu")
        return dict(self.common_fields(), norm_type="rmsnorm", norm_eps=float(self.cfg.get("rms_norm_eps", 1e-6)),
                    norm_zero_centered=False, hidden_act=act, gated_mlp=True, parallel_residual=False,
                    attention_bias=self.linear_has_bias("q"), mlp_bias=self.linear_has_bias("up"),
                    embedding_multiplier=1.0)


class GemmaAdapter(LlamaAdapter):
    """Gemma 1 (gemma-2b/7b): GeGLU (tanh), RMSNorm with (1 + w), sqrt(hidden)-scaled tied embeddings, MQA."""

    model_types = ("gemma",)

    def _default_tied(self) -> bool:
        return True

    def arch_fields(self) -> dict:
        # Gemma's reference MLP is GeGLU with tanh-approximated GELU; hub configs say so in
        # hidden_activation (transformers 4.x honoured it, 5.x reads hidden_act alone).
        act = self.cfg.get("hidden_activation") or self.cfg.get("hidden_act") or "gelu_pytorch_tanh"
        fields = super().arch_fields()
        fields.update(norm_zero_centered=True, hidden_act=act, embedding_multiplier=self.hidden**0.5)
        return fields


class GPTNeoXAdapter(ArchAdapter):
    """GPT-NeoX / Pythia: LayerNorm with biases, parallel residual, partial rotary, fused per-head qkv."""

    model_types = ("gpt_neox",)
    gated = False

    def linear_has_bias(self, module: str) -> bool:
        if module in ATTENTION:
            return bool(self.cfg.get("attention_bias", True))
        return True

    def norm_has_bias(self) -> bool:
        return True

    def global_names(self) -> dict[str, str]:
        names = {"embed.weight": "gpt_neox.embed_in.weight", "final_norm.weight": "gpt_neox.final_layer_norm.weight",
                 "final_norm.bias": "gpt_neox.final_layer_norm.bias"}
        if not self.tied:
            names["lm_head.weight"] = "embed_out.weight"
        return names

    def _paths(self, i: int) -> dict[str, str]:
        p = f"gpt_neox.layers.{i}."
        return {"qkv": p + "attention.query_key_value", "o": p + "attention.dense", "up": p + "mlp.dense_h_to_4h",
                "down": p + "mlp.dense_4h_to_h", "input_norm": p + "input_layernorm",
                "post_norm": p + "post_attention_layernorm"}

    def layer_units(self, i: int) -> list[Unit]:
        paths = self._paths(i)
        units = [Unit((paths["qkv"] + ".weight",), lambda ts: self._split_qkv(ts[0], "weight"))]
        if self.linear_has_bias("q"):
            units.append(Unit((paths["qkv"] + ".bias",), lambda ts: self._split_qkv(ts[0], "bias")))
        for canon in self.layer_tensor_shapes():
            mod, kind = canon.split(".")
            if mod not in ("q", "k", "v"):
                units.append(Unit((f"{paths[mod]}.{kind}",), _one(canon)))
        return units

    def _split_qkv(self, t: torch.Tensor, kind: str) -> dict[str, torch.Tensor]:
        # rows are [q_h; k_h; v_h] per head h
        per_head = t.reshape(self.heads, 3, self.head_dim, *t.shape[1:])
        return {f"{m}.{kind}": per_head[:, j].reshape(self.heads * self.head_dim, *t.shape[1:]).contiguous()
                for j, m in enumerate(("q", "k", "v"))}

    def layer_from_canonical(self, i: int, canon: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        paths, out = self._paths(i), {}
        for kind in ("weight", "bias"):
            if f"q.{kind}" in canon:
                parts = [canon[f"{m}.{kind}"].reshape(self.heads, 1, self.head_dim, *canon[f"q.{kind}"].shape[1:])
                         for m in ("q", "k", "v")]
                out[f"{paths['qkv']}.{kind}"] = torch.cat(parts, 1).reshape(3 * self.heads * self.head_dim, *parts[0].shape[3:])
        for c, t in canon.items():
            mod, kind = c.split(".")
            if mod not in ("q", "k", "v"):
                out[f"{paths[mod]}.{kind}"] = t
        return out

    def rope_parameters(self) -> dict:
        rp = super().rope_parameters()
        if "rotary_emb_base" in self.cfg and not self.cfg.get("rope_parameters"):
            rp["rope_theta"] = float(self.cfg["rotary_emb_base"])
        if "partial_rotary_factor" not in rp:
            rp["partial_rotary_factor"] = float(self.cfg.get("rotary_pct", self.cfg.get("partial_rotary_factor", 1.0)))
        return rp

    def arch_fields(self) -> dict:
        return dict(self.common_fields(), norm_type="layernorm", norm_eps=float(self.cfg.get("layer_norm_eps", 1e-5)),
                    norm_zero_centered=False, hidden_act=self.cfg.get("hidden_act", "gelu"), gated_mlp=False,
                    parallel_residual=bool(self.cfg.get("use_parallel_residual", True)),
                    attention_bias=self.linear_has_bias("q"), mlp_bias=True, embedding_multiplier=1.0)


ADAPTERS: dict[str, type[ArchAdapter]] = {t: cls for cls in (LlamaAdapter, GemmaAdapter, GPTNeoXAdapter) for t in cls.model_types}


def adapter_for(cfg: dict) -> ArchAdapter:
    model_type = cfg.get("model_type")
    if model_type not in ADAPTERS:
        raise ArchError(
            f"unsupported architecture model_type={model_type!r}; supported: {', '.join(sorted(ADAPTERS))}"
        )
    return ADAPTERS[model_type](cfg)
