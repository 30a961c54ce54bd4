"""Processes tied to the one that started them: a worker ends when its launcher does, and a
worker's helper processes end with it.

torchrun's agent watches its workers; if the agent itself dies (kill -9, its node's shell gone), the
kernel re-parents them and they would train on unwatched. `die_with_parent` asks the kernel to kill
this process when its parent exits (prctl PR_SET_PDEATHSIG, Linux) and exits at once if the parent
is already gone. `children_die_with_this_process` does the same for every process this one forks
from then on (megatron's checkpoint writers and their multiprocessing Manager).
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys

PR_SET_PDEATHSIG = 1


def die_with_parent(expected_parent: int | None = None) -> bool:
    """True when the kernel will kill this process with its parent (Linux); exits if it is gone."""
    parent = os.getppid() if expected_parent is None else expected_parent
    if not sys.platform.startswith("linux") or not _tie_to_parent():
        return False
    if os.getppid() != parent:  # the parent died before the request: no signal will come
        print("[train] the launcher of this process is gone; stopping", file=sys.stderr, flush=True)
        os._exit(1)
    return True


def _tie_to_parent() -> bool:
    """SIGKILL for this process when its parent exits; whether the kernel took the request."""
    return ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) == 0


def children_die_with_this_process() -> None:
    """Every process forked from this one from now on is killed when this one exits (Linux)."""
    if sys.platform.startswith("linux") and not getattr(children_die_with_this_process, "done", False):
        os.register_at_fork(after_in_child=_tie_to_parent)
        children_die_with_this_process.done = True
