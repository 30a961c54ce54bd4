"""The first thing a `relaxrec train` process and its launcher do: hold their stop signals.

Importing the package takes seconds (transformers; more from a cluster's shared file system), and a
stop signal's default action in that time would end the process with the signal instead of exit 75:
a preempted SLURM job would then not be requeued (SLURM signals every process of the job step, the
launcher's agent too, and a preemption can come as a job starts). So the package, on import by the
train command or by the launcher of one (parallel.torchrun) and before anything else, blocks the
stop signals; they stay pending until training.stops, or the launcher, takes them. Standard library
only.
"""

from __future__ import annotations

import os
import signal
import sys

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT)
CLI_MODULE = "relaxrec_megatron.cli.main"
LAUNCHER_MODULE = "relaxrec_megatron.parallel.torchrun"


def cli_args(argv: list[str]) -> list[str] | None:
    """The command line after the program, when argv (as sys.orig_argv) runs the CLI: `python [options]
    -m relaxrec_megatron.cli.main ...` (torchrun's workers, the launchers) or `python .../relaxrec ...`
    (the console script); None for any other program."""
    if len(argv) > 1 and os.path.basename(argv[1]) == "relaxrec":
        return argv[2:]
    if "-m" in argv[1:]:
        at = argv.index("-m", 1)
        if argv[at + 1:at + 2] == [CLI_MODULE]:
            return argv[at + 2:]
    return None


def is_cli(argv: list[str]) -> bool:
    return cli_args(argv) is not None


def is_train_command(argv: list[str]) -> bool:
    """`relaxrec train ...`, not printing the config."""
    rest = cli_args(argv)
    return bool(rest) and rest[0] == "train" and "--print-config" not in rest


def is_train_launch(argv: list[str]) -> bool:
    """`python -m relaxrec_megatron.parallel.torchrun [options] -m relaxrec_megatron.cli.main train ...`."""
    if "-m" not in argv[1:]:
        return False
    at = argv.index("-m", 1)
    rest = argv[at + 2:]
    return argv[at + 1:at + 2] == [LAUNCHER_MODULE] and "-m" in rest and is_train_command(argv[:1] + rest[rest.index("-m"):])


def hold_stop_signals_if_training() -> None:
    argv = getattr(sys, "orig_argv", [])
    if is_train_command(argv) or is_train_launch(argv):
        signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
