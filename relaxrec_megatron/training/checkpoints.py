"""A run's checkpoints: save, check, load, keep the last few.

checkpoints/step_{N}/ holds the model (a Megatron dist checkpoint with the tokenizer beside it, which
`relaxrec export` and `relaxrec eval` read as it is), DeepSpeed's optimizer shards (without a second
copy of the weights), each rank's random state, trainer_state.json and, written last, manifest.json:
every file with its size (model.steps.incomplete checks it). A crash, a full disk or a kill in
the middle of a save leaves a folder without a manifest, which resume skips and the next save
removes; `latest` is only a hint for people. Resume takes the newest complete checkpoint and says
which newer ones it skipped and why.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
from pathlib import Path

import torch
import torch.distributed as dist

from ..errors import RankError, UserError
from ..files import write_text
from ..model.checkpoint import STATE_FILE
from ..model.steps import LATEST_FILE, incomplete, latest_checkpoint, step_folders, write_manifest


class CheckpointManager:
    def __init__(self, root: str | Path, keep_last: int, hooks=None):
        self.root, self.keep_last, self.hooks = Path(root), keep_last, hooks

    def latest(self) -> Path | None:
        return latest_checkpoint(self.root)

    def resume_point(self) -> Path | None:
        """The newest complete checkpoint; rank 0 says which newer folders it skips and why. A
        checkpoints/ folder with step folders but no complete one is an error, not a fresh start."""
        skipped = []
        for folder in step_folders(self.root):
            why = incomplete(folder)
            if why is None:
                for old, reason in skipped:
                    _say(f"[train] skipping {old}: {reason}; resuming from {folder.name}")
                return folder
            skipped.append((folder, why))
        if skipped:
            old, reason = skipped[0]
            raise UserError(f"{self.root} has {len(skipped)} checkpoint folder(s) and none is complete ({old.name}: "
                            f"{reason}); remove them to start over, or set checkpoint.resume=none and another "
                            "run.output_dir")
        return None

    def save(self, trainer) -> Path:
        from ..hf.checkpoint import copy_side_files
        from ..model import checkpoint as mckpt

        folder = self.root / f"step_{trainer.step:08d}"
        rank0 = dist.get_rank() == 0
        self._check_room(folder)
        if rank0:
            for half in [p for p in step_folders(self.root) if incomplete(p) is not None]:
                shutil.rmtree(half, ignore_errors=True)  # a save that did not finish, this one's old copy included
            shutil.rmtree(folder, ignore_errors=True)
        dist.barrier()
        try:
            mckpt.save(trainer.student, trainer.settings, folder / "model")
            if rank0:  # the tokenizer travels with the checkpoint into its HF exports
                copy_side_files(trainer.student_dir, folder / "model", same_weights=False)
            if self.hooks is not None and self.hooks.after_model_saved is not None:
                self.hooks.after_model_saved(trainer, folder)
            with _optimizer_state_only(trainer.engine):
                trainer.engine.save_checkpoint(str(folder / "optimizer"), tag="state", save_latest=False,
                                               exclude_frozen_parameters=True)
            torch.save(rng_state(), folder / f"rng_rank{dist.get_rank()}.pt")
        except (OSError, RuntimeError) as e:  # a full disk, a read-only folder: this rank's one line, no half checkpoint
            why = e if isinstance(e, OSError) else _write_probe(folder.parent, 1 << 20)  # torch.save reports ENOSPC as RuntimeError
            if why is None:
                raise
            shutil.rmtree(folder, ignore_errors=True)
            previous = self.latest()
            need = f"about {_bytes_of(previous) / 1e6:,.1f} MB" if previous else "room for a checkpoint"
            raise RankError(f"saving {folder} failed on rank {dist.get_rank()}: {why.strerror or why} "
                            f"({why.filename or folder}); a checkpoint needs {need}; "
                            f"{f'{previous} is intact' if previous else 'no earlier checkpoint'}") from None
        dist.barrier()
        if rank0:
            (folder / STATE_FILE).write_text(json.dumps(trainer.state(), indent=1, default=str))
            write_manifest(folder)
            write_text(self.root / LATEST_FILE, folder.name)
            self._prune(keep=folder)
        dist.barrier()
        return folder

    def _check_room(self, folder: Path) -> None:
        """Every rank checks it can write to checkpoints/ and has room for a checkpoint the size of the
        last one, and all learn the answer: a rank whose write fails inside megatron's save leaves the
        others waiting in its collectives until the save limit, so a save that cannot succeed is not
        begun."""
        previous = self.latest()
        need = _bytes_of(previous)
        existing = next(p for p in (self.root, *self.root.parents) if p.exists())
        free = shutil.disk_usage(existing).free
        trouble = _write_probe(existing, 0)
        rank = dist.get_rank()
        if free < need:
            mine = (f"rank {rank} has {free / 1e6:,.1f} MB free at {existing} and a checkpoint needs about "
                    f"{need / 1e6:,.1f} MB", "free space")
        elif trouble is not None:
            mine = (f"rank {rank} cannot write to {existing}: {trouble.strerror or trouble}",
                    "free space" if trouble.errno == errno.ENOSPC else "make it writable")
        else:
            mine = None
        everyone: list = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, mine)
        short = [m for m in everyone if m]
        if short:
            (what, fix), more = short[0], f" (and {len(short) - 1} more rank(s))" if len(short) > 1 else ""
            resume = f"the run resumes from {previous}, which is intact" if previous else "no checkpoint was saved yet"
            raise UserError(f"not saving {folder}: {what}{more}; {fix} and relaunch: {resume}")

    def load(self, trainer, folder: str | Path) -> None:
        from ..model import checkpoint as mckpt

        folder = Path(folder)
        state = json.loads((folder / STATE_FILE).read_text())
        check_saved_layout(state, trainer, folder)
        mckpt.load(trainer.student, trainer.settings, folder / "model")
        trainer.engine.load_checkpoint(str(folder / "optimizer"), tag="state", load_module_strict=False,
                                       load_optimizer_states=True, load_lr_scheduler_states=False,
                                       custom_load_fn=lambda src, dst: None)  # the weights are the dist checkpoint's
        mckpt.load(trainer.student, trainer.settings, folder / "model")  # after DeepSpeed copied its fp32 master
        trainer.restore(state)
        set_rng_state(torch.load(folder / f"rng_rank{dist.get_rank()}.pt", weights_only=True))

    def _prune(self, keep: Path) -> None:
        """The newest keep_last complete checkpoints stay, and always the one just written."""
        complete = [p for p in step_folders(self.root) if incomplete(p) is None]
        for old in complete[self.keep_last:]:
            if old != keep:
                shutil.rmtree(old, ignore_errors=True)


def check_saved_layout(state: dict, trainer, folder: Path) -> None:
    """ZeRO partitions the optimizer state by the data-parallel layout, so a checkpoint resumes on
    the layout that saved it (its weights load on any: relaxrec export, model.relaxed)."""
    saved = state.get("layout")
    now = trainer.layout()
    if saved is not None and saved != now:
        show = lambda d: " ".join(f"{k}={v}" for k, v in d.items())
        raise UserError(f"{folder} was saved with {show(saved)} and this run has {show(now)}: its optimizer state is "
                        "partitioned for that layout; resume with the same TP, PP, data-parallel size and ZeRO "
                        f"stage, or start a new run from its weights (relaxrec export hf-relaxed {folder / 'model'} "
                        "OUT, then model.relaxed=OUT)")


@contextlib.contextmanager
def _optimizer_state_only(engine):
    """DeepSpeed's checkpoint without its copy of the module's weights: the dist checkpoint has them."""
    engine.module_state_dict = lambda *args, **kwargs: {}
    try:
        yield
    finally:
        del engine.module_state_dict


def _write_probe(folder: Path, size: int) -> OSError | None:
    """The OSError that writing `size` bytes into a new file in `folder` meets now (a full disk, a
    read-only file system), or None when the disk takes it."""
    probe = folder / f".write-probe-{dist.get_rank()}"
    try:
        with open(probe, "wb") as f:
            f.write(b"\0" * size)
            f.flush()
            os.fsync(f.fileno())
        return None
    except OSError as e:
        return e
    finally:
        probe.unlink(missing_ok=True)


def _bytes_of(folder: Path | None) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) if folder else 0


def _say(line: str) -> None:
    if dist.get_rank() == 0:
        print(line, flush=True)


def rng_state() -> dict:
    """This rank's random state: CPU, its CUDA device, and megatron's model-parallel tracker (the
    per-TP-rank streams of dropout and initialisation). Tensors only, so loading runs no pickled code."""
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
            "tracker": get_cuda_rng_tracker().get_states()}


def set_rng_state(state: dict) -> None:
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    if state.get("tracker"):
        get_cuda_rng_tracker().set_states(dict(state["tracker"]))
