"""Reading corpora with `datasets`: local jsonl/json/parquet/txt/arrow files (or folders of them), or a hub
dataset name for users with internet; `streaming=True` for corpora that do not fit in memory.

A shard (`Shard(i, n)`) is always a contiguous piece of the corpus in its reading order, so shards
0..n-1 concatenated are the whole corpus: by files when there are at least n input files (no shard
reads another's files), otherwise by documents (every shard opens the corpus and keeps its range).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from ..errors import UserError

BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".txt": "text", ".arrow": "arrow"}


@dataclass(frozen=True)
class Shard:
    index: int
    count: int

    @classmethod
    def parse(cls, text: str) -> "Shard":
        m = re.fullmatch(r"(\d+)/(\d+)", text.strip())
        if not m or not int(m[1]) < int(m[2]):
            raise UserError(f"--shard {text}: expected I/N with 0 <= I < N, e.g. 0/3 (the first of three)")
        return cls(int(m[1]), int(m[2]))

    def range(self, n: int) -> range:
        """This shard's contiguous part of n items."""
        return range(self.index * n // self.count, (self.index + 1) * n // self.count)

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"


def _local_files(source: str) -> list[Path] | None:
    """The files behind a local input (a folder: its corpus files, sorted), or None for a hub name."""
    path = Path(source).expanduser()
    if path.is_dir():
        files = sorted(f for f in path.iterdir() if f.suffix in BUILDERS)
        if not files:
            raise UserError(f"{path}: no {'/'.join(BUILDERS)} files in this folder")
        return files
    if path.suffix in BUILDERS:
        if not path.is_file():
            raise UserError(f"{path}: no such file")
        if path.stat().st_size == 0:
            raise UserError(f"{path}: empty file, no documents")
        return [path]
    if path.exists() or source.startswith((".", "/", "~")):
        raise UserError(f"{source}: unsupported input; use {', '.join(BUILDERS)} files, a folder of them, "
                        "or a hub dataset name")
    return None


def _load(builder_or_name: str, files: list[Path] | None, split: str, streaming: bool, shown: str):
    import datasets

    datasets.disable_progress_bars()  # our own bar counts tokens
    datasets.logging.set_verbosity_error()
    try:
        if files is None:
            return datasets.load_dataset(builder_or_name, split=split, streaming=streaming)
        return datasets.load_dataset(builder_or_name, data_files=[str(f) for f in files], split="train",
                                     streaming=streaming)
    except Exception as e:
        raise UserError(f"cannot read {shown} ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None


def _builder(files: list[Path], shown: str) -> str:
    builders = {BUILDERS[f.suffix] for f in files}
    if len(builders) > 1:
        raise UserError(f"{shown}: mixes file types {sorted(builders)}; pass them as separate inputs")
    return builders.pop()


def open_corpus(source: str, split: str = "train", streaming: bool = False):
    """A `datasets` dataset of local files, a folder of them or a hub dataset; one-line errors otherwise."""
    files = _local_files(source)
    return _load(_builder(files, source) if files else source, files, split, streaming, source)


def open_shard(inputs: list[str], shard: Shard | None, split: str = "train",
               streaming: bool = False) -> list[tuple[object, str]]:
    """(dataset, shown name) pieces that, read in order, are this shard of the inputs read in order."""
    local = [_local_files(src) for src in inputs]
    if shard is None:
        return [(open_corpus(src, split, streaming), src) for src in inputs]
    if all(f is not None for f in local):
        files = [f for group in local for f in group]
        if len(files) >= shard.count:
            mine = [files[i] for i in shard.range(len(files))]
            runs: list[list[Path]] = []  # consecutive files of one builder load together
            for f in mine:
                if runs and BUILDERS[runs[-1][-1].suffix] == BUILDERS[f.suffix]:
                    runs[-1].append(f)
                else:
                    runs.append([f])
            return [(_load(BUILDERS[r[0].suffix], r, split, streaming, str(r[0].parent)), str(r[0].parent))
                    for r in runs]
    if streaming:
        n_files = sum(len(f) for f in local if f)
        raise UserError(f"--shard {shard} with --streaming splits by files, and {shard.count} shards need at least "
                        f"{shard.count} input files (got {n_files} local ones); drop --streaming or use fewer shards")
    pieces = [(open_corpus(src, split), src) for src in inputs]
    total = sum(len(ds) for ds, _ in pieces)
    want = shard.range(total)
    out, start = [], 0
    for ds, src in pieces:
        lo, hi = max(want.start, start), min(want.stop, start + len(ds))
        if lo < hi:
            out.append((ds.select(range(lo - start, hi - start)), src))
        start += len(ds)
    return out


def text_batches(ds, key: str, source: str, batch_size: int) -> Iterator[list[str]]:
    """Lists of texts in corpus order; one-line errors for a missing field or a non-text value."""
    names = getattr(ds, "column_names", None)
    if names is not None and key not in names:
        raise UserError(f"{source}: records have no {key!r} field (fields: {', '.join(names)}); pass --text-key")
    if names is not None and len(names) > 1:
        ds = ds.select_columns([key])  # the other columns are never decoded
    seen = 0
    for batch in ds.iter(batch_size=batch_size):
        if key not in batch:
            raise UserError(f"{source}: records have no {key!r} field (fields: {', '.join(batch)}); pass --text-key")
        texts = batch[key]
        for i, t in enumerate(texts):
            if not isinstance(t, str):
                raise UserError(f"{source}: record {seen + i} has a {type(t).__name__} in {key!r}, not text")
        seen += len(texts)
        yield texts


def corpus_texts(ds, key: str, source: str) -> Iterator[str]:
    for batch in text_batches(ds, key, source, 1000):
        yield from batch
