"""Training data through megatron-core's GPTDataset / BlendedMegatronDatasetBuilder (blends with
weights, train/valid split, deterministic shuffle, packed sequences), cut into this rank's
micro-batches of each global batch."""

from __future__ import annotations

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


def build_datasets(cfg: TrainConfig, tokenizer: TokenizerInfo, train_samples: int, valid_samples: int):
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

    from ..data.indexed import expand_blend

    blend = cfg.data.blend
    try:  # a prefix may stand for its shard set
        weights, prefixes = expand_blend([float(w) for w in blend[0::2]], [str(p) for p in blend[1::2]])
    except UserError as e:
        raise UserError(f"data.blend: {e}") from None
    config = GPTDatasetConfig(
        random_seed=cfg.run.seed, sequence_length=cfg.data.seq_length, blend=(prefixes, weights),
        split=cfg.data.split, tokenizer=tokenizer, reset_position_ids=False, reset_attention_mask=False,
        eod_mask_loss=False, create_attention_mask=False, path_to_cache=str(Path(cfg.run.output_dir) / "data_cache"),
        mid_level_dataset_surplus=0.005,
    )
    train, valid, _ = BlendedMegatronDatasetBuilder(GPTDataset, [train_samples, valid_samples, 0],
                                                    lambda: True, config).build()
    return train, valid


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
