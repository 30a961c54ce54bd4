"""relaxrec train --config X.yaml [dotted.key=value ...]: uptrain (run it under torchrun for several ranks)."""

from __future__ import annotations


def add_parser(sub) -> None:
    p = sub.add_parser("train", help="uptrain a relaxed recursive model (megatron-core + DeepSpeed ZeRO + KD)",
                       description=__doc__)
    p.add_argument("--config", required=True, help="YAML run config, or a shipped one by name (gemma-2b-relaxed, tiny-cpu, ...)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. optim.lr=3e-4 parallel.tp=2")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.add_argument("--check", action="store_true",
                   help="run the checks a launch runs before any work (settings, model.source and model.relaxed, "
                        "the parallel layout against the model, disk room, data.blend, eval.tasks) and exit")
    p.set_defaults(run=run)


def run(args) -> int:
    import json
    import os

    from ..training.config import load_config, plain

    cfg = load_config(args.config, args.overrides)
    if args.print_config:
        print(json.dumps(plain(cfg), indent=1, default=str))
        return 0
    if args.check:
        return check(cfg)
    from contextlib import nullcontext

    from ..errors import EXIT_REQUEUE
    from ..parallel.distributed import shutdown
    from ..runtime import environment, single_process_launch
    from ..training.run import Preempted, train

    alone = "WORLD_SIZE" not in os.environ  # not under torchrun
    with environment(single_process_launch(), replace=True) if alone else nullcontext():
        try:
            train(cfg)
        except Preempted:  # the checkpoint is complete and the line is printed: exit for a requeue
            return EXIT_REQUEUE
        finally:
            shutdown()
    return 0


def check(cfg) -> int:
    """Every check of training.preflight, data.blend and eval.tasks, in this process, for the world
    size of the launch it is run under (WORLD_SIZE, else 1); nothing is written."""
    import os

    from ..training.preflight import preflight
    from ..training.run import data_check, eval_tasks_check

    world = int(os.environ.get("WORLD_SIZE", "1"))
    preflight(cfg, world)
    data_check(cfg)
    eval_tasks_check(cfg)
    print(f"[train] {cfg.run.name}: the settings, the model, the layout for {world} rank(s), the disk and the data "
          "check out")
    return 0
