"""relaxrec export: a relaxed recursive checkpoint (HF or Megatron) -> HF formats."""

from __future__ import annotations

import tempfile
from pathlib import Path

from ..hf.export import export_unrolled


def add_parser(sub) -> None:
    p = sub.add_parser("export", help="export a relaxed recursive checkpoint", description=__doc__)
    targets = p.add_subparsers(dest="target", required=True)
    u = targets.add_parser("hf-unrolled", help="materialise W' + BA per layer into the source architecture "
                                               "(loads with AutoModelForCausalLM, no custom code)")
    u.add_argument("source", help="relaxed recursive HF checkpoint or Megatron dist checkpoint folder")
    u.add_argument("output", help="output folder (written atomically)")
    u.add_argument("--dtype", default="auto", help="output dtype: auto (the checkpoint's), bf16, fp16, fp32")
    u.add_argument("--overwrite", action="store_true")
    u.add_argument("--quiet", action="store_true")
    u.set_defaults(run=run_unrolled)
    r = targets.add_parser("hf-relaxed", help="Megatron dist checkpoint -> relaxed recursive HF checkpoint")
    r.add_argument("source", help="Megatron dist checkpoint folder (from convert --to megatron or training)")
    r.add_argument("output", help="output folder (written atomically)")
    r.add_argument("--overwrite", action="store_true")
    r.add_argument("--quiet", action="store_true")
    r.set_defaults(run=run_relaxed)


def _is_megatron(source: str) -> bool:
    from ..model.checkpoint import CONFIG_FILE

    return (Path(source) / CONFIG_FILE).is_file()


def run_relaxed(args) -> int:
    from ..model.convert_megatron import megatron_to_relaxed

    megatron_to_relaxed(args.source, args.output, overwrite=args.overwrite)
    if not args.quiet:
        print(f"wrote {args.output}")
    return 0


def run_unrolled(args) -> int:
    if _is_megatron(args.source):
        from ..model.convert_megatron import megatron_to_relaxed

        with tempfile.TemporaryDirectory(dir=Path(args.output).expanduser().resolve().parent) as tmp:
            megatron_to_relaxed(args.source, Path(tmp) / "relaxed")
            export_unrolled(Path(tmp) / "relaxed", args.output, dtype=args.dtype, overwrite=args.overwrite,
                            progress=not args.quiet)
    else:
        export_unrolled(args.source, args.output, dtype=args.dtype, overwrite=args.overwrite, progress=not args.quiet)
    if not args.quiet:
        print(f"wrote {args.output}")
    return 0
