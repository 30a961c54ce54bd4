"""Knowledge distillation loss, vocab-parallel and chunked: no rank holds the full vocabulary, and
no full-size fp32 copy of the logits is kept.

loss = alpha * CE(student, labels) + (1 - alpha) * T^2 * KL(teacher_T || student_T)
per token, where x_T = softmax(logits / T). Logits are (..., vocab / TP) shards in the model's
dtype. The loss is computed over chunks of tokens: each chunk is cast to fp32 once, its softmax
normalisers and label logits are reduced over the tensor-parallel group (one MAX and two SUM
all-reduces of per-token scalars; no host synchronisation), and its gradient with respect to the
student's logits,

    alpha * (softmax(z) - onehot(label)) + (1 - alpha) * T * (softmax(z / T) - softmax(t / T)),

is written into one buffer of the logits' shape and dtype, which backward scales per token. Memory
beyond the two models' logits: that buffer and a few fp32 chunks of `chunk_bytes` each. At Gemma's
256K vocabulary and 8K tokens a micro-batch, the unchunked form holds several 8 GB fp32 copies
(tools/bench_kd.py measures both).
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def _all_reduce(x: torch.Tensor, group, op=dist.ReduceOp.SUM) -> torch.Tensor:
    if group is not None and dist.get_world_size(group) > 1:
        dist.all_reduce(x, op=op, group=group)
    return x


def _label_columns(y: torch.Tensor, first: int, vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Which labels fall in this shard's vocabulary, and their columns (n, 1), clamped into the shard
    for the others: gathers and scatters with these need no boolean indexing, which would wait for
    the device to count the selected rows."""
    local = (y >= first) & (y < first + vocab)
    return local, (y - first).clamp(0, vocab - 1)[:, None]


class _Distillation(torch.autograd.Function):
    @staticmethod
    def forward(ctx, student, teacher, labels, alpha: float, temperature: float, group, chunk_bytes: int):
        vocab = student.shape[-1]
        tp_rank = dist.get_rank(group) if group is not None and dist.get_world_size(group) > 1 else 0
        first = tp_rank * vocab  # this shard's vocabulary range: [first, first + vocab)
        if teacher is None:  # cross entropy alone
            return _Distillation._cross_entropy(ctx, student, labels, first, group, chunk_bytes)
        z_all, t_all, y_all = student.reshape(-1, vocab), teacher.reshape(-1, vocab), labels.reshape(-1)
        n = z_all.shape[0]
        stats = torch.empty(3, n, dtype=torch.float32, device=student.device)  # loss, ce, kl
        grad = torch.empty_like(z_all) if ctx.needs_input_grad[0] else None
        T = float(temperature)
        step = max(1, chunk_bytes // (4 * vocab))
        for a in range(0, n, step):
            b = min(n, a + step)
            # fp32 copies (also of fp32 inputs): they are shifted in place below
            z = z_all[a:b].to(torch.float32, copy=True)
            t = t_all[a:b].detach().to(torch.float32, copy=True)
            y = y_all[a:b]
            maxes = _all_reduce(torch.stack([z.max(-1).values, t.max(-1).values]), group, dist.ReduceOp.MAX)
            zc, tc = z.sub_(maxes[0, :, None]), t.sub_(maxes[1, :, None])  # <= 0: exp cannot overflow
            ez = zc.exp()
            ez_T = ez if T == 1.0 else (zc / T).exp_()
            et_T = tc.exp() if T == 1.0 else (tc / T).exp_()
            local, column = _label_columns(y, first, vocab)
            label_logit = torch.where(local, zc.gather(1, column).squeeze(1), 0.0)
            sums = _all_reduce(torch.stack([ez.sum(-1), ez_T.sum(-1), et_T.sum(-1), label_logit]), group)
            s_z, s_zT, s_tT = sums[0], sums[1], sums[2]
            # KL = sum_v p_t (log p_t - log p_s) = sum_v p_t (tc - zc) / T - log s_tT + log s_zT
            cross = _all_reduce(tc.sub_(zc).mul_(et_T).sum(-1) / (T * s_tT), group)  # in place: no fifth chunk
            kl = cross - s_tT.log() + s_zT.log()
            ce = s_z.log() - sums[3]
            stats[0, a:b] = alpha * ce + (1.0 - alpha) * T * T * kl
            stats[1, a:b], stats[2, a:b] = ce, kl
            if grad is not None:
                w_T = (1.0 - alpha) * T
                if T == 1.0:  # softmax(z) and softmax(z / T) coincide
                    g = ez.mul_(((alpha + w_T) / s_z)[:, None])
                else:
                    g = ez.mul_((alpha / s_z)[:, None]).add_(ez_T.mul_((w_T / s_zT)[:, None]))
                g.sub_(et_T.mul_((w_T / s_tT)[:, None]))
                g.scatter_add_(1, column, local.to(g.dtype)[:, None] * -alpha)
                grad[a:b] = g
        ctx.save_for_backward(grad)
        ce_out, kl_out = stats[1].view(labels.shape), stats[2].view(labels.shape)
        ctx.mark_non_differentiable(ce_out, kl_out)
        return stats[0].view(labels.shape), ce_out, kl_out

    @staticmethod
    def _cross_entropy(ctx, student, labels, first: int, group, chunk_bytes: int):
        vocab = student.shape[-1]
        z_all, y_all = student.reshape(-1, vocab), labels.reshape(-1)
        n = z_all.shape[0]
        ce = torch.empty(n, dtype=torch.float32, device=student.device)
        grad = torch.empty_like(z_all) if ctx.needs_input_grad[0] else None
        step = max(1, chunk_bytes // (4 * vocab))
        for a in range(0, n, step):
            b = min(n, a + step)
            zc = z_all[a:b].to(torch.float32, copy=True)
            y = y_all[a:b]
            zc.sub_(_all_reduce(zc.max(-1).values, group, dist.ReduceOp.MAX)[:, None])
            ez = zc.exp()
            local, column = _label_columns(y, first, vocab)
            label_logit = torch.where(local, zc.gather(1, column).squeeze(1), 0.0)
            sums = _all_reduce(torch.stack([ez.sum(-1), label_logit]), group)
            ce[a:b] = sums[0].log() - sums[1]
            if grad is not None:
                g = ez.div_(sums[0][:, None])
                g.scatter_add_(1, column, -local.to(g.dtype)[:, None])
                grad[a:b] = g
        ctx.save_for_backward(grad)
        ce_out = ce.view(labels.shape)
        reported, kl = ce_out.clone(), torch.zeros_like(ce_out)
        ctx.mark_non_differentiable(reported, kl)
        return ce_out, reported, kl

    @staticmethod
    def backward(ctx, grad_loss, _grad_ce, _grad_kl):
        (grad,) = ctx.saved_tensors  # scaled in place: the one gradient buffer is handed on
        grad.mul_(grad_loss.reshape(-1, 1).to(grad.dtype))
        return grad.view(*grad_loss.shape, -1), None, None, None, None, None, None


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor | None, labels: torch.Tensor,
                      alpha: float, temperature: float, group=None, chunk_bytes: int = 128 << 20
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(combined loss, CE, KL) per token from (..., vocab / TP) logit shards and (...) labels. Only the
    combined loss carries a gradient (to the student's logits); CE and KL are for reporting. Without
    teacher logits the loss is the cross entropy alone (alpha and temperature unused, KL 0)."""
    return _Distillation.apply(student_logits, teacher_logits, labels, float(alpha), float(temperature), group,
                               int(chunk_bytes))
