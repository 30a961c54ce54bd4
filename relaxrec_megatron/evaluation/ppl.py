"""Perplexity of a causal LM on a text corpus, with a sliding window.

The model reads at most `context` tokens at a time; the first window scores all of them, every
later one advances by `stride` and scores only its last `stride` tokens. So every token after a
document's first is scored once, predicted from at least `context - stride + 1` tokens before it
(all of them near the document's start). stride == context gives disjoint windows (fastest); a
small stride gives every token a long context, as the model sees it when it generates. Documents are scored apart: no window crosses two of them.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Iterator

import torch


def windows(n: int, context: int, stride: int) -> Iterator[tuple[int, int, int]]:
    """(begin, end, first) of each window over n tokens: the model reads ids[begin:end] (at most `context`
    tokens) and scores the tokens at positions first..end; positions 1..n-1 are scored once each."""
    if not 0 < stride <= context:
        raise ValueError(f"stride must be in [1, context={context}], got {stride}")
    first = 1
    while first < n:
        end = min(first + (context if first == 1 else stride) - 1, n - 1)
        yield max(0, end - context), end, first
        first = end + 1


@torch.no_grad()
def token_nlls(model, ids: torch.Tensor, context: int, stride: int, batch_size: int = 8) -> torch.Tensor:
    """NLL (fp64) of ids[1:] under the sliding windows, one per token; windows of equal length are batched."""
    device = next(model.parameters()).device
    out = torch.empty(max(0, ids.numel() - 1), dtype=torch.float64)
    by_len: dict[int, list[tuple[int, int, int]]] = {}
    for span in windows(ids.numel(), context, stride):
        by_len.setdefault(span[1] - span[0], []).append(span)
    for group in by_len.values():
        for i in range(0, len(group), batch_size):
            chunk = group[i : i + batch_size]
            batch = torch.stack([ids[b:e] for b, e, _ in chunk]).to(device)
            logp = torch.log_softmax(model(batch, use_cache=False).logits.float(), dim=-1)
            for row, (b, e, first) in enumerate(chunk):
                targets = ids[first : e + 1].to(device)
                picked = logp[row, first - 1 - b : e - b].gather(-1, targets[:, None])[:, 0]
                out[first - 1 : e] = -picked.double().cpu()
    return out


def corpus_perplexity(model, documents: Iterable[torch.Tensor], context: int, stride: int, batch_size: int = 8,
                      total_tokens: int | None = None, progress: bool = True) -> dict:
    """{"perplexity", "nll", "tokens", "documents", "seconds", "tokens_per_s"} over tokenized documents."""
    from tqdm.auto import tqdm

    bar = tqdm(total=total_tokens, unit="tok", unit_scale=True, desc="ppl", disable=not progress, dynamic_ncols=True)
    t0, nll, tokens, docs = time.perf_counter(), 0.0, 0, 0
    for ids in documents:
        if ids.numel() >= 2:
            nll += float(token_nlls(model, ids, context, stride, batch_size).sum())
            tokens += ids.numel() - 1
        docs += 1
        bar.update(ids.numel())
    bar.close()
    seconds = time.perf_counter() - t0
    return {"perplexity": math.exp(nll / tokens) if tokens else float("nan"), "nll": nll, "tokens": tokens,
            "documents": docs, "seconds": seconds, "tokens_per_s": tokens / seconds if seconds else 0.0}
