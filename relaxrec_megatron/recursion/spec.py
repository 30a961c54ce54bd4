"""What a relaxed recursive model is made of, as one typed spec: loops, sharing order, shared-layer
init, LoRA ranks and targets, shared or per-layer norms and biases. Conversion, the CLI and the
training configs (`model.recursion`) all build this one; a choice outside its enum, a rank below -1
or a malformed target list is refused where it is built."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

from ..errors import UserError
from .init import InitMethod
from .lora import LoraInit, clip_rank
from .plan import Strategy


def choice(enum: type[Enum], value, name: str):
    """value as a member of enum, or a one-line UserError naming `name` and the choices."""
    try:
        return enum(value)
    except ValueError:
        raise UserError(f"{name} must be one of {', '.join(m.value for m in enum)}, got {value!r}") from None


@dataclass
class RecursionSpec:
    loops: int = 2
    strategy: Strategy = Strategy.CYCLE
    init: InitMethod = InitMethod.AVERAGE
    rank: int = 0  # for every target module; -1 = full rank; 0 = pure recursive
    module_ranks: dict[str, int] = field(default_factory=dict)  # per-module overrides
    lora_init: LoraInit = LoraInit.SVD
    targets: tuple[str, ...] | None = None  # None: every linear of the architecture
    share_norms: bool = True
    share_biases: bool = True

    def __post_init__(self):
        """Each message starts with the field's name (a run config puts `model.recursion.` before it)."""
        self.strategy = choice(Strategy, self.strategy, "strategy")
        self.init = choice(InitMethod, self.init, "init")
        self.lora_init = choice(LoraInit, self.lora_init, "lora_init")
        if self.loops < 1:
            raise UserError(f"loops must be >= 1, got {self.loops}")
        if self.rank < -1:
            raise UserError(f"rank must be -1 (full), 0 (none) or a positive rank, got {self.rank}")
        if not isinstance(self.module_ranks, dict) or not all(
                isinstance(m, str) and isinstance(r, int) and r >= -1 for m, r in self.module_ranks.items()):
            raise UserError("module_ranks must map linear names to ranks >= -1 (e.g. {down: 128}), "
                            f"got {self.module_ranks!r}")
        if self.targets is not None:
            if not isinstance(self.targets, (list, tuple)) or not all(isinstance(t, str) for t in self.targets):
                raise UserError(f"targets must be a list of linear names (e.g. [q, v]), got {self.targets!r}")
            self.targets = tuple(self.targets)

    @classmethod
    def one_loop(cls) -> "RecursionSpec":
        """The source itself as a relaxed model (the KD teacher): one loop, every layer its own."""
        return cls(loops=1, init=InitMethod.LOWER, rank=0)

    def ranks(self, adapter) -> dict[str, int]:
        """Clipped rank per module of the adapter's architecture (hf.arch); modules with rank 0 are left out."""
        shapes = adapter.linear_shapes()
        model_type = adapter.cfg.get("model_type")
        for m in list(self.targets or []) + list(self.module_ranks):
            if m not in shapes:
                raise UserError(f"{model_type} has no {m!r} linear; its linears are {', '.join(shapes)}")
        targets = self.targets if self.targets is not None else tuple(shapes)
        ranks = {}
        for m in targets:
            r = clip_rank(self.module_ranks.get(m, self.rank), *shapes[m])
            if r > 0:
                ranks[m] = r
        return ranks
