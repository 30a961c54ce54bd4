"""Tensor names of the relaxed recursive HF checkpoint, from canonical layer names (see arch.py)."""

from __future__ import annotations

from ..recursion.linears import ATTENTION, MLP
from .arch import NORMS

GLOBAL_PATHS = {
    "embed.weight": "model.embed_tokens.weight",
    "final_norm.weight": "model.norm.weight",
    "final_norm.bias": "model.norm.bias",
    "lm_head.weight": "lm_head.weight",
}
_GROUP = {"qkv": "attn", **{m: "attn" for m in ATTENTION}, **{m: "mlp" for m in MLP}}


def is_norm(canon: str) -> bool:
    return canon.split(".")[0] in NORMS


def is_linear_weight(canon: str) -> bool:
    module, kind = canon.split(".")
    return module in _GROUP and kind == "weight"


def is_per_layer(canon: str, share_norms: bool, share_biases: bool) -> bool:
    """Norms and linear biases live in the unrolled layer's slot when they are not shared."""
    if is_norm(canon):
        return not share_norms
    return canon.endswith(".bias") and not share_biases


def shared_path(shared: int, canon: str) -> str:
    module, kind = canon.split(".")
    inner = module if module in NORMS else f"{_GROUP[module]}.{module}"
    return f"model.layers.{shared}.{inner}.{kind}"


def slot_path(unrolled: int, canon: str) -> str:
    module, kind = canon.split(".")
    if module in NORMS:
        return f"model.relax.{unrolled}.{module}.{kind}"
    assert kind == "bias", canon
    return f"model.relax.{unrolled}.bias.{module}"


def lora_paths(unrolled: int, module: str) -> tuple[str, str]:
    p = f"model.relax.{unrolled}.lora.{module}"
    return f"{p}.lora_A", f"{p}.lora_B"


def layer_path(canon: str, shared: int, unrolled: int, share_norms: bool, share_biases: bool) -> str:
    if is_per_layer(canon, share_norms, share_biases):
        return slot_path(unrolled, canon)
    return shared_path(shared, canon)
