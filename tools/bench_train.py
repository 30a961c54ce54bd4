#!/usr/bin/env python
"""Benchmark: training tokens/s of the relaxed recursive model vs the vanilla model with the same
unrolled shape, in the same training loop and run, and the overheads of ZeRO and of distillation.

The vanilla model is the source model itself run by the same trainer (a 1-loop stack of the same
megatron-core TransformerLayers, no LoRA), so only the recursion/relaxation differs.

    python tools/bench_train.py [--hidden 512] [--layers 8] [--rank 64] [--seq 256] [--steps 8] [--world 2]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch


def synthetic_run(root: Path, hidden: int, layers: int, rank: int, seq: int, steps: int, global_batch: int,
                  dtype: str = "fp32") -> Path:
    """A random Llama source of that shape, a random-token corpus and a run config (micro-batch 2, no
    KD, no evaluation or checkpoints) under root; returns the config's path."""
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=8192, hidden_size=hidden, intermediate_size=int(hidden * 2.75) // 64 * 64,
                      num_hidden_layers=layers, num_attention_heads=hidden // 64, num_key_value_heads=hidden // 64,
                      eos_token_id=2)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(root / "src")
    builder = IndexedDatasetBuilder(str(root / "data.bin"), dtype=np.uint16)
    for _ in range(2000):
        doc = torch.randint(3, 8192, (300,)).tolist() + [2]
        builder.add_document(torch.tensor(doc), [len(doc)])
    builder.finalize(str(root / "data.idx"))
    (root / "c.yaml").write_text(f"""
run: {{name: bench, output_dir: {root}/run, seed: 1}}
model: {{source: {root}/src, recursion: {{loops: 2, rank: {rank}}}, dtype: {dtype}}}
parallel: {{tp: 1, pp: 1, zero_stage: 1}}
data: {{blend: [1.0, {root}/data], split: "99,1,0", seq_length: {seq}}}
optim: {{global_batch_size: {global_batch}, micro_batch_size: 2, train_steps: {steps}, lr: 1.0e-4, warmup_steps: 1}}
kd: {{enabled: false}}
checkpoint: {{save_every: 100000, resume: none}}
eval: {{every: 0}}
logging: {{wandb_mode: disabled}}
""")
    return root / "c.yaml"


def run_arguments(p: argparse.ArgumentParser, steps: int) -> None:
    """The synthetic run's shape (synthetic_run)."""
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--rank", type=int, default=64)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--steps", type=int, default=steps)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    run_arguments(p, steps=8)
    p.add_argument("--world", type=int, default=2, help="local processes (data parallel)")
    a = p.parse_args()
    from relaxrec_megatron.parallel.local_world import run_world
    from relaxrec_megatron.training.run import train_entry

    root = Path(tempfile.mkdtemp(prefix="bench_train_"))
    synthetic_run(root, a.hidden, a.layers, a.rank, a.seq, a.steps, global_batch=4 * a.world)
    runs = {
        "vanilla (1 loop, no LoRA), ZeRO-0": ["model.recursion.loops=1", "model.recursion.rank=0",
                                               "parallel.zero_stage=0"],
        "relaxed, ZeRO-0": ["parallel.zero_stage=0"],
        "relaxed, ZeRO-1": ["parallel.zero_stage=1"],
        "relaxed, ZeRO-1 + KD": ["parallel.zero_stage=1", "kd.enabled=true"],
    }
    rate = {}
    for name, overrides in runs.items():
        out = root / name.split(",")[0].split(" ")[0]
        run_world(train_entry, a.world, str(root / "c.yaml"), [f"run.output_dir={root}/run-{len(rate)}", *overrides],
                  str(out), timeout=3600)
        recs = torch.load(f"{out}.rank0.pt", weights_only=False)
        rate[name] = statistics.median(r["tokens_per_s"] for r in recs[2:])  # after warm-up
    print(f"training tokens/s, hidden {a.hidden}, {a.layers} layers (relaxed: {a.layers // 2} shared x 2 loops, "
          f"LoRA rank {a.rank}), seq {a.seq}, {a.world} processes of 1 thread (parallel.local_world)")
    for name, r in rate.items():
        print(f"  {name:<36} {r:9.0f} tokens/s")
    keys = list(rate)
    print(f"  relaxed / vanilla       {rate[keys[1]] / rate[keys[0]]:.3f}")
    print(f"  ZeRO-1 overhead         {rate[keys[1]] / rate[keys[2]] - 1:+.1%}")
    print(f"  KD overhead             {rate[keys[2]] / rate[keys[3]] - 1:+.1%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
