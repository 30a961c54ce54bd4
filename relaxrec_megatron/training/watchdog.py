"""Finding a stalled rank: every rank reports its progress to the run's rendezvous store, and a
thread of each rank ends the run when a step takes far longer than steps take.

A rank that stops making progress (a hung kernel, a stopped process, a dead NIC) leaves the others
waiting inside a collective, which only gives up after the process group's timeout, and then says
nothing of who is to blame. Here, after the first WARMUP_STEPS steps, a step (or an evaluation, or
a save, with their own limits) that runs longer than `factor` times the slowest step so far, and at
least `floor_s`, ends the run: the lowest rank that is not behind prints one line naming the ranks
that are behind and at which step, and every rank that notices exits with EXIT_STALLED, so torchrun
restarts the run from its last checkpoint (MAX_RESTARTS) or ends it.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from datetime import timedelta

import torch.distributed as dist

EXIT_STALLED = 3
WARMUP_STEPS = 3
KEY = "relaxrec/progress/{}"
TICK_S = 1.0
ANSWER_S = 3.0  # how long a rank that hit its limit waits for the others' watches to say they wait too


class StallWatch:
    def __init__(self, factor: float, floor_s: float, save_s: float, eval_batches: int):
        self.factor, self.floor_s, self.save_s, self.eval_batches = factor, floor_s, save_s, eval_batches
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.store = dist.distributed_c10d._get_default_store()
        self.slowest = 0.0
        self.steps_seen = 0
        self.phase: tuple[str, int, float] | None = None  # (what, step, started)
        self._stop = threading.Event()
        self._beat(0, "start")
        threading.Thread(target=self._watch, name="relaxrec-stall-watch", daemon=True).start()

    def _beat(self, step: int, what: str) -> None:
        try:
            self.store.set(KEY.format(self.rank), f"{step} {what}")
        except Exception:  # the store going away is the launcher's to report
            pass

    def begin(self, what: str, step: int) -> None:
        """A phase starts: 'step' (with the number of the step it runs), 'eval' or 'save' (with the
        number of the last step done)."""
        self.phase = (what, step, time.monotonic())
        self._beat(step, what)

    def end(self) -> None:
        if self.phase is None:
            return
        what, step, started = self.phase
        if what == "step":
            self.steps_seen += 1
            if self.steps_seen > 1:  # the first step compiles, allocates and warms caches
                self.slowest = max(self.slowest, time.monotonic() - started)
        self.phase = None
        self._beat(step, "done")

    def limit(self, what: str) -> float | None:
        """Seconds a phase may run: a save its own limit; a step or an evaluation (of eval_batches
        forward passes) `factor` times the slowest step, at least floor_s, once there is a step time."""
        if what == "save":
            return self.save_s
        if self.steps_seen < WARMUP_STEPS:
            return None
        return max(self.factor * self.slowest * (self.eval_batches if what == "eval" else 1), self.floor_s)

    def close(self) -> None:
        self._stop.set()

    def _watch(self) -> None:
        last, paused, seen = time.monotonic(), 0.0, None
        while not self._stop.wait(TICK_S):
            now = time.monotonic()
            phase = self.phase
            if phase is not seen:
                seen, paused = phase, 0.0
            paused += max(0.0, now - last - 2 * TICK_S)  # this process was stopped: its own delay, not the others'
            last = now
            if phase is None:
                continue
            what, step, started = phase
            limit = self.limit(what)
            if limit is None or now - started - paused <= limit:
                continue
            self._report(what, step, now - started, limit)
            os._exit(EXIT_STALLED)

    def _report(self, what: str, step: int, waited: float, limit: float) -> None:
        """Says who is waited for: the ranks whose watch did not also report waiting (a stopped or
        hung process cannot), read from the store after a few seconds."""
        self._beat(step, "waiting")
        time.sleep(ANSWER_S)
        progress = {}
        for r in range(self.world):
            try:
                self.store.wait([KEY.format(r)], timedelta(seconds=2))
                done, state = self.store.get(KEY.format(r)).decode().split()
                progress[r] = (state, f"in {state} {done}" if state != "done" else f"done with step {done}")
            except Exception:
                progress[r] = ("silent", "no report")
        waiting = [r for r, (state, _) in progress.items() if state == "waiting"]
        if self.rank not in waiting or self.rank != min(waiting):  # the store is gone: another rank ended the run
            return
        behind = [r for r in range(self.world) if r not in waiting]
        who = ("; waiting for " + ", ".join(f"rank {r} ({progress[r][1]})" for r in behind)) if behind \
            else "; every rank is waiting in it (a collective hung)"
        print(f"[train] stalled: {what} {step} has run {waited:.0f} s, over its limit of {limit:.0f} s{who}; "
              f"ending the run (exit {EXIT_STALLED}): the launcher restarts it from its last checkpoint "
              "(MAX_RESTARTS) or stops", file=sys.stderr, flush=True)
