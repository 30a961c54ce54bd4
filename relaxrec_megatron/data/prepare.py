"""Corpus -> megatron-core indexed dataset (.bin/.idx): tokenized in parallel workers, EOS appended.

The workers do all the per-token work: the tokenizer's own batch encode (its Rust backend, without the
Python lists of a BatchEncoding) and the packing into one array per batch. The main process reads
text, ships batches out and writes the arrays' bytes, so it stays a few percent of one core and the
workers run at the tokenizer's speed. Batches in flight are bounded, so a streamed corpus never
sits in memory. Both files are written under temporary names and renamed at the end (.idx last).
"""

from __future__ import annotations

import collections
import json
import multiprocessing as mp
import os
import time
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from ..errors import UserError
from . import indexed
from .corpus import Shard, open_shard, text_batches

_TOKENIZER = None


def load_tokenizer(name: str):
    from transformers import AutoTokenizer

    from ..hf.smollm import resolve_builtin

    try:
        return AutoTokenizer.from_pretrained(resolve_builtin(name))
    except Exception as e:
        raise UserError(f"cannot load tokenizer {name} ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
                        ) from None


def token_dtype(tokenizer) -> type:
    return np.uint16 if len(tokenizer) < 65500 else np.int32


def encoder(tokenizer):
    """batch of texts -> list of token-id lists, by the fastest path the tokenizer offers."""
    backend = getattr(tokenizer, "_tokenizer", None) if getattr(tokenizer, "is_fast", False) else None
    if backend is not None and not getattr(tokenizer, "split_special_tokens", False):
        return lambda texts: [e.ids for e in backend.encode_batch(texts, add_special_tokens=False)]
    return lambda texts: tokenizer(texts, add_special_tokens=False).input_ids


def _init_worker(tokenizer_path: str, started=None, ready=None) -> None:
    global _TOKENIZER
    if started is not None:  # in a worker process
        with started.get_lock():
            started.value += 1
        os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one process per core already
    tok = load_tokenizer(tokenizer_path)
    _TOKENIZER = (encoder(tok), tok.eos_token_id, token_dtype(tok))
    if ready is not None:
        with ready.get_lock():
            ready.value += 1


def _encode(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """(all tokens of the batch with EOS after each document, per-document lengths)."""
    encode, eos, dtype = _TOKENIZER
    flat: list[int] = []
    lengths = np.empty(len(texts), np.int32)
    for i, ids in enumerate(encode(texts)):
        flat.extend(ids)
        flat.append(eos)
        lengths[i] = len(ids) + 1
    return np.array(flat, dtype=dtype), lengths


class _Workers:
    """Tokenizer processes, or this process for workers=0.

    A multiprocessing Pool (measured faster than concurrent.futures' executor, whose manager thread
    sits between the workers and their queue) silently replaces a dead worker and loses its batch. So
    the workers count their starts: more starts than workers means one died, and the preparation
    stops with an error instead of waiting forever."""

    def __init__(self, n: int, tokenizer: str) -> None:
        ctx = mp.get_context("spawn")
        self.n, self.started, self.ready = n, ctx.Value("i", 0), ctx.Value("i", 0)
        if n:
            self.pool = ctx.Pool(n, initializer=_init_worker, initargs=(tokenizer, self.started, self.ready))
        else:
            self.pool = None
            _init_worker(tokenizer)

    def __enter__(self) -> "_Workers":
        return self

    def __exit__(self, *exc) -> None:
        if self.pool is not None:
            self.pool.terminate()
            self.pool.join()

    def _check(self) -> None:
        if self.started.value > self.n:
            raise UserError("a tokenizer worker died (out of memory, or killed); rerun the preparation "
                            "(with --shard, finished shards are kept)")

    def wait_ready(self, timeout_s: float = 600.0) -> None:
        t0 = time.monotonic()
        while self.ready.value < self.n:
            self._check()
            if time.monotonic() - t0 > timeout_s:
                raise UserError(f"tokenizer workers did not start within {timeout_s:.0f}s")
            time.sleep(0.02)

    def submit(self, texts: list[str]):
        return self.pool.apply_async(_encode, (texts,)) if self.pool else _encode(texts)

    def result(self, handle) -> tuple[np.ndarray, np.ndarray]:
        if self.pool is None:
            return handle
        while True:
            try:
                return handle.get(timeout=1.0)
            except mp.TimeoutError:
                self._check()


def _manifest(inputs, tokenizer, text_key, split, shard) -> dict:
    local = lambda x: str(Path(x).expanduser().resolve()) if Path(x).expanduser().exists() else str(x)
    return {"inputs": [local(i) for i in inputs], "tokenizer": local(tokenizer), "text_key": text_key,
            "split": split, "shard": str(shard) if shard else None}


def _finished(prefix: str, manifest: dict) -> bool:
    """A complete shard made from the same inputs; a different one is an error, not a silent skip."""
    if not Path(f"{prefix}.idx").is_file():
        return False
    made = Path(f"{prefix}.json")
    old = json.loads(made.read_text()) if made.is_file() else {}
    if {k: old.get(k) for k in manifest} != manifest:
        raise UserError(f"{prefix}.idx exists from another preparation ({made.name}: {old or 'missing'}); "
                        "remove it or pass --overwrite")
    return True


def prepare(inputs: list[str], tokenizer: str, output_prefix: str | Path, text_key: str = "text",
            workers: int = 2, streaming: bool = False, split: str = "train", batch_size: int = 128,
            shard: Shard | None = None, overwrite: bool = False, progress: bool = True) -> dict:
    """Returns {documents, tokens, seconds, startup_seconds, tokens_per_s, bin, idx, skipped}.

    workers=0 tokenizes in this process. tokens_per_s counts from the moment the workers are ready (what
    the progress bar shows); seconds is the whole call."""
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    t0 = time.perf_counter()
    prefix = str(Path(output_prefix).expanduser().resolve())
    if shard is not None:
        prefix = indexed.shard_prefix(prefix, shard.index, shard.count)
    manifest = _manifest(inputs, tokenizer, text_key, split, shard)
    if shard is not None and not overwrite and _finished(prefix, manifest):
        c = indexed.counts(prefix)
        return {"documents": c.documents, "tokens": c.tokens, "seconds": 0.0, "startup_seconds": 0.0,
                "tokens_per_s": 0.0, "bin": f"{prefix}.bin", "idx": f"{prefix}.idx", "skipped": True}
    tok = load_tokenizer(tokenizer)
    if tok.eos_token_id is None:
        raise UserError(f"tokenizer {tokenizer} has no EOS token; documents could not be separated")
    Path(prefix).parent.mkdir(parents=True, exist_ok=True)
    tmp = {ext: Path(f"{prefix}.{ext}.tmp-{os.getpid()}") for ext in ("bin", "idx", "json")}
    docs = tokens = 0
    try:
        with _Workers(max(workers, 0), tokenizer) as pool:
            pieces = open_shard(inputs, shard, split, streaming)  # while the workers load the tokenizer
            pool.wait_ready()
            t_ready = time.perf_counter()
            builder = IndexedDatasetBuilder(str(tmp["bin"]), dtype=token_dtype(tok))
            bar = tqdm(unit="tok", unit_scale=True, desc="tokenize", disable=not progress, dynamic_ncols=True)
            pending: collections.deque = collections.deque()

            def write_oldest() -> None:
                nonlocal docs, tokens
                ids, lengths = pool.result(pending.popleft())
                builder.data_file.write(ids.tobytes(order="C"))
                builder.sequence_lengths.extend(lengths.tolist())
                builder.document_indices.extend(range(docs + 1, docs + 1 + len(lengths)))
                docs += len(lengths)
                tokens += len(ids)
                bar.update(len(ids))

            for ds, src in pieces:
                for texts in text_batches(ds, text_key, src, batch_size):
                    pending.append(pool.submit(texts))
                    if len(pending) > 4 * workers:
                        write_oldest()
            while pending:
                write_oldest()
            bar.close()
        if docs == 0:
            builder.data_file.close()
            raise UserError(f"no documents in {', '.join(inputs)}" + (f" for shard {shard}" if shard else ""))
        builder.finalize(str(tmp["idx"]))
        t_end = time.perf_counter()
        Path(f"{prefix}.idx").unlink(missing_ok=True)  # an old .bin with the new .idx would read as garbage
        os.replace(tmp["bin"], f"{prefix}.bin")
        if shard is not None:
            tmp["json"].write_text(json.dumps({**manifest, "documents": docs, "tokens": tokens}, indent=1) + "\n")
            os.replace(tmp["json"], f"{prefix}.json")
        os.replace(tmp["idx"], f"{prefix}.idx")
    finally:
        for f in tmp.values():
            f.unlink(missing_ok=True)
    return {"documents": docs, "tokens": tokens, "seconds": t_end - t0, "startup_seconds": t_ready - t0,
            "tokens_per_s": tokens / max(t_end - t_ready, 1e-9), "bin": f"{prefix}.bin", "idx": f"{prefix}.idx",
            "skipped": False}
