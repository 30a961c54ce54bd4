"""Which shared layer and which loop each unrolled layer of a recursive model is."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from ..errors import UserError


class Strategy(str, Enum):
    # CYCLE: (0..K-1), (0..K-1), ...   paper Eq. 2: unrolled l uses shared l mod K
    CYCLE = "cycle"
    # SEQUENCE: (0,0,..), (1,1,..), ... each shared layer runs B times in a row
    SEQUENCE = "sequence"


class PlanError(UserError):
    pass


@dataclass(frozen=True)
class SharingPlan:
    """L unrolled layers = K shared layers x B loops."""

    num_layers: int  # L, depth of the source model (and of the unrolled recursive model)
    num_loops: int  # B
    strategy: Strategy = Strategy.CYCLE

    def __post_init__(self) -> None:
        object.__setattr__(self, "strategy", Strategy(self.strategy))
        if self.num_layers < 1:
            raise PlanError(f"num_layers must be >= 1, got {self.num_layers}")
        if self.num_loops < 1:
            raise PlanError(f"loops must be >= 1, got {self.num_loops}")
        if self.num_layers % self.num_loops:
            divisors = [b for b in range(1, self.num_layers + 1) if self.num_layers % b == 0]
            raise PlanError(
                f"loops={self.num_loops} does not divide the source's {self.num_layers} layers; "
                f"choose one of {divisors}"
            )

    @property
    def num_shared(self) -> int:
        """K, the number of unique (physical) layers."""
        return self.num_layers // self.num_loops

    def shared_index(self, unrolled: int) -> int:
        self._check(unrolled)
        if self.strategy is Strategy.CYCLE:
            return unrolled % self.num_shared
        return unrolled // self.num_loops

    def loop_index(self, unrolled: int) -> int:
        self._check(unrolled)
        if self.strategy is Strategy.CYCLE:
            return unrolled // self.num_shared
        return unrolled % self.num_loops

    def unrolled_index(self, shared: int, loop: int) -> int:
        if self.strategy is Strategy.CYCLE:
            return loop * self.num_shared + shared
        return shared * self.num_loops + loop

    def tied_layers(self, shared: int) -> list[int]:
        """Unrolled (= source) layers that run shared layer `shared`, in loop order."""
        return [self.unrolled_index(shared, b) for b in range(self.num_loops)]

    def stage_layers(self, pp: int, stage: int) -> range:
        """Unrolled layers of pipeline stage `stage` of `pp` (an even split)."""
        per = self.num_layers // pp
        return range(stage * per, (stage + 1) * per)

    def loop_end(self, unrolled: int) -> int | None:
        """The loop that ends after unrolled layer `unrolled`, where an early exit can read the hidden
        state; None inside a loop. Only CYCLE has loop ends before the last layer: a SEQUENCE model's
        hidden state is a full pass of the model only after its last layer."""
        self._check(unrolled)
        if self.strategy is Strategy.CYCLE and (unrolled + 1) % self.num_shared == 0:
            return unrolled // self.num_shared
        return self.num_loops - 1 if unrolled == self.num_layers - 1 else None

    def exit_layers(self) -> list[int]:
        """The unrolled layer each loop ends after, first loop first: where its early exit reads the
        hidden state. Only CYCLE models with 2 or more loops have early exits."""
        if self.strategy is not Strategy.CYCLE or self.num_loops < 2:
            raise PlanError(f"early exits need a CYCLE model with 2 or more loops; this one has {self.num_loops} "
                            f"loop(s), {self.strategy.value}")
        return [l for l in range(self.num_layers) if self.loop_end(l) is not None]

    def layout(self) -> list[tuple[int, int]]:
        """(shared, loop) for every unrolled layer, in execution order."""
        return [(self.shared_index(l), self.loop_index(l)) for l in range(self.num_layers)]

    def _check(self, unrolled: int) -> None:
        if not 0 <= unrolled < self.num_layers:
            raise IndexError(f"unrolled layer {unrolled} out of range [0, {self.num_layers})")
