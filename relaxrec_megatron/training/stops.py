"""Stop signals of a run: what a cluster, a launcher or a user sends to end a run in order.

SIGTERM (SLURM's time limit, `scancel`, torchrun's shutdown), SIGUSR1 (SLURM's `--signal` preemption
notice), SIGINT (Ctrl-C), SIGHUP (the terminal gone) and SIGQUIT are noted when they arrive and acted
on by every rank together at the end of the step: finish it, save, exit 75 (errors.EXIT_REQUEUE). A
second SIGINT more than GRACE_S after the first stops at once, without a checkpoint.

SLURM delivers a signal to every process of a job step, not only to the ranks: the helper processes
a rank starts (megatron's checkpoint writer and its multiprocessing Manager, wandb's service) would
die of it in the middle of a save. So the signals are blocked in the rank's threads and in the
processes it starts from then on (a blocked set is inherited across fork and exec), and a thread of
the rank's own takes them with sigwait; the handlers stay installed for the threads that started
before (torch's, gloo's) and may still be handed one.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time

from ..startup import STOP_SIGNALS as SIGNALS

GRACE_S = 2.0  # a launcher's forwarded copy of the same Ctrl-C arrives well within this


class StopSignals:
    _installed: "StopSignals | None" = None

    @classmethod
    def for_this_process(cls) -> "StopSignals":
        """The process's one instance, installed on first use. The train command holds the signals
        from its first import (relaxrec_megatron.startup), so that a stop during start-up is noted
        here too."""
        if cls._installed is None:
            cls._installed = cls()
            cls._installed.install()
        return cls._installed

    def __init__(self):
        self.received: str | None = None
        self.phase = "start-up"  # what the run is doing, e.g. "step 12" (training.run keeps it current)
        self.received_in: str | None = None  # the phase the first signal arrived in
        self._first_at = 0.0
        self._lock = threading.Lock()

    def install(self) -> None:
        for sig in SIGNALS:
            signal.signal(sig, self._handler)
        signal.pthread_sigmask(signal.SIG_BLOCK, SIGNALS)
        threading.Thread(target=self._take, name="relaxrec-stop-signals", daemon=True).start()

    def _take(self) -> None:
        while True:
            self.note(signal.sigwait(set(SIGNALS)))

    def _handler(self, signum, frame) -> None:
        self.note(signum)

    def note(self, signum: int) -> None:
        with self._lock:
            now = time.monotonic()
            if self.received is None:
                self.received, self._first_at = signal.Signals(signum).name, now
                self.received_in = self.phase
            elif signum == signal.SIGINT and now - self._first_at > GRACE_S:
                print("[train] second SIGINT: stopping now, without a checkpoint", file=sys.stderr, flush=True)
                os._exit(128 + signal.SIGINT)
