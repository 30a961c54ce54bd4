"""Student and frozen teacher run stage by stage in one pipeline.

Each pipeline stage holds its stage of both models (same TP/PP layout). The hidden states of both
travel together between stages, concatenated on the sequence axis, so megatron's schedules send
one (2s, b, h) tensor instead of (s, b, h); the teacher half carries no gradient (zeros in backward,
the price of one schedule for both models). The last stage returns per-token losses:
alpha * CE + (1 - alpha) * T^2 * KL(teacher_T || student_T), computed vocab-parallel (training.kd).
"""

from __future__ import annotations

import torch
from torch import nn

from megatron.core import parallel_state as ps

from .kd import distillation_loss


class DistillationModel(nn.Module):
    def __init__(self, student, teacher, alpha: float, temperature: float):
        super().__init__()
        self.student, self.alpha, self.temperature = student, alpha, temperature
        self.teacher = [teacher]  # not a submodule: no gradients, no optimizer state, not in the checkpoint
        teacher.eval()
        for p in teacher.parameters():
            p.requires_grad_(False)
        self.config, self.model_type = student.config, student.model_type
        self.pre_process, self.post_process = student.pre_process, student.post_process
        self.last_parts: tuple[torch.Tensor, torch.Tensor] | None = None  # (CE, KL) per token, last stage

    def set_input_tensor(self, input_tensor) -> None:
        if isinstance(input_tensor, (list, tuple)):
            input_tensor = input_tensor[0]
        if input_tensor is None:
            self.student.set_input_tensor(None)
            self.teacher[0].set_input_tensor(None)
            return
        s_half, t_half = input_tensor.chunk(2, dim=0)
        self.student.set_input_tensor(s_half)
        self.teacher[0].set_input_tensor(t_half.detach())

    def forward(self, tokens: torch.Tensor, labels: torch.Tensor | None = None, **kwargs):
        with torch.no_grad():
            t_out = self.teacher[0](tokens)
        s_out = self.student(tokens)
        if not self.post_process:
            return torch.cat([s_out, t_out], dim=0)
        # last stage: (b, s, vocab / TP) logits of both, in the model's dtype (kd casts chunk by chunk)
        loss, ce, kl = distillation_loss(s_out, t_out, labels, self.alpha, self.temperature,
                                         ps.get_tensor_model_parallel_group())
        self.last_parts = (ce, kl)
        return loss
