"""The linears of a layer that recursion shares and LoRA relaxes, with their shapes and how tensor
parallelism splits them: the one definition hf/, model/, training/ and inference/ read.
(hf/modeling_relaxrec.py keeps its own copy, since it travels alone with each checkpoint; a test pins
the two together.)"""

from __future__ import annotations

ATTENTION = ("q", "k", "v", "o")
MLP = ("gate", "up", "down")
LINEARS = ATTENTION + MLP
COLUMN_PARALLEL = ("q", "k", "v", "gate", "up")  # d_out split over TP: LoRA A replicated, B split on rows
ROW_PARALLEL = ("o", "down")  # d_in split over TP: LoRA A split on columns, B replicated


def linears(gated: bool) -> tuple[str, ...]:
    """The layer's linears: a non-gated MLP (GPT-NeoX) has no gate."""
    return LINEARS if gated else tuple(m for m in LINEARS if m != "gate")


def fc1(gated: bool) -> tuple[str, ...]:
    """What megatron's fused first MLP linear (linear_fc1) holds, in its order."""
    return ("gate", "up") if gated else ("up",)


def linear_shapes(hidden: int, heads: int, kv_heads: int, head_dim: int, intermediate: int,
                  gated: bool) -> dict[str, tuple[int, int]]:
    """(d_out, d_in) of each linear of a layer."""
    q, kv, f = heads * head_dim, kv_heads * head_dim, intermediate
    shapes = {"q": (q, hidden), "k": (kv, hidden), "v": (kv, hidden), "o": (hidden, q), "gate": (f, hidden),
              "up": (f, hidden), "down": (hidden, f)}
    return {m: shapes[m] for m in linears(gated)}
