"""relaxrec params MODEL: parameter counts of the vanilla, recursive and relaxed models (config only)."""

from __future__ import annotations

import json

from ..hf.arch import ArchError
from ..hf.convert import layer_shapes
from ..recursion import SharingPlan
from ..recursion.params import count_params
from ..shipped import hf_config
from .options import add_recursion_args, parse_rank, recursion_spec


def add_parser(sub) -> None:
    p = sub.add_parser("params", help="parameter counts from a config.json alone", description=__doc__)
    p.add_argument("model", help="config.json, a checkpoint folder, a shipped name (gemma-2b, tinyllama-1.1b, smollm2-135m, "
                                 "pythia-1b) or a hub repo id")
    add_recursion_args(p)
    p.add_argument("--rank", type=parse_rank, nargs="+", default=[0, 64, 128, 256, 512],
                   help="LoRA ranks to list (0: pure recursive; 'full')")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(run=run)


def human(n: int) -> str:
    for unit, div in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.3f}{unit}" if unit == "B" else f"{n / div:.1f}{unit}"
    return str(n)


def compute(args) -> dict:
    cfg = hf_config(args.model)
    adapter, shapes = layer_shapes(cfg)
    plan = SharingPlan(adapter.num_layers, args.loops, args.strategy)
    vanilla = count_params(shapes, plan.num_layers)
    rows = [{"variant": "vanilla", "rank": None, **vanilla.as_dict()}]
    for rank in args.rank:
        spec = recursion_spec(args, rank)
        ranks = spec.ranks(adapter)
        counts = count_params(shapes, plan.num_layers, plan.num_loops, ranks, spec.share_norms, spec.share_biases)
        name = "recursive" if not ranks else f"relaxed r={'full' if rank == -1 else rank}"
        rows.append({"variant": name, "rank": rank, "module_ranks": ranks, **counts.as_dict()})
    return {"model": args.model, "model_type": cfg.get("model_type"), "layers": plan.num_layers,
            "loops": plan.num_loops, "shared_layers": plan.num_shared, "strategy": plan.strategy.value, "rows": rows}


def run(args) -> int:
    result = compute(args)
    if args.json:
        print(json.dumps(result, indent=1))
        return 0
    print(f"{result['model']} ({result['model_type']}): {result['layers']} layers -> {result['shared_layers']} shared x "
          f"{result['loops']} loops ({result['strategy']})")
    cols = ("embedding", "linears", "norms", "lora", "non_embedding", "total")
    print(f"{'variant':<18}" + "".join(f"{c:>15}" for c in cols))
    for row in result["rows"]:
        print(f"{row['variant']:<18}" + "".join(f"{human(row[c]):>15}" for c in cols))
    return 0


__all__ = ["ArchError", "add_parser", "compute", "run"]
