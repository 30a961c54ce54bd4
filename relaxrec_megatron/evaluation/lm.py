"""Perplexity on fixed token windows and greedy continuations, for any HF causal LM."""

from __future__ import annotations

import math

import torch


@torch.no_grad()
def perplexity(model, token_ids: torch.Tensor, window: int = 512) -> float:
    """exp(mean next-token NLL) over consecutive non-overlapping windows of a 1-D token tensor."""
    model.eval()
    nll, count = 0.0, 0
    for start in range(0, token_ids.numel() - 1, window):
        chunk = token_ids[start : start + window + 1]
        if chunk.numel() < 2:
            break
        logits = model(chunk[None, :-1], use_cache=False).logits.float()
        nll += float(torch.nn.functional.cross_entropy(logits[0], chunk[1:], reduction="sum"))
        count += chunk.numel() - 1
    return math.exp(nll / count)


@torch.no_grad()
def max_logit_difference(a, b, token_ids: torch.Tensor, window: int = 512) -> float:
    """max |logits_a - logits_b| over the windows `perplexity` scores: 0 where two models are the same."""
    worst = 0.0
    for start in range(0, token_ids.numel() - 1, window):
        chunk = token_ids[None, start : start + window]
        la, lb = (m(chunk, use_cache=False).logits.float() for m in (a, b))
        worst = max(worst, float((la - lb).abs().max()))
    return worst


@torch.no_grad()
def greedy(model, tokenizer, prompt: str, max_new_tokens: int = 16) -> str:
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False,
                         pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
    return tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)


def unique_parameters(model) -> int:
    """Parameters counted once even when tied."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
