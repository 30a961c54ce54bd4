"""Gradient contracts the optimizer step relies on, for the relaxed recursive model.

1. A shared layer replicated on several pipeline stages is one parameter: its gradients are
   summed over the stages that hold it, so the replicas stay identical after every step.
2. Parameters whose gradient is a partial sum over tensor-parallel ranks (row-parallel LoRA B,
   LoRA A and norms under sequence parallelism) are summed over TP.
3. Tied word embeddings on the first and last stage are summed over the embedding group.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

from ..parallel.distributed import subgroup


def shared_layer_groups(settings) -> dict[int, object]:
    """shared layer -> process group of this rank's pipeline peers that hold it (collective: all ranks call)."""
    world = dist.get_world_size()
    my_pp = dist.get_process_group_ranks(ps.get_pipeline_model_parallel_group())
    all_pp: list = [None] * world
    dist.all_gather_object(all_pp, my_pp)
    pp_groups = sorted({tuple(g) for g in all_pp})
    stage_sets = sorted({tuple(settings.stages_holding(k)) for k in range(settings.plan.num_shared)})
    mine: dict[tuple[int, ...], object] = {}
    for group in pp_groups:
        for stages in stage_sets:
            if len(stages) < 2:
                continue
            ranks = tuple(group[s] for s in stages)
            made = subgroup(ranks)
            if dist.get_rank() in ranks:
                mine[stages] = made
    return {k: mine[tuple(settings.stages_holding(k))] for k in range(settings.plan.num_shared)
            if len(settings.stages_holding(k)) > 1 and tuple(settings.stages_holding(k)) in mine}


def accumulated_grad(p: torch.nn.Parameter) -> torch.Tensor | None:
    """Where the optimizer reads p's gradient: megatron's fp32 main_grad, DeepSpeed BF16_Optimizer's
    fp32 buffer (`_hp_grad`, filled as gradients arrive with immediate_grad_update), else .grad."""
    for attr in ("main_grad", "_hp_grad"):
        g = getattr(p, attr, None)
        if g is not None:
            return g
    return p.grad


def grad_contracts(model, settings, groups: dict[int, object]) -> list[tuple[torch.nn.Parameter, list]]:
    """The reductions above as a list built once: (parameter, the groups its accumulated gradient is
    all-reduced over, in order), for the parameters that have any."""
    from ..model.state_adapter import pieces

    tp_parallel = ps.get_tensor_model_parallel_world_size() > 1
    shared = {piece.param: piece.shared_layer for piece in pieces(model, settings) if piece.shared_layer is not None}
    tp_summed = {id(p) for m in model.modules() for p in getattr(m, "tp_summed_grads", ())}  # LoRA's partial sums
    contracts: dict[int, tuple[torch.nn.Parameter, list]] = {}
    for name, p in model.named_parameters():
        over = []
        if shared.get(name) in groups:
            over.append(groups[shared[name]])
        if tp_parallel and (id(p) in tp_summed or
                            (getattr(p, "sequence_parallel", False) and model.config.sequence_parallel)):
            over.append(ps.get_tensor_model_parallel_group())
        if over:
            contracts[id(p)] = (p, over)
    if settings.tie_word_embeddings and ps.get_pipeline_model_parallel_world_size() > 1 \
            and (model.pre_process or model.post_process):
        w = model.shared_embedding_or_output_weight()
        contracts.setdefault(id(w), (w, []))[1].append(ps.get_embedding_group())
    return list(contracts.values())


def apply_contracts(contracts: list[tuple[torch.nn.Parameter, list]]) -> None:
    """One step's reductions, on whichever buffer holds each gradient now (accumulated_grad)."""
    for p, over in contracts:
        g = accumulated_grad(p)
        if g is not None:
            for group in over:
                dist.all_reduce(g, group=group)


def finalize_grads(model, settings, groups: dict[int, object]) -> None:
    """grad_contracts and apply_contracts in one call."""
    apply_contracts(grad_contracts(model, settings, groups))


def mark_unique_for_norms(model, settings) -> None:
    """DeepSpeed's global gradient norm sums every parameter flagged model-parallel on every rank of
    the TP x PP group, and the others on its rank 0 only. Flag exactly the copies to count once:
    TP shards on every TP rank, TP-replicated tensors on TP rank 0, and a shared layer replicated
    over pipeline stages on its first stage only."""
    from ..model.state_adapter import pieces

    tp_rank = ps.get_tensor_model_parallel_rank()
    params = dict(model.named_parameters())
    for piece in pieces(model, settings):
        counted = piece.main_stage and (piece.tp_axis is not None or tp_rank == 0)
        p = params[piece.param]
        p.model_parallel = counted
        p.tensor_model_parallel = counted and piece.tp_axis is not None
