"""relaxrec convert SOURCE OUTPUT: HF checkpoint -> relaxed recursive HF or Megatron dist checkpoint."""

from __future__ import annotations

import tempfile
from pathlib import Path

from ..hf.convert import convert_to_relaxed, format_report
from ..recursion.lora import SvdMethod
from .options import (
    add_recursion_args,
    add_threads_arg,
    apply_threads,
    parse_rank,
    recursion_spec,
    resolve_device,
)


def add_parser(sub) -> None:
    p = sub.add_parser("convert", help="HF checkpoint -> relaxed recursive HF checkpoint",
                       description="Convert an HF checkpoint (local folder or hub id) into a relaxed recursive one.")
    p.add_argument("source", help="HF checkpoint folder or hub repo id (Llama, Gemma, GPT-NeoX); with --to megatron "
                                  "also a relaxed recursive checkpoint (converted as it is)")
    p.add_argument("output", help="output folder (written atomically)")
    add_recursion_args(p)
    p.add_argument("--rank", type=parse_rank, default=0, help="LoRA rank for every target (0: pure recursive; 'full')")
    p.add_argument("--dtype", default="auto", help="output dtype: auto (the source's), bf16, fp16, fp32")
    p.add_argument("--overwrite", action="store_true", help="replace OUTPUT if it exists")
    p.add_argument("--to", choices=["hf", "megatron"], default="hf",
                   help="hf: relaxed recursive HF checkpoint; megatron: dist checkpoint (torch_dist) that loads at any TP/PP")
    p.add_argument("--svd", choices=[m.value for m in SvdMethod], default="exact",
                   help="exact: LAPACK's truncated SVD, O(d^3) per matrix; randomized: O(d^2 r), a residual "
                        "within a fraction of a percent of the optimal one (the table gives it)")
    p.add_argument("--device", default=None, help="where the SVDs run: cpu or cuda[:N] (default: cuda when present)")
    add_threads_arg(p)
    p.add_argument("--quiet", action="store_true", help="no progress bar and no table")
    p.set_defaults(run=run)


def run(args) -> int:
    from ..model.reference import Kind, open_as

    ref = open_as(args.source, "convert --to megatron" if args.to == "megatron" else "convert")
    apply_threads(args.threads)
    how = dict(svd=args.svd, device=resolve_device(args.device))
    source = args.source  # by its name: the relaxed config records it as source_model
    if args.to == "megatron":
        from ..model.convert_megatron import relaxed_to_megatron

        if ref.kind is Kind.RELAXED:  # converted as it is
            relaxed_to_megatron(source, args.output, overwrite=args.overwrite)
        else:
            with tempfile.TemporaryDirectory(dir=Path(args.output).expanduser().resolve().parent) as tmp:
                report = convert_to_relaxed(source, Path(tmp) / "relaxed", recursion_spec(args, args.rank),
                                            dtype=args.dtype, progress=not args.quiet, **how)
                relaxed_to_megatron(Path(tmp) / "relaxed", args.output, overwrite=args.overwrite)
            if not args.quiet:
                print(format_report(report))
    else:
        report = convert_to_relaxed(source, args.output, recursion_spec(args, args.rank), dtype=args.dtype,
                                    overwrite=args.overwrite, progress=not args.quiet, **how)
        if not args.quiet:
            print(format_report(report))
    if not args.quiet:
        print(f"wrote {args.output}")
    return 0
