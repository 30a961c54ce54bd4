"""Knowledge distillation loss, vocab-parallel: no rank ever holds the full vocabulary.

loss = alpha * CE(student, labels) + (1 - alpha) * T^2 * KL(teacher_T || student_T)
per token, where x_T = softmax(logits / T). Logits are (..., vocab / TP) shards; the softmax
normaliser and the KL sum are reduced over the tensor-parallel group with three scalar-per-token
all-reduces (max, sum-exp of each model, and the KL partial sum).
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def _all_reduce(x: torch.Tensor, group) -> torch.Tensor:
    x = x.clone()
    if group is not None and dist.get_world_size(group) > 1:
        dist.all_reduce(x, group=group)
    return x


class _SumOfPartials(torch.autograd.Function):
    """The replicated loss from per-rank partial sums: all-reduce forward, identity backward."""

    @staticmethod
    def forward(ctx, x, group):
        return _all_reduce(x, group)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _SharedSum(torch.autograd.Function):
    """A sum every rank goes on to use (the softmax normaliser): all-reduce forward and backward,
    since every rank's loss depends on every rank's shard through it."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _all_reduce(x, group)

    @staticmethod
    def backward(ctx, grad):
        return _all_reduce(grad, ctx.group), None


def _all_reduce_max(x: torch.Tensor, group) -> torch.Tensor:
    x = x.detach().clone()
    if group is not None and dist.get_world_size(group) > 1:
        dist.all_reduce(x, op=dist.ReduceOp.MAX, group=group)
    return x


def vocab_parallel_log_softmax(logits: torch.Tensor, group) -> torch.Tensor:
    """log_softmax over the full (sharded) vocabulary, returned for the local shard."""
    logits = logits.float()
    m = _all_reduce_max(logits.max(dim=-1, keepdim=True).values, group)
    shifted = logits - m
    sum_exp = _SharedSum.apply(shifted.exp().sum(dim=-1, keepdim=True), group)
    return shifted - sum_exp.log()


def vocab_parallel_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float,
                      group) -> torch.Tensor:
    """KL(teacher_T || student_T) per token (summed over the full vocabulary)."""
    log_p_s = vocab_parallel_log_softmax(student_logits / temperature, group)
    with torch.no_grad():
        log_p_t = vocab_parallel_log_softmax(teacher_logits.detach() / temperature, group)
    partial = (log_p_t.exp() * (log_p_t - log_p_s)).sum(dim=-1)
    return _SumOfPartials.apply(partial, group)


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, ce_per_token: torch.Tensor,
                      alpha: float, temperature: float, group=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(combined per-token loss, KL per token). ce_per_token is the vocab-parallel CE of the student."""
    kl = vocab_parallel_kl(student_logits, teacher_logits, temperature, group)
    return alpha * ce_per_token + (1.0 - alpha) * temperature**2 * kl, kl
