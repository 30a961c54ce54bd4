"""relaxrec plan CONFIG --gpus N: will the run fit, and how long will it take? Per-GPU memory by term,
FLOPs per token and the time to the config's token budget at a stated MFU, before any GPU is used."""

from __future__ import annotations

from ..errors import UserError


def add_parser(sub) -> None:
    from ..training.memory import GPUS

    p = sub.add_parser("plan", help="per-GPU memory and time of a run, from its config", description=__doc__)
    p.add_argument("config", help="run config: a YAML file or a shipped name (gemma-2b-relaxed, ...)")
    p.add_argument("--gpus", type=int, required=True, help="GPUs in the run (TP x PP x DP)")
    p.add_argument("--gpu", default="h100", choices=sorted(GPUS), help="GPU model (default h100)")
    p.add_argument("--mfu", type=float, default=0.4, help="model FLOPs utilisation assumed for the time (default 0.4)")
    p.add_argument("--link-gbps", type=float, default=400.0,
                   help="network bandwidth per GPU in Gb/s for the data-parallel gradient traffic "
                        "(default 400: one NDR InfiniBand port per GPU)")
    p.add_argument("overrides", nargs="*", help="dotted overrides of the run config, right after CONFIG (e.g. optim.micro_batch_size=2)")
    p.set_defaults(run=run)


def gb(n: float) -> str:
    return f"{n / 1e9:.2f} GB"


def tokens(n: int) -> str:
    return f"{n / 1e9:.1f}B" if n >= 1e8 else f"{n / 1e6:.2f}M"


def duration(seconds: float) -> str:
    days, rest = divmod(seconds, 86400)
    if seconds < 3600:
        return f"{seconds / 60:.1f} min"
    return (f"{days:.0f} d " if days else "") + f"{rest / 3600:.1f} h"


def run(args) -> int:
    from ..training.config import load_config
    from ..training.memory import USABLE
    from ..training.planning import plan, suggestions

    if args.gpus < 1:
        raise UserError(f"--gpus must be at least 1, got {args.gpus}")
    if args.link_gbps <= 0:
        raise UserError(f"--link-gbps must be positive, got {args.link_gbps}")
    cfg = load_config(args.config, args.overrides)
    got = plan(cfg, args.gpus, args.gpu, args.mfu, args.link_gbps)
    lay, g = got["layout"], got["gpu"]
    p, o = cfg.parallel, cfg.optim
    print(f"[plan] {cfg.run.name}: {cfg.model.source}, {got['student_params'] / 1e9:.3f}B student parameters, "
          f"{args.gpus} x {g.name} = TP {lay.tp} x PP {lay.pp} x DP {lay.dp}, ZeRO-{p.zero_stage}, {cfg.model.dtype}, "
          f"micro-batch {o.micro_batch_size} x {cfg.data.seq_length}, recompute {'on' if p.recompute else 'off'}")
    stages = got["stages"]
    header = "".join(f"{f'stage {s}':>12}" for s in range(len(stages))) if len(stages) > 1 else f"{'per GPU':>12}"
    print(f"{'memory':<22}{header}")
    for term in stages[0]:
        print(f"{term:<22}" + "".join(f"{st[term] / 1e9:>9.2f} GB" for st in stages))
    print(f"{'total':<22}" + "".join(f"{sum(st.values()) / 1e9:>9.2f} GB" for st in stages))
    budget = USABLE * g.memory_gb * 1e9
    verdict = "fits" if got["fits"] else "does NOT fit"
    print(f"[plan] {verdict}: {gb(got['total'])} on the fullest GPU of {g.memory_gb:.0f} GB "
          f"({USABLE:.0%} usable: {gb(budget)})")
    print(f"[plan] {got['flops_per_token'] / 1e9:.2f} GFLOP per token (student forward, backward"
          f"{', recompute' if p.recompute else ''}{', teacher forward' if cfg.kd.enabled else ''}); "
          f"{tokens(got['tokens'])} tokens at {args.mfu:.0%} MFU ({g.peak_bf16 / 1e12:.0f} TFLOP/s bf16 peak): "
          f"{duration(got['seconds'])} on {args.gpus} GPU{'s' if args.gpus > 1 else ''} ({args.gpus * got['seconds'] / 3600:,.0f} GPU-hours)")
    print_dp_traffic(cfg, got)
    if cfg.model.relaxed:
        print("[plan] model.relaxed: sized as model.recursion applied to model.source (the settings that "
              "checkpoint must have been made with)")
    if cfg.model.fp8:
        print("[plan] model.fp8: planned as bf16 (Transformer Engine's FP8 weight copies are not counted, and the "
              "time is at the bf16 peak; FP8 GEMMs run up to 2x faster)")
    if not got["fits"]:
        fixes = suggestions(cfg, args.gpus, args.gpu, args.mfu)
        if fixes:
            print("[plan] each of these alone makes it fit:")
            for label, total in fixes:
                print(f"  {label:<60}{gb(total):>12}")
        else:
            print("[plan] no single change among recompute, micro-batch, ZeRO-2 and TP makes it fit; add GPUs "
                  "for more DP (ZeRO shards the optimizer) or combine changes")
        return 1
    return 0


def print_dp_traffic(cfg, got: dict) -> None:
    t, lay, p = got["dp_traffic"], got["layout"], cfg.parallel
    if lay.dp < 2:
        print("[plan] no data-parallel gradient traffic (DP 1)")
        return
    reduce = "fp32" if p.grad_reduce_dtype == "fp32" else cfg.model.dtype
    how = (f"{reduce} all-reduce of each micro-batch's gradients during backward" if p.zero_stage == 2
           else f"one {reduce} all-reduce of the accumulated gradients at the step")
    if p.zero_stage:
        how += f", {cfg.model.dtype} all-gather of the updated weights"
    print(f"[plan] DP gradient traffic per GPU and step ({how}): {gb(t['bytes'])} handed to collectives, "
          f"{gb(t['wire'])} sent (ring): {t['seconds']:.2f} s at {got['link_gbps']:g} Gb/s"
          + (f" ({t['overlapped_seconds']:.2f} s of it while backward runs)" if t["overlapped"] else "")
          + f", against a {got['step_seconds']:.1f} s step at the stated MFU")
