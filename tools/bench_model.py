#!/usr/bin/env python
"""Benchmark: forward+backward of the relaxed recursive Megatron model vs a vanilla megatron-core
GPTModel with the same unrolled shape (same process, same machine, interleaved timing).

Prints the measured time ratio next to the LoRA FLOP ratio (matmul FLOPs of relaxed / vanilla).
Target: measured <= FLOP ratio x 1.10.

    python tools/bench_model.py [--hidden 512] [--layers 8] [--loops 2] [--rank 64] [--seq 256] [--iters 10]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch


def settings_dict(a) -> dict:
    heads = a.hidden // 64
    return dict(model_type="relaxed_recursive", vocab_size=a.vocab, hidden_size=a.hidden, intermediate_size=a.ffn,
                num_attention_heads=heads, num_key_value_heads=heads, head_dim=64, max_position_embeddings=a.seq,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, norm_type="rmsnorm", norm_eps=1e-5,
                norm_zero_centered=False, hidden_act="silu", gated_mlp=True, parallel_residual=False,
                attention_bias=False, mlp_bias=False, embedding_multiplier=1.0, tie_word_embeddings=False,
                num_hidden_layers=a.layers, num_shared_layers=a.layers // a.loops, num_loops=a.loops,
                recursion_strategy="cycle", layer_plan=None,
                lora_ranks={m: a.rank for m in ("q", "k", "v", "o", "gate", "up", "down")} if a.rank else {},
                share_norms=True, share_biases=True)


def flops_per_token(a, with_lora: bool) -> float:
    h, f, L = a.hidden, a.ffn, a.layers
    shapes = [(h, h), (h, h), (h, h), (h, h), (f, h), (f, h), (h, f)]
    linear = sum(2 * o * i for o, i in shapes)
    lora = sum(2 * min(a.rank, o, i) * (o + i) for o, i in shapes) if with_lora else 0
    attention = 2 * 2 * a.seq * h  # QK^T and AV, per token
    return L * (linear + lora + attention) + 2 * h * a.vocab


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--ffn", type=int, default=1408)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--loops", type=int, default=2)
    p.add_argument("--rank", type=int, default=64)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--iters", type=int, default=10)
    a = p.parse_args()

    os.environ.update(MASTER_ADDR="127.0.0.1", RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    from relaxrec_megatron.model.build import build_model
    from relaxrec_megatron.parallel.distributed import free_port, init_distributed

    os.environ.setdefault("MASTER_PORT", str(free_port()))
    init_distributed(1, 1)
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    from relaxrec_megatron.model.settings import RelaxedSettings, transformer_config

    dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32
    settings = RelaxedSettings(settings_dict(a))
    relaxed = build_model(settings, dtype)
    vanilla = GPTModel(transformer_config(settings, dtype), get_gpt_layer_local_spec(normalization="RMSNorm"),
                       a.vocab, a.seq, position_embedding_type="rope")
    if torch.cuda.is_available():
        vanilla.cuda()
    tokens = torch.randint(0, a.vocab, (a.batch, a.seq), device=next(relaxed.parameters()).device)
    position_ids = torch.arange(a.seq, device=tokens.device)[None].expand(a.batch, -1)
    mask = torch.triu(torch.ones(a.seq, a.seq, dtype=torch.bool, device=tokens.device), 1)[None, None]
    runs = {
        "vanilla": lambda: vanilla(tokens, position_ids, mask, labels=tokens).sum(),
        "relaxed": lambda: relaxed(tokens, position_ids, mask, labels=tokens).sum(),
    }
    times: dict[str, list[float]] = {k: [] for k in runs}
    for it in range(a.iters + 2):
        for name, fn in runs.items():  # interleaved, so drift hits both alike
            sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
            sync()
            t0 = time.perf_counter()
            fn().backward()
            sync()
            if it >= 2:  # warm-up
                times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    measured = med["relaxed"] / med["vanilla"]
    flop_ratio = flops_per_token(a, True) / flops_per_token(a, False)
    n_relaxed = sum(p.numel() for p in relaxed.parameters())
    n_vanilla = sum(p.numel() for p in vanilla.parameters())
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU x{torch.get_num_threads()} threads"
    print(f"fwd+bwd, hidden {a.hidden}, {a.layers} unrolled layers = {a.layers // a.loops} shared x {a.loops} loops, "
          f"LoRA rank {a.rank}, batch {a.batch} x seq {a.seq}, {str(dtype).removeprefix('torch.')}, {device}")
    print(f"  vanilla GPTModel   {med['vanilla'] * 1e3:8.1f} ms/step  {n_vanilla / 1e6:7.1f}M params")
    print(f"  relaxed recursive  {med['relaxed'] * 1e3:8.1f} ms/step  {n_relaxed / 1e6:7.1f}M params")
    print(f"  measured time ratio {measured:.3f}   LoRA FLOP ratio {flop_ratio:.3f}   "
          f"-> {measured / flop_ratio:.3f} x FLOP ratio (target <= 1.10: {'ok' if measured <= flop_ratio * 1.10 else 'MISSED'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
