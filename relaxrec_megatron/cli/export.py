"""relaxrec export: a relaxed recursive checkpoint (HF or Megatron) -> HF formats."""

from __future__ import annotations

import tempfile
from pathlib import Path

from ..errors import UserError
from ..files import check_output
from ..hf.export import export_unrolled
from ..model.folder import MEGATRON_NAMES, local_checkpoint, not_a_checkpoint
from .options import add_threads_arg, apply_threads


def add_parser(sub) -> None:
    p = sub.add_parser("export", help="export a relaxed recursive checkpoint", description=__doc__)
    targets = p.add_subparsers(dest="target", required=True)
    u = targets.add_parser("hf-unrolled", help="materialise W' + BA per layer into the source architecture "
                                               "(loads with AutoModelForCausalLM, no custom code)")
    u.add_argument("source", help="relaxed recursive HF checkpoint or Megatron dist checkpoint folder")
    u.add_argument("output", help="output folder (written atomically)")
    u.add_argument("--dtype", default="auto", help="output dtype: auto (the checkpoint's), bf16, fp16, fp32")
    u.add_argument("--overwrite", action="store_true")
    add_threads_arg(u)
    u.add_argument("--quiet", action="store_true")
    u.set_defaults(run=run_unrolled)
    r = targets.add_parser("hf-relaxed", help="Megatron dist checkpoint -> relaxed recursive HF checkpoint")
    r.add_argument("source", help="Megatron dist checkpoint folder (from convert --to megatron or training)")
    r.add_argument("output", help="output folder (written atomically)")
    r.add_argument("--overwrite", action="store_true")
    r.add_argument("--quiet", action="store_true")
    r.set_defaults(run=run_relaxed)


def _megatron_source(source: str) -> Path | None:
    """The Megatron dist checkpoint SOURCE names, or None for an HF folder."""
    path = Path(source).expanduser()
    if not path.is_dir():
        raise not_a_checkpoint(source)
    return local_checkpoint(path, source)


def run_relaxed(args) -> int:
    from ..model.convert_megatron import megatron_to_relaxed

    ckpt = _megatron_source(args.source)
    if ckpt is None:
        raise UserError(f"{args.source}: an HF folder, not a Megatron checkpoint; pass {MEGATRON_NAMES}")
    megatron_to_relaxed(ckpt, args.output, overwrite=args.overwrite)
    if not args.quiet:
        print(f"wrote {args.output}")
    return 0


def run_unrolled(args) -> int:
    apply_threads(args.threads)
    ckpt = _megatron_source(args.source)
    if ckpt is not None:
        from ..model.convert_megatron import megatron_to_relaxed

        check_output(args.output, args.overwrite)
        with tempfile.TemporaryDirectory(dir=Path(args.output).expanduser().resolve().parent) as tmp:
            megatron_to_relaxed(ckpt, Path(tmp) / "relaxed")
            export_unrolled(Path(tmp) / "relaxed", args.output, dtype=args.dtype, overwrite=args.overwrite,
                            progress=not args.quiet)
    else:
        export_unrolled(args.source, args.output, dtype=args.dtype, overwrite=args.overwrite, progress=not args.quiet)
    if not args.quiet:
        print(f"wrote {args.output}")
    return 0
