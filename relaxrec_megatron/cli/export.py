"""relaxrec export hf-unrolled RELAXED OUTPUT: back to a vanilla checkpoint of the source architecture."""

from __future__ import annotations

from ..hf.export import export_unrolled


def add_parser(sub) -> None:
    p = sub.add_parser("export", help="export a relaxed recursive checkpoint", description=__doc__)
    targets = p.add_subparsers(dest="target", required=True)
    u = targets.add_parser("hf-unrolled", help="materialise W' + BA per layer into the source architecture "
                                               "(loads with AutoModelForCausalLM, no custom code)")
    u.add_argument("relaxed", help="relaxed recursive HF checkpoint folder")
    u.add_argument("output", help="output folder (written atomically)")
    u.add_argument("--dtype", default="auto", help="output dtype: auto (the checkpoint's), bf16, fp16, fp32")
    u.add_argument("--overwrite", action="store_true")
    u.add_argument("--quiet", action="store_true")
    u.set_defaults(run=run)


def run(args) -> int:
    export_unrolled(args.relaxed, args.output, dtype=args.dtype, overwrite=args.overwrite, progress=not args.quiet)
    if not args.quiet:
        print(f"wrote {args.output}")
    return 0
