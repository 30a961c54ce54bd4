"""What a depth-wise step costs, and which loops a step runs.

A decode step at serving batch sizes is memory-bound: it costs the weight bytes it reads, nearly
whatever the number of rows (on a CPU and on a GPU alike). A depth-wise step reads the shared layers
once, the LoRA factors of every loop it runs, and the LM head when a row there may emit. Rows at
different loops therefore share a step only at the price of another loop's LoRA, which at rank 64 on
SmolLM2 is 18% of the shared layer; a step that runs all B loops reads (S + B L) where one loop
reads (S + L). So the engine picks, each step, the loops whose rows it serves (choose_loops): the set
with the most rows per byte read. Rows at the other loops wait, at most `max_wait` steps in a row.
With rare exits this keeps rows in step (an exited row waits for the others to come round) and a
step reads one loop's LoRA; with frequent exits nearly every step runs every loop. The tokens are
those of any other order: a row's computation does not depend on which step runs it.
"""

from __future__ import annotations

from dataclasses import dataclass

SCHEDULES = ("bytes", "all")


def max_wait(loops: int) -> int:
    """Steps in a row a row may be left out: B - 1, so it runs at least once per B steps."""
    return max(loops - 1, 1)


def step_loops(rows: list[tuple[int, bool, int]], loops: int, cost: "StepCost", schedule: str) -> set[int]:
    """The loops a depth-wise step runs, from each row's (loop, calls the LM head if run, steps waited):
    every loop present ("all"), or choose_loops' pick ("bytes"), which holds the loop of every row that
    has waited max_wait steps. The engine and the simulation both decide here."""
    present = {loop for loop, _, _ in rows}
    if schedule == "all" or len(present) == 1:
        return present
    rows_at = {b: sum(loop == b for loop, _, _ in rows) for b in present}
    head_at = {loop for loop, head, _ in rows if head}
    must = {loop for loop, _, waited in rows if waited >= max_wait(loops)}
    return choose_loops(rows_at, head_at, must, cost)


@dataclass
class StepCost:
    """What one block pass costs. The paper's model: the layers it runs (shared = K, the rest 0). The
    memory-bound model (weight_bytes): the shared layers once, `lora` for each loop it runs (one loop's
    LoRA factors over the K shared layers), `head` when a row emits (the bf16 screen where
    head.ScreenedHead runs, else the head itself)."""
    shared: float
    lora: float = 0.0
    head: float = 0.0


def weight_bytes(w) -> StepCost:
    """The memory-bound StepCost of EngineWeights w."""
    from .head import ScreenedHead

    shared = lora = 0
    for layer in w.layers:
        for p in layer.projections.values():
            shared += sum(m.weight.nbytes + (0 if m.bias is None else m.bias.nbytes) for m in p.modules.values())
            if p.rank:
                lora += (p.lora_A.nbytes + sum(Bt.nbytes for Bt in p.lora_Bt if Bt is not None)) / p.loops
    head = w.lm_head.nbytes // 2 if ScreenedHead.available(w.lm_head) else w.lm_head.nbytes
    return StepCost(shared, lora, head)


def choose_loops(rows_at: dict[int, int], head_at: set[int], must: set[int], cost: StepCost) -> set[int]:
    """The loops to run: of the sets of loops present (keys of rows_at: loop -> rows there) that hold
    `must`, the one serving the most rows per unit of cost; a step pays `head` if it runs a loop of
    head_at (whose rows emit or decide an exit). Ties go to the larger set (less waiting).

    Exact without trying every set: among sets of one size that all pay the head, or all do not, the
    best holds `must` and the other loops with the most rows; so sizes times {head, no head} suffice."""
    best, best_value = set(rows_at), -1.0
    for with_head in (False, True):
        allowed = [b for b in rows_at if with_head or b not in head_at]
        if not must <= set(allowed):
            continue
        others = sorted((b for b in allowed if b not in must), key=lambda b: -rows_at[b])
        for size in range(len(others), -1, -1):
            loops = must | set(others[:size])
            if not loops:
                continue
            spent = cost.shared + cost.lora * len(loops) + (cost.head if loops & head_at else 0.0)
            value = sum(rows_at[b] for b in loops) / spent
            better = value > best_value * (1 + 1e-9)
            tie_but_larger = value >= best_value * (1 - 1e-9) and len(loops) > len(best)
            if better or tie_but_larger:
                best, best_value = loops, value
    return best
