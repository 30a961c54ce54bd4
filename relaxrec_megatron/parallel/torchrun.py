"""torchrun, ending a stop in one line and the status the launch scripts requeue on.

    python -m relaxrec_megatron.parallel.torchrun [torchrun options] -m relaxrec_megatron.cli.main train ...

It is torchrun (`torch.distributed.run`) itself, given SIGUSR1 and SIGUSR2 to forward besides its
defaults, with three additions:
- before any worker starts, a `relaxrec train` command's settings are checked
  (training.preflight): a bad one ends the launch with its one line and exit 2, instead of a
  traceback per worker and a restart per MAX_RESTARTS;
- when torchrun forwards a stop signal, it waits `--shutdown-timeout` seconds for the workers and
  then raises, so how they ended is lost with a traceback. The trainer's local rank 0 writes its
  stop line to the file named by RELAXREC_STOP_FILE once every rank has saved; this wrapper prints
  that line and exits with EXIT_REQUEUE (also when the workers had not saved yet: the last
  complete checkpoint stands). Workers that all exited 2 (a UserError, said by rank 0) end it with
  2. Otherwise torchrun's own outcome (and report) stands;
- a stop signal that came while the agent started (held since its first import: startup) ends the
  launch as a stop before any worker starts; from then on each raises torchrun's SignalException,
  as torchrun's own handlers do once the workers run;
- the workers learn the agent's PID (RELAXREC_AGENT_PID), so that they die with it
  (parallel.process), and options this torchrun does not know are dropped, saying so; but for
  --shutdown-timeout, which torch 2.10 and 2.11 lack (their torchrun waits a fixed 30 s for the
  workers after forwarding a stop, less than a large model's save takes): there this process waits
  that long itself.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import tempfile
from pathlib import Path

from ..errors import EXIT_REQUEUE, UserError

STOP_FILE_ENV = "RELAXREC_STOP_FILE"
AGENT_PID_ENV = "RELAXREC_AGENT_PID"  # the workers end with this process (parallel.process)
FORWARDED = "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1,SIGUSR2"


def main(argv: list[str] | None = None) -> int:
    from ..console import verbose

    if not verbose():  # the agent's notices of each signal it forwards and each worker it stops
        for name in list(logging.Logger.manager.loggerDict):
            if name.startswith("torch.distributed.elastic"):
                logging.getLogger(name).setLevel(logging.ERROR)

    argv = list(sys.argv[1:] if argv is None else argv)
    if not any(a.split("=")[0] in ("--signals-to-handle", "--signals_to_handle") for a in argv):
        argv = [f"--signals-to-handle={FORWARDED}", *argv]
    argv, dropped = supported(argv)
    if "--shutdown-timeout" in dropped:
        wait_on_stop(float(dropped["--shutdown-timeout"]))
    try:
        check_run(argv)
    except UserError as e:
        print(f"relaxrec train: error: {e}", file=sys.stderr, flush=True)
        return 2
    from ..runtime import environment

    with tempfile.TemporaryDirectory(prefix="relaxrec-launch-") as tmp:
        stop_file = Path(tmp) / "stop"
        workers_read = {STOP_FILE_ENV: str(stop_file), AGENT_PID_ENV: str(os.getpid())}
        with environment(workers_read, replace=True):
            return _launch(argv, stop_file)


def _launch(argv: list[str], stop_file: Path) -> int:
    """torchrun itself; a stop or a worker's one-line error becomes the launcher's exit code."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main as torchrun

    try:
        take_stop_signals()
        torchrun(argv)
        return 0
    except (SignalException, ChildFailedError) as e:
        if stop_file.is_file():
            print(f"[launch] {stop_file.read_text().strip()}", file=sys.stderr, flush=True)
            return EXIT_REQUEUE
        if isinstance(e, SignalException):  # stopped before a checkpoint of this attempt: the last one stands
            print(f"[launch] stopped by {e.sigval.name} before this attempt saved a checkpoint; relaunch with "
                  "checkpoint.resume=auto to continue from the last complete one", file=sys.stderr, flush=True)
            return EXIT_REQUEUE
        if {f.exitcode for f in e.failures.values()} == {2}:  # a UserError: rank 0 printed its one line
            return 2
        raise


def take_stop_signals() -> None:
    """Each stop signal raises SignalException from here on; one held since start-up does so now."""
    from torch.distributed.elastic.multiprocessing.api import SignalException

    from ..startup import STOP_SIGNALS

    def stop(signum, frame):
        sig = signal.Signals(signum)
        raise SignalException(f"Process {os.getpid()} got signal: {sig}", sigval=sig)

    for sig in STOP_SIGNALS:
        signal.signal(sig, stop)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)


def check_run(argv: list[str]) -> None:
    """training.preflight in the launcher, for a `relaxrec train` command: a bad setting ends the
    launch with one line before any worker starts (and before torchrun would restart them)."""
    if "relaxrec_megatron.cli.main" not in argv:
        return
    command = argv[argv.index("relaxrec_megatron.cli.main") + 1:]
    if not command or command[0] != "train" or "--config" not in command or "--print-config" in command:
        return
    from ..training.config import load_config
    from ..training.preflight import preflight

    at = command.index("--config")
    config, overrides = command[at + 1], [a for a in command[1:] if "=" in a and not a.startswith("-")]
    options = dict(a.lstrip("-").replace("_", "-").split("=", 1) for a in argv[:argv.index("-m")] if "=" in a)
    try:
        world = int(options.get("nnodes", "1").split(":")[-1]) * int(options["nproc-per-node"])
    except (KeyError, ValueError):
        world = None
    preflight(load_config(config, overrides), world)


def supported(argv: list[str], known: set[str] | None = None) -> tuple[list[str], dict[str, str]]:
    """(argv without the options this torchrun does not know, {dropped option: its value}); says which
    are dropped, but for --shutdown-timeout, which wait_on_stop applies. --signals-to-handle and
    --shutdown-timeout came in later releases."""
    if known is None:
        from torch.distributed.run import get_args_parser

        known = set(get_args_parser()._option_string_actions)
    command = next((i for i, a in enumerate(argv) if not a.startswith("-")), len(argv))
    if "-m" in argv[:command]:
        command = argv.index("-m")
    keep, dropped = [], {}
    for i, a in enumerate(argv):
        option, _, value = a.partition("=")
        if i < command and option.startswith("--") and option not in known and value:
            dropped[option] = value
        else:
            keep.append(a)
    told = [o for o in dropped if o != "--shutdown-timeout"]
    if told:
        print(f"[launch] this torchrun has no {', '.join(told)}: running without", file=sys.stderr, flush=True)
    return keep, dropped


def wait_on_stop(seconds: float) -> None:
    """What --shutdown-timeout does, for a torchrun without it: after forwarding a stop signal, the
    agent waits `seconds` for its workers (to finish their save) before it kills them. This process
    is the agent; nothing else is changed."""
    from torch.distributed.elastic.multiprocessing import api

    close = api.PContext.close

    def close_waiting(self, death_sig=None, timeout=seconds):
        return close(self, death_sig, timeout)

    api.PContext.close = close_waiting


if __name__ == "__main__":
    sys.exit(main())
