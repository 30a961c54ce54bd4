"""megatron-core indexed datasets (PREFIX.bin + PREFIX.idx) on disk: shard names, finding a dataset or its
shards from a prefix, merging, and counting documents and tokens.

A prepared shard is PREFIX-IIIII-of-NNNNN (.bin, .idx and a .json manifest of how it was made). The
.idx is renamed into place last, so its presence marks a complete dataset.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import UserError

SHARD_RE = re.compile(r"^(?P<base>.+)-(?P<index>\d{5})-of-(?P<count>\d{5})$")


def shard_prefix(prefix: str | Path, index: int, count: int) -> str:
    return f"{prefix}-{index:05d}-of-{count:05d}"


def _complete(prefix: str) -> bool:
    return Path(f"{prefix}.bin").is_file() and Path(f"{prefix}.idx").is_file()


def resolve(prefix: str | Path) -> list[str]:
    """The dataset(s) behind a prefix: PREFIX itself, or all shards PREFIX-*-of-N in order.

    Accepts PREFIX.bin / PREFIX.idx too (what a shell glob gives)."""
    p = str(prefix)
    if p.endswith((".bin", ".idx")):
        p = p[:-4]
    if _complete(p):
        return [p]
    base = Path(p)
    found = sorted(base.parent.glob(f"{base.name}-[0-9][0-9][0-9][0-9][0-9]-of-[0-9][0-9][0-9][0-9][0-9].idx"))
    if not found:
        raise UserError(f"{p}.bin/.idx not found (nor shards {p}-*-of-*); make it with `relaxrec data prepare`")
    splits = {int(SHARD_RE.match(f.name[:-4])["count"]) for f in found}
    if len(splits) > 1:
        raise UserError(f"{p}: shards of different splits ({', '.join(f'of {c}' for c in sorted(splits))}) "
                        "side by side; remove the stale ones")
    count = splits.pop()
    shards = [shard_prefix(p, i, count) for i in range(count)]
    missing = [str(i) for i, s in enumerate(shards) if not _complete(s)]
    if missing:
        raise UserError(f"{p}: shard(s) {', '.join(missing)} of {count} not prepared yet; run "
                        f"`relaxrec data prepare ... --shard I/{count}` for them")
    return shards


@dataclass
class Counts:
    prefix: str
    documents: int
    tokens: int
    dtype: str

    def train_tokens(self, split: str) -> int:
        """Tokens in megatron's train split of this dataset (documents [0, round(share * n)))."""
        from megatron.core.datasets.blended_megatron_dataset_config import parse_and_normalize_split
        from megatron.core.datasets.indexed_dataset import _IndexReader

        end = int(round(parse_and_normalize_split(split)[0] * self.documents))
        index = _IndexReader(f"{self.prefix}.idx", multimodal=False)  # its arrays live while it does
        return int(index.sequence_lengths[: index.document_indices[end]].sum(dtype=np.int64))


def counts(prefix: str) -> Counts:
    from megatron.core.datasets.indexed_dataset import _IndexReader

    try:
        index = _IndexReader(f"{prefix}.idx", multimodal=False)
    except Exception as e:
        raise UserError(f"{prefix}.idx: not a megatron-core index ({type(e).__name__}: {e})") from None
    tokens = int(index.sequence_lengths.sum(dtype=np.int64))
    expected = tokens * np.dtype(index.dtype).itemsize
    actual = os.path.getsize(f"{prefix}.bin")
    if actual != expected:
        raise UserError(f"{prefix}.bin: {actual} bytes, but its index describes {expected}; the pair is "
                        "truncated or mismatched, prepare it again")
    return Counts(prefix, len(index.document_indices) - 1, tokens, np.dtype(index.dtype).name)


def merge(prefixes: list[str], output_prefix: str | Path) -> Counts:
    """Concatenates datasets (or shard sets) in the given order into one, atomically."""
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    parts = [p for prefix in prefixes for p in resolve(prefix)]
    found = [counts(p) for p in parts]
    dtypes = {c.dtype for c in found}
    if len(dtypes) > 1:
        raise UserError(f"cannot merge token types {sorted(dtypes)} (different vocabularies); merge datasets "
                        "made with one tokenizer")
    out = Path(output_prefix).expanduser().resolve()
    if str(out) in {str(Path(p).resolve()) for p in parts}:
        raise UserError(f"--output-prefix {output_prefix} is one of the inputs; choose another prefix")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp_bin, tmp_idx = Path(f"{out}.bin.tmp-{os.getpid()}"), Path(f"{out}.idx.tmp-{os.getpid()}")
    try:
        builder = IndexedDatasetBuilder(str(tmp_bin), dtype=np.dtype(dtypes.pop()).type)
        for p in parts:
            builder.add_index(p)
        builder.finalize(str(tmp_idx))
        os.replace(tmp_bin, f"{out}.bin")
        os.replace(tmp_idx, f"{out}.idx")
    finally:
        for f in (tmp_bin, tmp_idx):
            f.unlink(missing_ok=True)
    return Counts(str(out), sum(c.documents for c in found), sum(c.tokens for c in found), found[0].dtype)


def expand_blend(weights: list[float], prefixes: list[str]) -> tuple[list[float], list[str]]:
    """A blend whose prefixes may name shard sets: each shard gets its set's weight in proportion to its
    tokens, so the set is sampled as its merged dataset would be."""
    out_w, out_p = [], []
    for w, prefix in zip(weights, prefixes):
        parts = resolve(prefix)
        if len(parts) == 1:
            out_w.append(w)
            out_p.append(parts[0])
            continue
        tokens = [counts(p).tokens for p in parts]
        out_w += [w * t / sum(tokens) for t in tokens]
        out_p += parts
    return out_w, out_p


@dataclass
class ComponentUse:
    prefix: str
    share: float  # of the blend's samples
    train_tokens: int  # in the component's train split
    read: float  # tokens the run reads from it

    @property
    def epochs(self) -> float:
        return self.read / max(self.train_tokens, 1)


def blend_use(weights: list[float], prefixes: list[str], split: str, run_tokens: int) -> list[ComponentUse]:
    """What a run of `run_tokens` reads of each blend component (each prefix a dataset or a shard set):
    megatron's blend samples the components in proportion to their weights."""
    total = sum(weights)
    return [ComponentUse(p, w / total, sum(counts(s).train_tokens(split) for s in resolve(p)), run_tokens * w / total)
            for w, p in zip(weights, prefixes)]


def repeat_warning(uses: list[ComponentUse]) -> str | None:
    over = [f"{u.prefix} ({u.epochs:.2f} epochs)" for u in uses if u.epochs > 1]
    return f"the run repeats data: {', '.join(over)}; add data or lower optim.train_steps" if over else None
