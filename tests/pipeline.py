"""The parity jobs' forward(-backward): megatron-core's pipeline schedule over the bare model, with the
sum of the per-token cross entropies (the HF reference's loss) or the full-vocabulary logits; the
trainer's step with its objective is training.step."""

from __future__ import annotations

import torch


def forward_backward(model, micro_batches: list[dict], forward_only: bool = False, collect_logits: bool = False):
    """micro_batches: dicts with tokens (b, s), labels (b, s), loss_mask (b, s) on every rank.

    Returns, on the last pipeline stage, one dict per micro-batch: {"loss_sum", "tokens"} or
    {"logits"} (full vocabulary) with collect_logits; elsewhere an empty list. The loss that is
    back-propagated is the sum of the masked per-token cross entropies.
    """
    from megatron.core.pipeline_parallel import get_forward_backward_func

    def step(data_iterator, model):
        batch = next(data_iterator)
        if collect_logits:
            out = model(batch["tokens"], gather_logits=True)
        else:
            out = model(batch["tokens"], labels=batch["labels"])

        def loss_func(output):
            if collect_logits:
                return output.sum() * 0.0, {"logits": output.detach()}
            mask = batch["loss_mask"].to(output.dtype)
            loss = (output.float() * mask).sum()
            return loss, {"loss_sum": loss.detach(), "tokens": mask.sum()}

        return out, loss_func

    b, s = micro_batches[0]["tokens"].shape
    return get_forward_backward_func()(
        forward_step_func=step, data_iterator=iter(micro_batches), model=[model],
        num_microbatches=len(micro_batches), seq_length=s, micro_batch_size=b,
        forward_only=forward_only or collect_logits,
    )


def batch_from_tokens(tokens: torch.Tensor) -> dict:
    """Next-token labels within the window; the last position has no label."""
    labels = torch.roll(tokens, -1, dims=1)
    mask = torch.ones_like(tokens)
    mask[:, -1] = 0
    return {"tokens": tokens, "labels": labels, "loss_mask": mask}
