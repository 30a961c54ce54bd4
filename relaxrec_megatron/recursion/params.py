"""Parameter counts of vanilla, recursive and relaxed recursive models, from shapes alone."""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class LayerShapes:
    linears: dict[str, tuple[int, int]]  # module -> (d_out, d_in)
    linear_bias: dict[str, bool]
    hidden: int
    norm_has_bias: bool
    vocab: int
    tied_embeddings: bool


@dataclass(frozen=True)
class ParamCounts:
    embedding: int  # input embedding (+ untied output head)
    linears: int  # unique linear weights + biases of the decoder layers
    norms: int  # decoder-layer norms + final norm
    lora: int

    @property
    def non_embedding(self) -> int:
        return self.linears + self.norms + self.lora

    @property
    def total(self) -> int:
        return self.embedding + self.non_embedding

    def as_dict(self) -> dict:
        return dict(asdict(self), non_embedding=self.non_embedding, total=self.total)


def lora_params(shapes: LayerShapes, ranks: dict[str, int]) -> int:
    """LoRA parameters of one unrolled layer; ranks are clipped to min(d_in, d_out)."""
    return sum(min(ranks.get(m, 0), min(o, i)) * (o + i) for m, (o, i) in shapes.linears.items())


def count_params(shapes: LayerShapes, num_layers: int, num_loops: int = 1, ranks: dict[str, int] | None = None,
                 share_norms: bool = True, share_biases: bool = True) -> ParamCounts:
    """num_loops=1 and no ranks is the vanilla model."""
    unique = num_layers // num_loops
    weights = sum(o * i for o, i in shapes.linears.values())
    biases = sum(o for m, (o, _) in shapes.linears.items() if shapes.linear_bias.get(m))
    norm = shapes.hidden * (2 if shapes.norm_has_bias else 1)
    return ParamCounts(
        embedding=shapes.vocab * shapes.hidden * (1 if shapes.tied_embeddings else 2),
        linears=unique * weights + (unique if share_biases else num_layers) * biases,
        norms=(unique if share_norms else num_layers) * 2 * norm + norm,
        lora=num_layers * lora_params(shapes, ranks or {}),
    )
