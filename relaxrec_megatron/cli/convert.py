"""relaxrec convert SOURCE OUTPUT: HF checkpoint -> relaxed recursive HF checkpoint."""

from __future__ import annotations

from ..hf.convert import convert_to_relaxed, format_report
from .options import add_recursion_args, parse_rank, recursion_spec


def add_parser(sub) -> None:
    p = sub.add_parser("convert", help="HF checkpoint -> relaxed recursive HF checkpoint",
                       description="Convert an HF checkpoint (local folder or hub id) into a relaxed recursive one.")
    p.add_argument("source", help="HF checkpoint folder or hub repo id (Llama, Gemma, GPT-NeoX)")
    p.add_argument("output", help="output folder (written atomically)")
    add_recursion_args(p)
    p.add_argument("--rank", type=parse_rank, default=0, help="LoRA rank for every target (0: pure recursive; 'full')")
    p.add_argument("--dtype", default="auto", help="output dtype: auto (the source's), bf16, fp16, fp32")
    p.add_argument("--overwrite", action="store_true", help="replace OUTPUT if it exists")
    p.add_argument("--quiet", action="store_true", help="no progress bar and no table")
    p.set_defaults(run=run)


def run(args) -> int:
    report = convert_to_relaxed(args.source, args.output, recursion_spec(args, args.rank), dtype=args.dtype,
                                overwrite=args.overwrite, progress=not args.quiet)
    if not args.quiet:
        print(format_report(report))
        print(f"wrote {args.output}")
    return 0
