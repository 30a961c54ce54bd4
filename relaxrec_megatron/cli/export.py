"""relaxrec export: a relaxed recursive checkpoint (HF or Megatron) -> HF formats."""

from __future__ import annotations

import tempfile
from contextlib import nullcontext
from pathlib import Path

from ..files import check_output
from ..hf.export import export_unrolled
from ..model.reference import MEGATRON_NAMES, RELAXED_NAMES, Kind, open_as
from .options import add_threads_arg, apply_threads


def add_parser(sub) -> None:
    p = sub.add_parser("export", help="export a relaxed recursive checkpoint", description=__doc__)
    targets = p.add_subparsers(dest="target", required=True)
    u = targets.add_parser("hf-unrolled", help="materialise W' + BA per layer into the source architecture "
                                               "(loads with AutoModelForCausalLM, no custom code)")
    u.add_argument("source", help=RELAXED_NAMES)
    u.add_argument("output", help="output folder (written atomically)")
    u.add_argument("--dtype", default="auto", help="output dtype: auto (the checkpoint's), bf16, fp16, fp32")
    u.add_argument("--overwrite", action="store_true")
    add_threads_arg(u)
    u.add_argument("--quiet", action="store_true")
    u.set_defaults(run=run_unrolled)
    r = targets.add_parser("hf-relaxed", help="Megatron dist checkpoint -> relaxed recursive HF checkpoint")
    r.add_argument("source", help=MEGATRON_NAMES)
    r.add_argument("output", help="output folder (written atomically)")
    r.add_argument("--overwrite", action="store_true")
    r.add_argument("--quiet", action="store_true")
    r.set_defaults(run=run_relaxed)


def run_relaxed(args) -> int:
    from ..model.convert_megatron import megatron_to_relaxed

    ref = open_as(args.source, "export hf-relaxed")
    megatron_to_relaxed(ref.megatron(), args.output, overwrite=args.overwrite)
    if not args.quiet:
        print(f"wrote {args.output}")
    return 0


def run_unrolled(args) -> int:
    apply_threads(args.threads)
    ref = open_as(args.source, "export hf-unrolled")
    check_output(args.output, args.overwrite)
    # a Megatron checkpoint is exported to a relaxed HF folder beside the output first
    workdir = tempfile.TemporaryDirectory(dir=Path(args.output).expanduser().resolve().parent) \
        if ref.kind is Kind.MEGATRON else nullcontext()
    with workdir as tmp:
        export_unrolled(ref.hf_folder(Path(tmp) if tmp else None), args.output, dtype=args.dtype, overwrite=args.overwrite,
                        progress=not args.quiet)
    if not args.quiet:
        print(f"wrote {args.output}")
    return 0
