"""relaxrec generate: greedy generation with the serving engine (continuous depth-wise batching)."""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

from ..errors import UserError
from ..model.reference import RELAXED_NAMES
from .options import exit_threshold, served_model


def add_parser(sub) -> None:
    p = sub.add_parser("generate", help="generate text with the serving engine", description=__doc__)
    p.add_argument("model", help=RELAXED_NAMES)
    p.add_argument("prompts", nargs="*", help="prompts (or --file)")
    p.add_argument("--file", default=None, help="one prompt per line")
    p.add_argument("--tokenizer", default=None, help="default: the one beside the checkpoint (or its run's source)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--mode", choices=["cdb", "seq", "static"], default="cdb")
    p.add_argument("--max-batch", type=int, default=8)
    p.add_argument("--exit", choices=["none", "maxprob", "margin"], default="none", help="early-exit rule")
    p.add_argument("--threshold", default="0.9", help="confidence needed to exit early, or auto: the one "
                                                      "`relaxrec eval exits` calibrated and stored in the checkpoint")
    p.add_argument("--schedule", choices=["bytes", "all"], default="bytes",
                   help="cdb: which loops a step runs (bytes: the most rows per weight byte read; all: every row)")
    p.set_defaults(run=run)


def run(args) -> int:
    from ..evaluation.models import load
    from ..inference.engine import Engine, ExitPolicy, Request, mean_loops_per_token
    from ..inference.weights import engine_weights

    prompts = list(args.prompts)
    if args.file:
        path = Path(args.file)
        if not path.is_file():
            raise UserError(f"--file {path}: no such file")
        prompts += [line.rstrip("\n") for line in path.read_text().splitlines() if line.strip()]
    if not prompts:
        raise UserError("no prompts: pass them as arguments or with --file")
    if args.max_new_tokens < 1 or args.max_batch < 1:
        raise UserError("--max-new-tokens and --max-batch must be >= 1")
    with tempfile.TemporaryDirectory(prefix="relaxrec-generate-") as tmp:  # a Megatron checkpoint's HF export
        ref = served_model(args.model, Path(tmp), args.tokenizer)
        threshold = exit_threshold(args.threshold, str(ref.folder), args.exit)
        model = load(ref, dtype="fp32")
    tokenizer = ref.tokenizer
    reqs = [Request(tokenizer(p).input_ids, args.max_new_tokens, eos_token_id=tokenizer.eos_token_id, id=i)
            for i, p in enumerate(prompts)]
    max_len = max(len(r.prompt) for r in reqs) + args.max_new_tokens
    engine = Engine(engine_weights(model), mode=args.mode, max_batch=args.max_batch, max_len=max_len,
                    exit_policy=ExitPolicy(args.exit, threshold), schedule=args.schedule)
    stream = len(reqs) == 1

    def on_token(req, tok):
        if stream:
            sys.stdout.write(tokenizer.decode([tok]))
            sys.stdout.flush()

    if stream:
        sys.stdout.write(prompts[0])
    stats = engine.run(reqs, on_token=on_token)
    if stream:
        print()
    else:
        for p, r in zip(prompts, reqs):
            print(f"--- {p}\n{p}{tokenizer.decode(r.output, skip_special_tokens=True)}")
    print(f"[{stats.tokens} tokens in {stats.seconds:.2f}s, {stats.tokens_per_s:.1f} tok/s, "
          f"{mean_loops_per_token(reqs, skip_first=False):.2f} loops/token, exits per loop {stats.exits_per_loop}]",
          file=sys.stderr)
    return 0
