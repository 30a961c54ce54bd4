"""relaxrec data prepare: corpus -> megatron-core indexed dataset (.bin/.idx)."""

from __future__ import annotations


def add_parser(sub) -> None:
    p = sub.add_parser("data", help="data preparation", description=__doc__)
    targets = p.add_subparsers(dest="target", required=True)
    s = targets.add_parser("prepare", help="tokenize a corpus into a megatron-core indexed dataset")
    s.add_argument("inputs", nargs="+", help="jsonl/json/parquet/txt/arrow files or folders of them, or hub dataset names")
    s.add_argument("--tokenizer", required=True, help="tokenizer folder or hub name (the source model's)")
    s.add_argument("--output-prefix", required=True, help="writes PREFIX.bin and PREFIX.idx")
    s.add_argument("--text-key", default="text", help="field holding the text (default: text)")
    s.add_argument("--workers", type=int, default=2, help="tokenizer processes")
    s.add_argument("--streaming", action="store_true", help="stream the corpus instead of loading it")
    s.add_argument("--split", default="train", help="split of a hub dataset")
    s.add_argument("--quiet", action="store_true")
    s.set_defaults(run=run)


def run(args) -> int:
    from ..data.prepare import prepare

    stats = prepare(args.inputs, args.tokenizer, args.output_prefix, text_key=args.text_key, workers=args.workers,
                    streaming=args.streaming, split=args.split, progress=not args.quiet)
    print(f"{stats['documents']} documents, {stats['tokens']} tokens in {stats['seconds']:.1f}s "
          f"({stats['tokens_per_s']:.0f} tokens/s) -> {stats['bin']}, {stats['idx']}")
    return 0
