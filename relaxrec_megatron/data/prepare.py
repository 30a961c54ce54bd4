"""Corpus -> megatron-core indexed dataset (.bin/.idx): tokenized in parallel workers, EOS appended.

Inputs are read with `datasets`: local jsonl/json/parquet/txt/arrow files (or folders of them), or a
hub dataset name for users with internet; `streaming=True` for corpora that do not fit in memory.
Both files are written under temporary names and renamed at the end (.idx last: its presence marks
a complete dataset).
"""

from __future__ import annotations

import itertools
import multiprocessing as mp
import os
import time
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import torch
from tqdm.auto import tqdm

from ..errors import UserError

BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".txt": "text", ".arrow": "arrow"}
_TOKENIZER = None


def open_corpus(source: str, split: str = "train", streaming: bool = False):
    """A `datasets` dataset of local files, a folder of them or a hub dataset; one-line errors otherwise."""
    import datasets

    datasets.disable_progress_bars()  # our own bar counts tokens
    datasets.logging.set_verbosity_error()
    path = Path(source).expanduser()
    try:
        if path.is_dir():
            files = sorted(f for f in path.iterdir() if f.suffix in BUILDERS)
            if not files:
                raise UserError(f"{path}: no {'/'.join(BUILDERS)} files in this folder")
            builders = {BUILDERS[f.suffix] for f in files}
            if len(builders) > 1:
                raise UserError(f"{path}: mixes file types {sorted(builders)}; pass them as separate inputs")
            return datasets.load_dataset(builders.pop(), data_files=[str(f) for f in files], split="train",
                                         streaming=streaming)
        if path.suffix in BUILDERS:
            if not path.is_file():
                raise UserError(f"{path}: no such file")
            if path.stat().st_size == 0:
                raise UserError(f"{path}: empty file, no documents")
            return datasets.load_dataset(BUILDERS[path.suffix], data_files=str(path), split="train", streaming=streaming)
        if path.exists() or source.startswith((".", "/", "~")):
            raise UserError(f"{source}: unsupported input; use {', '.join(BUILDERS)} files, a folder of them, "
                            "or a hub dataset name")
        return datasets.load_dataset(source, split=split, streaming=streaming)
    except UserError:
        raise
    except Exception as e:
        raise UserError(f"cannot read {source} ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None


def corpus_texts(ds, key: str, source: str) -> Iterator[str]:
    for i, row in enumerate(ds):
        if key not in row:
            raise UserError(f"{source}: record {i} has no {key!r} field (fields: {', '.join(row)}); pass --text-key")
        yield row[key]


def _init_worker(tokenizer_path: str) -> None:
    global _TOKENIZER
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers import AutoTokenizer

    _TOKENIZER = AutoTokenizer.from_pretrained(tokenizer_path)


def _encode(batch: list[str]) -> list[list[int]]:
    eos = _TOKENIZER.eos_token_id
    return [ids + [eos] for ids in _TOKENIZER(batch, add_special_tokens=False).input_ids]


def _batches(texts: Iterable[str], size: int) -> Iterator[list[str]]:
    it = iter(texts)
    while batch := list(itertools.islice(it, size)):
        yield batch


def prepare(inputs: list[str], tokenizer: str, output_prefix: str | Path, text_key: str = "text",
            workers: int = 2, streaming: bool = False, split: str = "train", batch_size: int = 64,
            progress: bool = True) -> dict:
    """Returns {documents, tokens, seconds, tokens_per_s, bin, idx}."""
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer)
    if tok.eos_token_id is None:
        raise UserError(f"tokenizer {tokenizer} has no EOS token; documents could not be separated")
    dtype = np.uint16 if len(tok) < 65500 else np.int32
    prefix = Path(output_prefix).expanduser().resolve()
    prefix.parent.mkdir(parents=True, exist_ok=True)
    tmp_bin, tmp_idx = Path(f"{prefix}.bin.tmp-{os.getpid()}"), Path(f"{prefix}.idx.tmp-{os.getpid()}")
    texts = itertools.chain.from_iterable(corpus_texts(open_corpus(src, split, streaming), text_key, src) for src in inputs)
    docs = tokens = 0
    t0 = time.perf_counter()
    try:
        builder = IndexedDatasetBuilder(str(tmp_bin), dtype=dtype)
        bar = tqdm(unit="tok", unit_scale=True, desc="tokenize", disable=not progress, dynamic_ncols=True)
        ctx = mp.get_context("spawn")
        with ctx.Pool(max(1, workers), initializer=_init_worker, initargs=(tokenizer,)) as pool:
            for encoded in pool.imap(_encode, _batches(texts, batch_size)):  # imap keeps document order
                for ids in encoded:
                    builder.add_document(torch.tensor(ids, dtype=torch.int64), [len(ids)])
                    docs += 1
                    tokens += len(ids)
                bar.update(sum(len(ids) for ids in encoded))
        bar.close()
        if docs == 0:
            raise UserError(f"no documents in {', '.join(inputs)}")
        builder.finalize(str(tmp_idx))
        os.replace(tmp_bin, f"{prefix}.bin")
        os.replace(tmp_idx, f"{prefix}.idx")
    finally:
        for f in (tmp_bin, tmp_idx):
            f.unlink(missing_ok=True)
    seconds = time.perf_counter() - t0
    return {"documents": docs, "tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds,
            "bin": f"{prefix}.bin", "idx": f"{prefix}.idx"}
