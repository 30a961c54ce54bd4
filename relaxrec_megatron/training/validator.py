"""Validation during training: the mean LM loss (and with early exits each loop's) over the same
`eval.batches` global batches of the validation split at every evaluation."""

from __future__ import annotations

import torch


class Validator:
    def __init__(self, dataset):
        self.dataset = dataset

    def __call__(self, trainer) -> dict:
        """valid_loss and valid_ppl (and valid_loop{b}_loss, valid_loop{b}_ppl), agreed by every rank."""
        from .data import micro_batches

        cfg = trainer.cfg
        trainer.model.eval()
        losses = []
        with torch.no_grad():
            for b in range(cfg.eval.batches):
                batches = micro_batches(self.dataset, b * cfg.optim.global_batch_size, cfg.optim.global_batch_size,
                                        cfg.optim.micro_batch_size, trainer.dp_rank, trainer.dp, trainer.device)
                losses.append(trainer.eval_losses(batches))
        mean = {k: sum(d[k] for d in losses) / len(losses) for k in losses[0]}
        out = {"valid_loss": mean.pop("lm_loss")}
        ppl = lambda loss: float(torch.tensor(loss).exp())  # inf, not an OverflowError, for a diverged run
        out["valid_ppl"] = ppl(out["valid_loss"])
        for key, v in mean.items():  # loop{b}_loss: each exit's CE
            out[f"valid_{key}"], out[f"valid_{key[:-5]}_ppl"] = v, ppl(v)
        return out
