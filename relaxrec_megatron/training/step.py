"""One forward(-backward) of a step's micro-batches through the training objective: megatron-core's
pipeline schedule under PP, a plain loop otherwise (where DeepSpeed drives each backward, so ZeRO-2
can reduce gradients per backward). The loss of a micro-batch is its mean over the masked tokens."""

from __future__ import annotations

from typing import Callable

import torch

from .objective import LossParts


def micro_batch_loss(batch: dict, parts: LossParts) -> tuple[torch.Tensor, LossParts]:
    """(loss to back-propagate, the micro-batch's LossParts, detached: megatron scales the returned
    loss in place)."""
    means = parts.masked_mean(batch["loss_mask"].float())
    loss = means.loss
    means.loss = loss.detach().clone()
    return loss, means


def forward_backward(objective, batches: list[dict], pp: int, forward_only: bool = False,
                     backward: Callable[[torch.Tensor], None] | None = None) -> list[LossParts]:
    """Runs every micro-batch; returns their LossParts on the last pipeline stage, [] elsewhere.
    backward(loss) back-propagates a micro-batch's loss without PP (default: loss.backward())."""
    if pp == 1:
        stored = []
        for batch in batches:
            with torch.set_grad_enabled(not forward_only):
                loss, reported = micro_batch_loss(batch, objective(batch["tokens"], labels=batch["labels"]))
            if not forward_only:
                (backward or torch.Tensor.backward)(loss)
            stored.append(reported)
        return stored
    from megatron.core.pipeline_parallel import get_forward_backward_func

    def step(data_iterator, _model):
        batch = next(data_iterator)
        out = objective(batch["tokens"], labels=batch["labels"])
        return out, lambda output, b=batch: micro_batch_loss(b, output)

    mbs, seq = batches[0]["tokens"].shape
    return get_forward_backward_func()(
        forward_step_func=step, data_iterator=iter(batches), model=[objective], num_microbatches=len(batches),
        seq_length=seq * objective.tensors_between_stages, micro_batch_size=mbs, forward_only=forward_only)
