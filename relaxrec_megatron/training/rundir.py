"""One run per run folder, and a run folder that holds what its config says.

RunLock: rank 0 holds RUN/.lock (its PID, host, launch id and start time) for the life of the run.
A second run on the same folder stops with one line naming the holder. The lock of a run that is
gone (its process dead on this host, or an earlier attempt of the same launch: a torchrun restart,
a requeued SLURM job) is taken over, saying so. (The lock is a file in the run folder, which every
node sees: checkpoints need a shared file system anyway.)

Recipe: RUN/init/ holds the conversion the run trains (student) and distills from (teacher).
init/recipe.json records what they were made from (source, recursion, dtype); a relaunch whose
config asks for something else stops with one line instead of training the old model under the new
config.
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

from ..errors import UserError

LOCK_FILE = ".lock"
RECIPE_FILE = "recipe.json"


def launch_id() -> str:
    """What stays the same across restarts of one launch: the SLURM job (requeues keep its id), else
    the torchrun agent on this host (its restarts), else this process."""
    from ..parallel.torchrun import AGENT_PID_ENV

    if os.environ.get("SLURM_JOB_ID"):
        return f"slurm-{os.environ['SLURM_JOB_ID']}"
    return f"{socket.gethostname()}:{os.environ.get(AGENT_PID_ENV) or os.getpid()}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class RunLock:
    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / LOCK_FILE
        self.held = False

    def acquire(self) -> None:
        me = {"pid": os.getpid(), "host": socket.gethostname(), "launch": launch_id(),
              "since": time.strftime("%Y-%m-%d %H:%M:%S")}
        while True:
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self._holder()
                if holder is None:
                    continue  # released (or half-written) in between: try again
                if not self._stale(holder, me):
                    raise UserError(f"run.output_dir={self.path.parent} is in use by another run (pid {holder.get('pid')} "
                                    f"on {holder.get('host')} since {holder.get('since')}); wait for it to end or "
                                    f"choose another run.output_dir (if that run is gone, remove {self.path})")
                print(f"[train] taking over {self.path} from a run that is gone (pid {holder.get('pid')} on "
                      f"{holder.get('host')})", flush=True)
                self.path.unlink(missing_ok=True)
                continue
            except OSError as e:  # a read-only file system, a folder of another user's
                raise UserError(f"run.output_dir={self.path.parent}: cannot write there ({e.strerror}); make it "
                                "writable or choose another run.output_dir") from None
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            self.held = True
            return

    def _holder(self) -> dict | None:
        try:
            return json.loads(self.path.read_text())
        except FileNotFoundError:
            return None
        except (ValueError, UnicodeDecodeError):
            return {}  # unreadable: a lock written by a process killed mid-write

    @staticmethod
    def _stale(holder: dict, me: dict) -> bool:
        if not holder or holder.get("launch") == me["launch"]:
            return True
        return holder.get("host") == me["host"] and not _alive(int(holder.get("pid", 0)))

    def release(self) -> None:
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False


def recipe(cfg, role: str) -> dict:
    """What init/<role> is made from, as the config asks for it."""
    m = cfg.model
    out = {"source": m.source, "dtype": m.dtype}
    if role == "student":
        from .config import plain

        r = plain(m.recursion)
        for key, unset in (("module_ranks", {}), ("targets", None)):  # as recipes without them recorded it
            if r[key] == unset:
                del r[key]
        out["recursion"] = r
    return out


def check_recipe(folder: Path, want: dict) -> None:
    """A conversion in init/ matches the config, or the run stops with one line."""
    path = folder.parent / RECIPE_FILE
    made = json.loads(path.read_text()).get(folder.name) if path.is_file() else None
    if made is None:  # converted before recipes were recorded: record this one
        record_recipe(folder, want)
        return
    if made != want:
        diff = "; ".join(f"{k}: {made.get(k)!r} there, {want.get(k)!r} now" for k in want if made.get(k) != want.get(k))
        raise UserError(f"{folder} was converted with other settings ({diff}); use another run.output_dir, or "
                        f"remove {folder.parent} to convert again (its checkpoints are of the old model)")


def record_recipe(folder: Path, made: dict) -> None:
    from ..files import write_json

    path = folder.parent / RECIPE_FILE
    recipes = json.loads(path.read_text()) if path.is_file() else {}
    recipes[folder.name] = made
    write_json(path, recipes)
