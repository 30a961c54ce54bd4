"""relaxrec train --config X.yaml [dotted.key=value ...]: uptrain (run it under torchrun for several ranks)."""

from __future__ import annotations


def add_parser(sub) -> None:
    p = sub.add_parser("train", help="uptrain a relaxed recursive model (megatron-core + DeepSpeed ZeRO + KD)",
                       description=__doc__)
    p.add_argument("--config", required=True, help="YAML run config, or a shipped one by name (gemma-2b-relaxed, tiny-cpu, ...)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. optim.lr=3e-4 parallel.tp=2")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.set_defaults(run=run)


def run(args) -> int:
    import json
    import os

    from ..training.config import load_config, plain

    cfg = load_config(args.config, args.overrides)
    if args.print_config:
        print(json.dumps(plain(cfg), indent=1, default=str))
        return 0
    if "WORLD_SIZE" not in os.environ:  # a single process without torchrun, on a port of its own
        from ..parallel.distributed import free_port

        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("LOCAL_RANK", "0")
    from ..errors import EXIT_REQUEUE
    from ..parallel.distributed import shutdown
    from ..training.run import Preempted, train

    try:
        train(cfg)
    except Preempted:  # the checkpoint is complete and the line is printed: exit for a requeue
        return EXIT_REQUEUE
    finally:
        shutdown()
    return 0
