"""Training data through megatron-core's GPTDataset (packed sequences of the indexed datasets, the
train/valid split by documents, cached indices), cut into this rank's micro-batches of each global
batch.

The order of the samples depends on the data and the seed only, never on how many steps the run
plans: each blend component is a series of epochs, epoch e a one-pass GPTDataset shuffled with its
own seed (seed + e), and the blend interleaves the components with megatron's greedy blending index,
whose first N entries do not depend on the total. Raising optim.train_steps on resume appends epochs
and keeps every sample already planned where it was.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import UserError
from .config import TrainConfig


@dataclass
class TokenizerInfo:
    """What GPTDataset reads from a tokenizer (megatron's MegatronTokenizerBase interface, in part)."""

    vocab_size: int
    eod: int

    @property
    def unique_identifiers(self) -> dict:  # part of the dataset cache key
        return {"class": "TokenizerInfo", "vocab_size": self.vocab_size, "eod": self.eod}


EPOCH_SEED_STRIDE = 1_000_003  # epoch e of a run with seed s is shuffled with s + e * this


class Epochs:
    """Samples 0, 1, 2, ... of one component: epoch i // n, sample i % n (n: one epoch's samples)."""

    def __init__(self, epochs: list):
        self.epochs = epochs
        self.per_epoch = len(epochs[0])

    def __len__(self) -> int:
        return self.per_epoch * len(self.epochs)

    def __getitem__(self, i: int) -> dict:
        return self.epochs[i // self.per_epoch][i % self.per_epoch]


def blending_index(weights: list[float], size: int):
    """(component, its sample) for samples 0..size-1: megatron's greedy blending index, which takes at
    each k the component furthest below its share, so its first entries do not depend on `size`."""
    import numpy as np
    from megatron.core.datasets import helpers

    index, sample = np.zeros(size, dtype=np.int16), np.zeros(size, dtype=np.int64)
    helpers.build_blending_indices(index, sample, np.asarray(weights, dtype=np.float64), len(weights), size, False)
    return index, sample


class Blend:
    """The components interleaved by a blending index."""

    def __init__(self, components: list, index, sample):
        self.components, self.index, self.sample = components, index, sample

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, k: int) -> dict:
        return self.components[self.index[k]][int(self.sample[k])]


def build_datasets(cfg: TrainConfig, tokenizer: TokenizerInfo, train_samples: int, valid_samples: int):
    """(train, valid) datasets with at least train_samples and valid_samples samples (valid: None
    when the split gives it no documents)."""
    import numpy as np

    from ..data.indexed import expand_blend

    blend = cfg.data.blend
    try:  # a prefix may stand for its shard set
        weights, prefixes = expand_blend([float(w) for w in blend[0::2]], [str(p) for p in blend[1::2]])
    except UserError as e:
        raise UserError(f"data.blend: {e}") from None
    weights = [w / sum(weights) for w in weights]
    out = []
    for split, wanted in ((0, train_samples), (1, valid_samples)):
        index = sample = None
        counts = [wanted]
        if len(prefixes) > 1:  # each component is needed as often as the blending index takes it
            index, sample = blending_index(weights, wanted)
            counts = np.bincount(index, minlength=len(prefixes)).tolist()
        components = [_epochs(cfg, tokenizer, prefix, split, count) for prefix, count in zip(prefixes, counts)]
        if any(c is None for c in components):
            out.append(None)
        else:
            out.append(components[0] if index is None else Blend(components, index, sample))
    return out[0], out[1]


def _epochs(cfg: TrainConfig, tokenizer: TokenizerInfo, prefix: str, split: int, samples: int) -> Epochs | None:
    """One component's epochs of a split, as many as `samples` needs (at least one)."""
    first = _one_epoch(cfg, tokenizer, prefix, split, 0)
    if first is None:
        return None
    epochs = [first] + [_one_epoch(cfg, tokenizer, prefix, split, e)
                        for e in range(1, max(1, math.ceil(samples / len(first))))]
    return Epochs(epochs)


def _one_epoch(cfg: TrainConfig, tokenizer: TokenizerInfo, prefix: str, split: int, epoch: int):
    """One pass over a component's split, shuffled for `epoch` (megatron caches its indices; rank 0
    builds them first and synchronises the others itself)."""
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

    config = GPTDatasetConfig(
        random_seed=cfg.run.seed + epoch * EPOCH_SEED_STRIDE, sequence_length=cfg.data.seq_length,
        blend=([prefix], None), split=cfg.data.split, tokenizer=tokenizer, reset_position_ids=False,
        reset_attention_mask=False, eod_mask_loss=False, create_attention_mask=False,
        path_to_cache=str(Path(cfg.run.output_dir) / "data_cache"),
    )
    sizes = [None if s == split else 0 for s in range(3)]
    datasets = BlendedMegatronDatasetBuilder(GPTDataset, sizes, lambda: True, config).build()
    dataset = datasets[split]
    return dataset if dataset is not None and len(dataset) > 0 else None


def micro_batches(dataset, first_sample: int, global_batch: int, micro_batch: int, dp_rank: int,
                  dp_size: int, device: torch.device | str = "cpu") -> list[dict]:
    """This DP rank's micro-batches of the global batch that starts at `first_sample`, on `device`."""
    per_rank = global_batch // dp_size
    start = first_sample + dp_rank * per_rank
    out = []
    for m in range(0, per_rank, micro_batch):
        samples = [dataset[(start + m + i) % len(dataset)] for i in range(micro_batch)]
        out.append({key: torch.stack([s[key] for s in samples]).to(device, non_blocking=True)
                    for key in ("tokens", "labels", "loss_mask")})
    return out
