"""Megatron model parameters <-> canonical tensors (the relaxed HF checkpoint's names and layouts).

Every local parameter (or a slice of a fused one) is a `Piece`: the TP shard of one canonical
tensor. The canonical tensors are the unit of everything that crosses a process or a file:
loading from a relaxed HF checkpoint, the Megatron dist checkpoint (sharded_state_dict: one
ShardedTensor per canonical tensor, each stored once whatever the TP/PP layout) and the export
back to HF. They are the relaxed HF tensors except for q/k/v weights and biases, which are fused
as `...attn.qkv.*` in megatron's TP-independent layout, rows [q heads of g, k_g, v_g] for every
query group g (a TP rank holds an even slice of it, also when TP > groups). linear_fc1 rows are
[gate_i; up_i] on each TP rank, so gate and up are separate canonical tensors.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from megatron.core import parallel_state as ps

from ..hf.layout import lora_paths, shared_path, slot_path
from ..recursion.linears import ROW_PARALLEL, fc1
from .settings import RelaxedSettings

_NORMS = {"input_layernorm": "input_norm", "pre_mlp_layernorm": "post_norm"}


@dataclass(frozen=True)
class Piece:
    param: str  # local parameter name in the megatron model
    canon: str  # canonical tensor name
    tp_axis: int | None  # axis the canonical tensor is split on over TP; None: replicated
    part: str = ""  # "q"/"k"/"v" inside linear_qkv, "gate"/"up" inside linear_fc1, "" for the whole param
    main_stage: bool = True  # this pipeline stage holds the main copy (replicas are not saved twice)
    shared_layer: int | None = None  # a shared layer's own tensor (not a loop's): one parameter over its stages


def pieces(model, settings: RelaxedSettings) -> list[Piece]:
    pp_rank = ps.get_pipeline_model_parallel_rank()
    out: list[Piece] = []
    if getattr(model, "pre_process", False):
        out.append(Piece("embedding.word_embeddings.weight", "model.embed_tokens.weight", 0))
    if getattr(model, "post_process", False):
        out.append(Piece("decoder.final_norm.weight.shared", "model.norm.weight", None))
        if settings.norm_type == "layernorm":
            out.append(Piece("decoder.final_norm.bias.shared", "model.norm.bias", None))
        if not settings.tie_word_embeddings:
            out.append(Piece("output_layer.weight", "lm_head.weight", 0))
        elif not model.pre_process:  # the last stage's copy of the tied embedding
            out.append(Piece("output_layer.weight", "model.embed_tokens.weight", 0, main_stage=False))
    params = dict(model.named_parameters())
    for name in params:
        m = re.match(r"decoder\.layers\.(\d+)\.(.+)$", name)
        if m:
            k = model.decoder.shared_ids[int(m.group(1))]
            out.extend(_layer_pieces(name, k, m.group(2), settings, pp_rank))
    return out


@dataclass(frozen=True)
class LayerParam:
    """One kind of Megatron layer parameter: its name below decoder.layers.{i}., the canonical tensor
    it holds (an hf.layout path of the shared layer k or the unrolled layer l) and its TP split."""
    megatron: str  # {norm} {kind} {linear} {loop} {mod}: see _FIELDS
    path: str  # shared | slot | lora_A | lora_B (hf.layout.shared_path, slot_path, lora_paths)
    of: str  # the path's argument; {cnorm}: the canonical norm, {mod}: each module the parameter holds
    split: tuple[int | None, int | None]  # TP axis in a column-parallel linear, in a row-parallel one


# Every parameter of a Megatron layer, the one table that loading, saving, export, the gradient
# contracts and the gradient-norm flags read. A fused linear holds several canonical modules
# (linear_qkv: q, k, v as one `qkv` tensor; linear_fc1: gate and up, separate); LoRA stays per module.
LAYER_PARAMS = (
    LayerParam("{norm}.{kind}.shared", "shared", "{cnorm}.{kind}", (None, None)),
    LayerParam("{norm}.{kind}.{loop}", "slot", "{cnorm}.{kind}", (None, None)),
    LayerParam("{linear}.weight", "shared", "{mod}.weight", (0, 1)),
    LayerParam("{linear}.bias", "shared", "{mod}.bias", (0, None)),
    LayerParam("{linear}.loop_bias.{loop}", "slot", "{mod}.bias", (0, None)),
    LayerParam("{linear}.lora.lora_A.{mod}_{loop}", "lora_A", "{mod}", (None, 1)),
    # (q/k/v's LoRA B is replicated where TP does not split the key/value heads: see _layer_pieces)
    LayerParam("{linear}.lora.lora_B.{mod}_{loop}", "lora_B", "{mod}", (0, None)),
)
_FIELDS = {"norm": "|".join(_NORMS), "kind": "weight|bias", "linear": r"[a-z_]+\.linear_[a-z0-9]+",
           "loop": r"\d+", "mod": "[a-z]+"}
_PATTERNS = [(re.compile(re.sub(r"\\\{(\w+)\\\}", lambda m: f"(?P<{m.group(1)}>{_FIELDS[m.group(1)]})",
                                re.escape(row.megatron))), row) for row in LAYER_PARAMS]


def _layer_pieces(name: str, k: int, rest: str, s: RelaxedSettings, pp_rank: int) -> list[Piece]:
    main = min(s.stages_holding(k)) == pp_rank
    for pattern, row in _PATTERNS:
        m = pattern.fullmatch(rest)
        if m is None:
            continue
        f = m.groupdict()
        held = _linears(s).get(f.get("linear"), ()) if "linear" in f else ()
        if "linear" in f and not held:
            continue
        l = s.plan.unrolled_index(k, int(f["loop"])) if "loop" in f else None
        if "norm" in f:
            mods, parts = [None], [""]
        elif "mod" in f:
            mods, parts = [f["mod"]], [""]
        elif held == ("q", "k", "v"):
            mods, parts = ["qkv"], [""]
        else:
            mods, parts = list(held), list(held) if len(held) > 1 else [""]
        row_parallel = bool(held) and held[0] in ROW_PARALLEL
        axis = row.split[1] if row_parallel else row.split[0]
        out = []
        for mod, part in zip(mods, parts):
            of = row.of.format(cnorm=_NORMS.get(f.get("norm")), kind=f.get("kind"), mod=mod)
            tp_axis = axis
            if row.path == "lora_B" and mod in ("q", "k", "v") and s.num_key_value_heads % s.layout.tp != 0:
                tp_axis = None
            if row.path == "shared":
                out.append(Piece(name, shared_path(k, of), tp_axis, part, main, k))
            elif row.path == "slot":
                out.append(Piece(name, slot_path(l, of), tp_axis, part))
            else:
                out.append(Piece(name, lora_paths(l, of)[row.path == "lora_B"], tp_axis, part))
        return out
    raise KeyError(f"no canonical tensor for megatron parameter {name}")


def _linears(s: RelaxedSettings) -> dict[str, tuple[str, ...]]:
    return {"self_attention.linear_qkv": ("q", "k", "v"), "self_attention.linear_proj": ("o",),
            "mlp.linear_fc1": fc1(s.gated), "mlp.linear_fc2": ("down",)}


# -- local slices ---------------------------------------------------------------------------------
def local_view(piece: Piece, param: torch.Tensor) -> torch.Tensor:
    """The part of a local parameter that is this rank's shard of the piece's canonical tensor."""
    if piece.part in ("gate", "up"):
        half = param.shape[0] // 2
        return param[:half] if piece.part == "gate" else param[half:]
    return param


def local_shard(piece: Piece, param: torch.Tensor) -> torch.Tensor:
    """This rank's shard of the canonical tensor (a copy)."""
    return local_view(piece, param).clone()


def set_local_shard(piece: Piece, param: torch.Tensor, shard: torch.Tensor) -> None:
    v = local_view(piece, param)
    with torch.no_grad():
        v.copy_(shard.reshape(v.shape).to(v.dtype))


# -- fused q/k/v ----------------------------------------------------------------------------------
# model.layers.{k}.attn.qkv.{weight,bias} and model.relax.{l}.bias.qkv, and their q/k/v members
_FUSED = re.compile(r"(.*\.attn\.)qkv(\.(?:weight|bias))$|(.*\.bias\.)qkv()$")
_MEMBER = re.compile(r"(.*\.attn\.)[qkv](\.(?:weight|bias))$|(.*\.bias\.)[qkv]()$")


def _head_tail(m: re.Match) -> tuple[str, str]:
    return (m.group(1), m.group(2)) if m.group(1) is not None else (m.group(3), m.group(4))


def qkv_members(name: str) -> list[str] | None:
    """The q, k, v tensor names behind a fused qkv name; None for any other name."""
    m = _FUSED.match(name)
    if not m:
        return None
    head, tail = _head_tail(m)
    return [f"{head}{x}{tail}" for x in "qkv"]


def fused_name(name: str) -> str:
    """The fused qkv name of a q/k/v tensor name; other names unchanged."""
    m = _MEMBER.match(name)
    if not m:
        return name
    head, tail = _head_tail(m)
    return f"{head}qkv{tail}"


def fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, groups: int) -> torch.Tensor:
    """[q heads of g, k_g, v_g] for every query group g (megatron's linear_qkv rows)."""
    parts = [t.reshape(groups, -1, *t.shape[1:]) for t in (q, k, v)]
    return torch.cat(parts, dim=1).reshape(-1, *q.shape[1:])


def split_qkv(fused: torch.Tensor, groups: int, q_rows: int, kv_rows: int) -> tuple[torch.Tensor, ...]:
    per = fused.reshape(groups, -1, *fused.shape[1:])
    q, k, v = per.split([q_rows // groups, kv_rows // groups, kv_rows // groups], dim=1)
    return tuple(t.reshape(-1, *fused.shape[1:]).contiguous() for t in (q, k, v))


def canonical_getter(get, groups: int):
    """Wraps a getter of relaxed HF tensors so that it also answers the fused `...qkv.*` names."""
    def canonical(name: str) -> torch.Tensor:
        members = qkv_members(name)
        if members is None:
            return get(name)
        return fuse_qkv(*(get(n) for n in members), groups)
    return canonical


def tp_slice(t: torch.Tensor, axis: int | None) -> torch.Tensor:
    if axis is None:
        return t
    tp, rank = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
    return t.chunk(tp, dim=axis)[rank]


def load_canonical(model, settings: RelaxedSettings, get) -> None:
    """Fill every parameter of the model from relaxed HF tensors; `get(name)` returns one (e.g.
    CheckpointReader.get)."""
    params = dict(model.named_parameters())
    canonical = canonical_getter(get, settings.num_key_value_heads)
    filled = set()
    for piece in pieces(model, settings):
        set_local_shard(piece, params[piece.param], tp_slice(canonical(piece.canon), piece.tp_axis))
        filled.add(piece.param)
    missing = sorted(set(params) - filled)
    if missing:  # a model built without initialisation would keep whatever memory held
        raise RuntimeError(f"load_canonical: no checkpoint tensor for {', '.join(missing[:5])}")
