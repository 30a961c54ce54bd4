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

import torch
from megatron.core import parallel_state as ps
from torch import nn

from .config import ExitConfig, KDConfig
from .kd import distillation_loss


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
            student.loop_exits = plan.num_loops - 1
        self.tensors_between_stages = 1 + student.loop_exits + len(self.teacher)
        self.config, self.model_type = student.config, student.model_type
        self.pre_process, self.post_process = student.pre_process, student.post_process
        # per token on the last stage, for reporting: {"lm": CE, "kd": KL or None, "loops": [CE of each exit]}
        self.last_parts: dict | None = None

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
        """Per-token loss (b, s) on the last stage; what travels to the next stage elsewhere. Every
        loss is training.kd's chunked vocab-parallel one, on the LM head's (s, b, vocab / TP) output as
        it is: no fp32 or transposed copy of a full-vocabulary tensor."""
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
        exits = self._earlier_exits(loops, t_out, labels_sb, group) if loops is not None else []
        self.last_parts = {"lm": ce.t(), "kd": None if kl is None else kl.t(),
                           "loops": [ce_b for _, ce_b in exits] + [ce.t()]}
        loss = loss.t()
        if loops is None:
            return loss
        loss = self.weights[-1] * loss
        for w, (lb, _) in zip(self.weights, exits):
            loss = loss + w * lb
        return loss

    def _earlier_exits(self, loops, t_out, labels_sb, group) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(loss, CE) per token (b, s) of each earlier loop's exit."""
        e = self.exit
        target = {"final": loops[-1].detach(), "none": None, "teacher": t_out}[e.distill]
        out = []
        for logits in loops[:-1]:
            lb, ceb, _ = distillation_loss(logits, target, labels_sb, e.alpha, e.temperature, group)
            out.append((lb.t(), ceb.t()))
        return out
