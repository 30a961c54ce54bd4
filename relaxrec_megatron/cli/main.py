"""relaxrec: convert, export, count and demo Relaxed Recursive Transformers."""

from __future__ import annotations

import argparse
import sys

from ..console import quiet_third_party
from ..errors import UserError
from . import bench, compare, convert, data, demo, evaluate, export, generate, params, plan, train

COMMANDS = {"convert": convert, "export": export, "params": params, "data": data, "train": train, "eval": evaluate,
            "generate": generate, "plan": plan, "bench": bench, "compare": compare, "demo": demo}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="relaxrec", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, module in COMMANDS.items():
        module.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    quiet_third_party()
    args = build_parser().parse_args(argv)
    try:
        return int(args.run(args) or 0)
    except UserError as e:
        print(f"relaxrec {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"relaxrec {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
