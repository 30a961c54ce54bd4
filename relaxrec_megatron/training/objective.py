"""The training objective, computed on the last pipeline stage, and what travels between stages for it.

Per token:
- uptraining: the cross entropy on the labels, or with KD
  alpha * CE + (1 - alpha) * T^2 * KL(teacher_T || student_T), vocab-parallel (training.kd);
- early exits (`exit.enabled`): the loss is sum_b w_b * L_b over the loops' exits, an exit being the
  shared final norm and LM head applied to the hidden state at the end of loop b. L_last is the
  uptraining loss above; an earlier L_b is CE on the labels, or
  alpha_e * CE + (1 - alpha_e) * T_e^2 * KL(target_T || exit_T) with the detached final-loop logits or
  the teacher's as target. Each exit's CE is reported as that loop's loss.

Pipeline: each stage holds its stage of the student and, under KD, of the frozen teacher (same TP/PP
layout). Between stages travel, concatenated on the sequence axis so that megatron's schedules send
one tensor: the student's hidden state; with exits, the hidden states at the ends of the earlier loops
(model.gpt: zeros until the stage that ends a loop fills its slot; their gradients flow back with the
activations'); under KD, the teacher's hidden state, which carries no gradient (zeros in backward, the
price of one schedule for both models). That is (1 + (loops - 1) + KD) (s, b, h) tensors per
micro-batch instead of one (`tensors_between_stages`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from megatron.core import parallel_state as ps
from torch import nn

from .config import ExitConfig, KDConfig
from .kd import distillation_loss


@dataclass
class LossParts:
    """The objective's losses, per token (b, s) as the last stage computes them, or reduced to one value
    each (`masked_mean`, `mean`): the loss that is back-propagated, the final loop's cross entropy and
    KL to the teacher (None without KD), and with early exits each loop's exit cross entropy (the last
    one is the final loop's)."""

    loss: torch.Tensor
    lm: torch.Tensor
    kd: torch.Tensor | None = None
    loops: list[torch.Tensor] = field(default_factory=list)

    def masked_mean(self, mask: torch.Tensor) -> LossParts:
        """Each part's mean over the masked tokens, in fp32; the loss keeps its graph, the rest is detached."""
        mean = lambda t: (t.float() * mask).sum() / mask.sum().clamp_min(1)
        return LossParts(mean(self.loss), mean(self.lm).detach(), None if self.kd is None else mean(self.kd).detach(),
                         [mean(c).detach() for c in self.loops])

    @staticmethod
    def mean(parts: list[LossParts]) -> LossParts:
        """Mean of each part over micro-batches (float64, detached)."""
        avg = lambda ts: torch.stack([t.detach().double() for t in ts]).mean()
        kd = [p.kd for p in parts]
        return LossParts(avg([p.loss for p in parts]), avg([p.lm for p in parts]),
                         None if kd[0] is None else avg(kd), [avg(c) for c in zip(*(p.loops for p in parts))])

    def packed(self, loops: int) -> torch.Tensor:
        """(loss, lm, kd, each loop's) as one float64 vector (kd 0 without KD), for one all-reduce."""
        zero = torch.zeros((), dtype=torch.float64, device=self.loss.device)
        kd = zero if self.kd is None else self.kd
        return torch.stack([self.loss, self.lm, kd, *(self.loops or [zero] * loops)]).double()

    @staticmethod
    def unpacked(values: list[float]) -> dict[str, float]:
        """The record keys of a packed vector's values: loss, lm_loss, kd_loss, loop{b}_loss."""
        loss, lm, kd, *loops = values
        return {"loss": loss, "lm_loss": lm, "kd_loss": kd, **{f"loop{b + 1}_loss": v for b, v in enumerate(loops)}}


class Objective(nn.Module):
    def __init__(self, student, teacher=None, kd: KDConfig | None = None, exit: ExitConfig | None = None):
        super().__init__()
        self.student = student
        self.teacher = [teacher] if teacher is not None else []  # a list: not a submodule, not in the checkpoint
        if teacher is not None:
            teacher.eval()
            for p in teacher.parameters():
                p.requires_grad_(False)
        self.kd = kd if teacher is not None else None
        self.exit = exit if exit is not None and exit.enabled else None
        self.weights: list[float] | None = None
        if self.exit is not None:
            plan = student.settings.plan
            plan.exit_layers()  # a CYCLE model with 2 or more loops (also for a run from model.relaxed)
            self.weights = self.exit.loop_weights(plan.num_loops)
            if student.loop_exits != plan.num_loops - 1:
                raise ValueError(f"early-exit training needs a student built with loop_exits={plan.num_loops - 1}")
        self.tensors_between_stages = 1 + student.loop_exits + len(self.teacher)
        self.config, self.model_type = student.config, student.model_type
        self.pre_process, self.post_process = student.pre_process, student.post_process

    def set_input_tensor(self, input_tensor) -> None:
        if isinstance(input_tensor, (list, tuple)):
            input_tensor = input_tensor[0]
        if input_tensor is None or not self.teacher:
            self.student.set_input_tensor(input_tensor)
            if self.teacher:
                self.teacher[0].set_input_tensor(None)
            return
        n = input_tensor.shape[0] // self.tensors_between_stages
        student_part, teacher_part = input_tensor.split([input_tensor.shape[0] - n, n], dim=0)
        self.student.set_input_tensor(student_part)
        self.teacher[0].set_input_tensor(teacher_part.detach())

    def forward(self, tokens: torch.Tensor, labels: torch.Tensor | None = None, **kwargs):
        """The LossParts per token (b, s) on the last stage; what travels to the next stage elsewhere.
        Every loss is training.kd's chunked vocab-parallel one, on the LM head's (s, b, vocab / TP)
        output as it is: no fp32 or transposed copy of a full-vocabulary tensor."""
        t_out = None
        if self.teacher:
            with torch.no_grad():
                t_out = self.teacher[0](tokens, sequence_first=True)
        s_out = self.student(tokens, sequence_first=True)
        if not self.post_process:
            return s_out if t_out is None else torch.cat([s_out, t_out], dim=0)
        loops = s_out if self.weights is not None else None  # every loop's logits
        final = s_out if loops is None else loops[-1]
        group, labels_sb = ps.get_tensor_model_parallel_group(), labels.t()
        if t_out is not None:
            loss, ce, kl = distillation_loss(final, t_out, labels_sb, self.kd.alpha, self.kd.temperature, group)
        else:
            loss, ce, kl = distillation_loss(final, None, labels_sb, 1.0, 1.0, group)
            kl = None
        kd = None if kl is None else kl.t()
        if loops is None:
            return LossParts(loss.t(), ce.t(), kd)
        exits = self._earlier_exits(loops, t_out, labels_sb, group)
        total = self.weights[-1] * loss.t()
        for w, (lb, _) in zip(self.weights, exits):
            total = total + w * lb
        return LossParts(total, ce.t(), kd, [ce_b for _, ce_b in exits] + [ce.t()])

    def _earlier_exits(self, loops, t_out, labels_sb, group) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(loss, CE) per token (b, s) of each earlier loop's exit."""
        e = self.exit
        target = {"final": loops[-1].detach(), "none": None, "teacher": t_out}[e.distill]
        out = []
        for logits in loops[:-1]:
            lb, ceb, _ = distillation_loss(logits, target, labels_sb, e.alpha, e.temperature, group)
            out.append((lb.t(), ceb.t()))
        return out
