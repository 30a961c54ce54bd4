"""torchrun, ending a stop in one line and the status the launch scripts requeue on.

    python -m relaxrec_megatron.parallel.torchrun [torchrun options] -m relaxrec_megatron.cli.main train ...

It is torchrun (`torch.distributed.run`) itself, given SIGUSR1 and SIGUSR2 to forward besides its
defaults. When torchrun forwards a stop signal, it waits `--shutdown-timeout` seconds for the
workers and then raises, so how they ended is lost with a traceback. The trainer's local rank 0
writes its stop line to the file named by RELAXREC_STOP_FILE once every rank has saved; this
wrapper prints that line and exits with EXIT_REQUEUE. Without a stop line, torchrun's own outcome
(and report) stands.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

from ..errors import EXIT_REQUEUE

STOP_FILE_ENV = "RELAXREC_STOP_FILE"
FORWARDED = "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1,SIGUSR2"


def main(argv: list[str] | None = None) -> int:
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main as torchrun

    argv = list(sys.argv[1:] if argv is None else argv)
    if not any(a.split("=")[0] in ("--signals-to-handle", "--signals_to_handle") for a in argv):
        argv = [f"--signals-to-handle={FORWARDED}", *argv]
    with tempfile.TemporaryDirectory(prefix="relaxrec-launch-") as tmp:
        stop_file = Path(tmp) / "stop"
        os.environ[STOP_FILE_ENV] = str(stop_file)
        try:
            torchrun(argv)
            return 0
        except (SignalException, ChildFailedError) as e:
            if stop_file.is_file():
                print(f"[launch] {stop_file.read_text().strip()}", file=sys.stderr, flush=True)
                return EXIT_REQUEUE
            if isinstance(e, SignalException):
                print(f"[launch] {e.sigval.name}: workers stopped without a checkpoint", file=sys.stderr)
                return 128 + int(e.sigval)
            raise


if __name__ == "__main__":
    sys.exit(main())
