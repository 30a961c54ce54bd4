"""Per-GPU memory and time of an uptraining run, from its config alone (`relaxrec plan`).

Parameters and optimizer state are counted the way the trainer allocates them: megatron-core's
tensor-parallel splits (column-parallel q/k/v/gate/up with LoRA B split, row-parallel o/down with
LoRA A split, vocab-parallel embedding and head), each pipeline stage holding the shared layers its
unrolled layers use, and DeepSpeed's flat fp32 partitions, padded per parameter group to a multiple
of 2 x DP elements. Gradients, activations and logits are estimates of what stays alive at the peak
of a step; the formulas are stated next to each term.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from ..recursion import SharingPlan
from ..recursion.linears import ROW_PARALLEL
from ..recursion.params import LayerShapes

DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
ZERO_ALIGNMENT = 2  # DeepSpeed's nccl_start_alignment_factor: a group is padded to 2 x DP elements
REDUCE_BUCKET = 500_000_000  # reduce_bucket_size (elements): DeepSpeed's default, set by the trainer


@dataclass(frozen=True)
class Gpu:
    name: str
    memory_gb: float  # vendor GB (1e9 bytes)
    peak_bf16: float  # dense FLOP/s


GPUS = {"h100": Gpu("H100 SXM", 80, 989e12), "h200": Gpu("H200", 141, 989e12),
        "a100": Gpu("A100 80GB", 80, 312e12), "b200": Gpu("B200", 180, 2250e12)}
USABLE = 0.9  # the rest: CUDA context, NCCL buffers, allocator fragmentation


@dataclass(frozen=True)
class Model:
    """What sizes a model: its layer shapes, its recursion and its LoRA ranks."""

    shapes: LayerShapes
    plan: SharingPlan
    ranks: dict[str, int] = field(default_factory=dict)
    share_norms: bool = True
    share_biases: bool = True


@dataclass(frozen=True)
class Layout:
    tp: int = 1
    pp: int = 1
    dp: int = 1
    sequence_parallel: bool = False


def param_groups(m: Model, lay: Layout, stage: int) -> tuple[int, int]:
    """(weight-decay, no-decay) parameter elements on one rank of `stage`: the trainer's two AdamW
    groups (matrices; vectors and norms)."""
    s, tp = m.shapes, lay.tp
    layers = m.plan.stage_layers(lay.pp, stage)
    shared = {m.plan.shared_index(l) for l in layers}
    norm = s.hidden * (2 if s.norm_has_bias else 1)
    matrices = len(shared) * sum(o * i for o, i in s.linears.values()) // tp
    for mod, r in m.ranks.items():  # A: r x d_in, B: d_out x r; the parallel dimension is split
        o, i = s.linears[mod]
        r = min(r, o, i)
        matrices += len(layers) * (r * i // tp + o * r if mod in ROW_PARALLEL else r * i + o * r // tp)
    bias = sum(o // (1 if mod in ROW_PARALLEL else tp) for mod, (o, _) in s.linears.items() if s.linear_bias.get(mod))
    vectors = (len(shared) if m.share_biases else len(layers)) * bias
    vectors += (len(shared) if m.share_norms else len(layers)) * 2 * norm
    first, last = stage == 0, stage == lay.pp - 1
    embedding = s.vocab // tp * s.hidden
    matrices += embedding * (first + (last and (not s.tied_embeddings or lay.pp > 1)))
    vectors += norm if last else 0
    return matrices, vectors


def params(m: Model, lay: Layout, stage: int) -> int:
    return sum(param_groups(m, lay, stage))


def zero_partition(numel: int, dp: int) -> int:
    """Elements of one DP rank's share of a flat group (DeepSpeed pads the group to 2 x DP)."""
    align = ZERO_ALIGNMENT * dp
    return math.ceil(numel / align) * align // dp


def optimizer_bytes(m: Model, lay: Layout, stage: int, zero_stage: int) -> dict:
    """fp32 master weights (ZeRO 1/2 always keep a flat fp32 copy, sharded over DP) and Adam's two fp32
    moments, on one rank."""
    groups = [g for g in param_groups(m, lay, stage) if g]
    if zero_stage == 0:
        per_rank, master = sum(groups), 0
    else:
        per_rank = sum(zero_partition(g, lay.dp) for g in groups)
        master = 4 * per_rank
    return {"master": master, "moments": 2 * 4 * per_rank}


def gradient_bytes(n: int, dtype: str, dp: int, zero_stage: int) -> int:
    """ZeRO 0: .grad beside each weight. ZeRO 1: bf16/fp16 accumulate in one full fp32 buffer
    (BF16_Optimizer), fp32 in .grad. ZeRO 2: the fp32 shard plus two reduce buckets in the model dtype
    (overlap_comm fills one while the other is reduced; DeepSpeed allocates them whole)."""
    b = DTYPE_BYTES[dtype]
    if zero_stage == 0:
        return b * n
    if zero_stage == 1:
        return 4 * n
    return 4 * zero_partition(n, dp) + 2 * b * REDUCE_BUCKET


def dp_traffic(groups: tuple[int, ...], dtype: str, reduce_dtype: str, dp: int, zero_stage: int,
               micro_batches: int) -> dict:
    """Bytes one rank hands to DeepSpeed's data-parallel collectives in one step ("bytes") and sends for
    them with ring algorithms ("wire"; training.comms counts both in a run). ZeRO 0 and 1 all-reduce the
    accumulated gradients once, at step(); ZeRO 2 all-reduces each micro-batch's gradients during its
    backward. ZeRO 1 and 2 then all-gather the updated weights (padded groups) in the model dtype.
    reduce_dtype "model" reduces in the model dtype, "fp32" in fp32. "overlapped": the wire bytes sent
    while backward runs (ZeRO 2's reduction, overlap_comm); the rest waits in step()."""
    if dp < 2:
        return {"bytes": 0, "wire": 0.0, "overlapped": 0.0}
    b = DTYPE_BYTES[dtype]
    reduced = (4 if reduce_dtype == "fp32" else b) * sum(groups) * (micro_batches if zero_stage == 2 else 1)
    gathered = 0 if zero_stage == 0 else b * dp * sum(zero_partition(g, dp) for g in groups if g)
    reduced_wire = reduced * 2 * (dp - 1) / dp
    return {"bytes": reduced + gathered, "wire": reduced_wire + gathered * (dp - 1) / dp,
            "overlapped": reduced_wire if zero_stage == 2 else 0.0}


def layer_activation_elements(s: LayerShapes, ranks: dict[str, int], tokens: int, lay: Layout) -> int:
    """Elements one unrolled layer keeps for backward, for `tokens` tokens of one micro-batch, with
    fused (flash/SDPA) attention: norm inputs and outputs, q/k/v, attention output, MLP hidden and
    activation, and each LoRA's r-wide A output. Hidden-sized tensors split over TP only under SP."""
    tp = lay.tp
    hidden_split = tp if lay.sequence_parallel else 1
    q, k, v = (s.linears[x][0] for x in ("q", "k", "v"))
    f = s.linears["up"][0]
    mlp = f * (3 if "gate" in s.linears else 2)  # fc1 output (gate and up) and the activation
    per_token = 4 * s.hidden / hidden_split + (q + k + v + q + mlp) / tp + sum(min(r, *s.linears[x]) for x, r in ranks.items())
    return int(tokens * per_token)


def activation_bytes(m: Model, lay: Layout, stage: int, micro_batch: int, seq: int, dtype: str, recompute: bool,
                     micro_batches: int) -> int:
    """The student's saved activations on `stage` at the peak of 1F1B: stage p holds min(pp - p,
    micro-batches) micro-batches in flight. With recompute only each layer's input is kept, plus one
    layer's activations while it is recomputed."""
    b = DTYPE_BYTES[dtype]
    tokens = micro_batch * seq
    layers = len(m.plan.stage_layers(lay.pp, stage))
    in_flight = min(lay.pp - stage, micro_batches)
    one_layer = layer_activation_elements(m.shapes, m.ranks, tokens, lay)
    if recompute:
        hidden = tokens * m.shapes.hidden // (lay.tp if lay.sequence_parallel else 1)
        return b * (in_flight * layers * hidden + one_layer)
    return b * in_flight * layers * one_layer


def logits_bytes(s: LayerShapes, micro_batch: int, seq: int, dtype: str, tp: int, kd: bool,
                 chunk_bytes: int = 128 << 20, earlier_exits: int = 0) -> int:
    """Last stage, vocab-parallel logits of one micro-batch at the end of the forward, where the loss
    peaks. Every loss is training.kd's chunked one on the LM head's output as it is (no fp32 or
    transposed copy): the student's logits and their gradient buffer in the model dtype, under KD
    the teacher's logits too, plus the fp32 chunks of `chunk_bytes` the kernel works in (four with a
    teacher, two without). Each earlier loop's exit (training.objective) adds its logits and gradient
    buffer. tools/bench_kd.py measures it."""
    elements = micro_batch * seq * (s.vocab // tp)
    one = elements * DTYPE_BYTES[dtype]
    chunks = (4 if kd or earlier_exits else 2) * min(chunk_bytes, 4 * elements)
    return (3 if kd else 2) * one + chunks + earlier_exits * 2 * one
