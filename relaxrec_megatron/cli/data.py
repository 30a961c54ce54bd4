"""relaxrec data: corpus -> megatron-core indexed datasets (.bin/.idx): prepare (whole or one shard),
merge shards, and count what a run will read."""

from __future__ import annotations

from ..errors import UserError


def add_parser(sub) -> None:
    p = sub.add_parser("data", help="data preparation", description=__doc__)
    targets = p.add_subparsers(dest="target", required=True)
    s = targets.add_parser("prepare", help="tokenize a corpus into a megatron-core indexed dataset")
    s.add_argument("inputs", nargs="+", help="jsonl/json/parquet/txt/arrow files or folders of them, or hub dataset names")
    s.add_argument("--tokenizer", required=True, help="tokenizer folder or hub name (the source model's)")
    s.add_argument("--output-prefix", required=True, help="writes PREFIX.bin and PREFIX.idx")
    s.add_argument("--text-key", default="text", help="field holding the text (default: text)")
    s.add_argument("--workers", type=int, default=2, help="tokenizer processes, one per core (0: in this process)")
    s.add_argument("--streaming", action="store_true", help="stream the corpus instead of loading it")
    s.add_argument("--split", default="train", help="split of a hub dataset")
    s.add_argument("--shard", metavar="I/N", help="prepare only the I-th of N contiguous parts (0 <= I < N), by files "
                   "when there are at least N input files, else by documents; writes PREFIX-IIIII-of-NNNNN and "
                   "skips a shard already made from the same inputs")
    s.add_argument("--overwrite", action="store_true", help="with --shard: prepare the shard again even if it exists")
    s.add_argument("--quiet", action="store_true")
    s.set_defaults(run=run_prepare)
    m = targets.add_parser("merge", help="concatenate datasets or shard sets, in order, into one")
    m.add_argument("prefixes", nargs="+", help="dataset prefixes (a shard set's PREFIX stands for all its shards)")
    m.add_argument("--output-prefix", required=True, help="writes PREFIX.bin and PREFIX.idx")
    m.set_defaults(run=run_merge)
    st = targets.add_parser("stats", help="documents and tokens; with --config, the epochs a run reads")
    st.add_argument("prefixes", nargs="*", help="dataset prefixes (default with --config: its data.blend), and "
                    "with --config dotted overrides of the run config (e.g. optim.train_steps=100)")
    st.add_argument("--config", help="run config (file or shipped name): epochs of each blend component")
    st.set_defaults(run=run_stats)


def run_prepare(args) -> int:
    from ..data.corpus import Shard
    from ..data.prepare import prepare

    if args.workers < 0:
        raise UserError(f"--workers must be 0 (in this process) or more, got {args.workers}")
    shard = Shard.parse(args.shard) if args.shard else None
    if args.overwrite and shard is None:
        raise UserError("--overwrite goes with --shard (a whole preparation always writes its output)")
    stats = prepare(args.inputs, args.tokenizer, args.output_prefix, text_key=args.text_key, workers=args.workers,
                    streaming=args.streaming, split=args.split, shard=shard, overwrite=args.overwrite,
                    progress=not args.quiet)
    where = f"{stats['bin']}, {stats['idx']}"
    if stats["skipped"]:
        print(f"shard {shard} already prepared from these inputs ({stats['documents']} documents, "
              f"{stats['tokens']} tokens): {where}; skipped")
        return 0
    print(f"{stats['documents']} documents, {stats['tokens']} tokens in {stats['seconds']:.1f}s "
          f"({stats['tokens_per_s']:.0f} tokens/s, {stats['tokens_per_s'] / max(args.workers, 1):.0f} per worker, after "
          f"{stats['startup_seconds']:.1f}s of startup) -> {where}")
    return 0


def run_merge(args) -> int:
    from ..data.indexed import merge, resolve

    parts = sum(len(resolve(p)) for p in args.prefixes)
    c = merge(args.prefixes, args.output_prefix)
    print(f"merged {parts} datasets: {c.documents} documents, {c.tokens} tokens -> {c.prefix}.bin, {c.prefix}.idx")
    return 0


def run_stats(args) -> int:
    from ..data.indexed import counts, resolve

    prefixes = list(args.prefixes)
    cfg = None
    if args.config:
        from ..training.config import load_config

        cfg = load_config(args.config, [p for p in prefixes if "=" in p])
        prefixes = [p for p in prefixes if "=" not in p]
    elif any("=" in p for p in prefixes):
        raise UserError("overrides (key=value) need --config")
    if cfg is not None and not prefixes:
        prefixes = [str(p) for p in cfg.data.blend[1::2]]
    if not prefixes:
        raise UserError("name dataset prefixes, or a run config with --config")
    width = max(len(p) for p in prefixes) + 2
    print(f"{'dataset':<{width}}{'shards':>7}{'documents':>12}{'tokens':>15}{'tokens/doc':>11}")
    for p in prefixes:
        parts = [counts(s) for s in resolve(p)]
        docs, tokens = sum(c.documents for c in parts), sum(c.tokens for c in parts)
        print(f"{p:<{width}}{len(parts):>7}{docs:>12}{tokens:>15}{tokens / max(docs, 1):>11.0f}")
    if cfg is None:
        return 0
    return _epochs(cfg)


def _epochs(cfg) -> int:
    from megatron.core.datasets.blended_megatron_dataset_config import parse_and_normalize_split

    from ..data.indexed import blend_use, repeat_warning

    weights, prefixes = [float(w) for w in cfg.data.blend[0::2]], [str(p) for p in cfg.data.blend[1::2]]
    tokens = cfg.tokens()
    share = parse_and_normalize_split(cfg.data.split)[0]
    print(f"\nthe run reads {tokens:,} tokens ({cfg.optim.train_steps} steps x {cfg.optim.global_batch_size} "
          f"x {cfg.data.seq_length}); the train split is {share:.1%} of each dataset's documents")
    width = max([len(p) for p in prefixes] + [9]) + 2
    print(f"{'component':<{width}}{'weight':>8}{'train tokens':>18}{'read':>18}{'epochs':>10}")
    uses = blend_use(weights, prefixes, cfg.data.split, tokens)
    for u in uses:
        print(f"{u.prefix:<{width}}{u.share:>8.3f}{u.train_tokens:>18,}{u.read:>18,.0f}{u.epochs:>10.2f}")
    warning = repeat_warning(uses)
    if warning:
        print(f"warning: {warning}")
    return 0
