"""The first thing a `relaxrec train` process does: hold its stop signals.

Importing the package takes seconds (transformers; more from a cluster's shared file system), and a
stop signal's default action in that time would end the process with the signal instead of exit 75:
a preempted SLURM job would then not be requeued. So the package, on import by the train command and
before anything else, blocks the stop signals; they stay pending until training.stops takes them.
Standard library only.
"""

from __future__ import annotations

import os
import signal
import sys

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT)
CLI_MODULE = "relaxrec_megatron.cli.main"


def is_train_command(argv: list[str]) -> bool:
    """argv as sys.orig_argv: `python [options] -m relaxrec_megatron.cli.main train ...` (torchrun's
    workers, the launchers) or `python .../relaxrec train ...` (the console script), not printing the
    config."""
    rest = None
    if len(argv) > 1 and os.path.basename(argv[1]) == "relaxrec":
        rest = argv[2:]
    elif "-m" in argv[1:]:
        at = argv.index("-m", 1)
        if argv[at + 1:at + 2] == [CLI_MODULE]:
            rest = argv[at + 2:]
    return bool(rest) and rest[0] == "train" and "--print-config" not in rest


def hold_stop_signals_if_training() -> None:
    if is_train_command(getattr(sys, "orig_argv", [])):
        signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
