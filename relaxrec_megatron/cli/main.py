"""relaxrec: convert, export, count and demo Relaxed Recursive Transformers."""

from __future__ import annotations

import argparse
import os
import sys

from ..console import VERBOSE_ENV, quiet_third_party
from ..errors import RankError, UserError
from ..runtime import environment, library_settings
from . import bench, compare, convert, data, demo, evaluate, export, generate, params, plan, train

# in pipeline order, as `relaxrec --help` lists them: size it, convert, prepare data, uptrain, export,
# evaluate, serve; then the benchmarks and the end-to-end jobs
COMMANDS = {"params": params, "plan": plan, "convert": convert, "data": data, "train": train, "export": export,
            "eval": evaluate, "generate": generate, "bench": bench, "compare": compare, "demo": demo}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="relaxrec", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, module in COMMANDS.items():
        module.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "train" and not args.print_config:  # a stop during start-up is noted, not fatal
        from ..training.stops import StopSignals

        StopSignals.for_this_process()
    asked = {VERBOSE_ENV: "1"} if getattr(args, "verbose", False) else {}  # a command's --verbose
    try:
        with environment(asked, replace=True), environment(library_settings()):
            quiet_third_party()
            return int(args.run(args) or 0)
    except UserError as e:  # every rank of a run raises a UserError, and rank 0 says it; a RankError its rank
        if os.environ.get("RANK", "0") == "0" or isinstance(e, RankError):
            print(f"relaxrec {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"relaxrec {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
