"""A run's checkpoints: save, load, keep the last few, find the latest.

checkpoints/step_{N}/ holds the model (a Megatron dist checkpoint with the tokenizer beside it, which
`relaxrec export` and `relaxrec eval` read as it is), DeepSpeed's optimizer shards, each rank's random
state and trainer_state.json. A save is complete when `latest` names it: `latest` is written last,
after every rank finished, so a crash mid-save leaves the previous checkpoint the latest, and resume
never reads a half-written one.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
import torch.distributed as dist

from ..files import write_text
from ..model.checkpoint import LATEST_FILE, STATE_FILE, latest_checkpoint


class CheckpointManager:
    def __init__(self, root: str | Path, keep_last: int, hooks=None):
        self.root, self.keep_last, self.hooks = Path(root), keep_last, hooks

    def latest(self) -> Path | None:
        return latest_checkpoint(self.root)

    def save(self, trainer) -> Path:
        from ..hf.checkpoint import copy_side_files
        from ..model import checkpoint as mckpt

        folder = self.root / f"step_{trainer.step:08d}"
        rank0 = dist.get_rank() == 0
        if rank0:
            shutil.rmtree(folder, ignore_errors=True)
        dist.barrier()
        mckpt.save(trainer.student, trainer.settings, folder / "model")
        if rank0:  # the tokenizer travels with the checkpoint into its HF exports
            copy_side_files(trainer.student_dir, folder / "model", same_weights=False)
        if self.hooks is not None and self.hooks.after_model_saved is not None:
            self.hooks.after_model_saved(trainer, folder)
        trainer.engine.save_checkpoint(str(folder / "optimizer"), tag="state", save_latest=False,
                                       exclude_frozen_parameters=True)
        torch.save(rng_state(), folder / f"rng_rank{dist.get_rank()}.pt")
        dist.barrier()
        if rank0:
            (folder / STATE_FILE).write_text(json.dumps(trainer.state(), indent=1, default=str))
            write_text(self.root / LATEST_FILE, folder.name)
            self._prune()
        dist.barrier()
        return folder

    def load(self, trainer, folder: str | Path) -> None:
        from ..model import checkpoint as mckpt

        folder = Path(folder)
        mckpt.load(trainer.student, trainer.settings, folder / "model")
        trainer.engine.load_checkpoint(str(folder / "optimizer"), tag="state", load_module_strict=False,
                                       load_optimizer_states=True, load_lr_scheduler_states=False)
        # DeepSpeed restores the module weights it saved; the dist checkpoint is the source of truth
        mckpt.load(trainer.student, trainer.settings, folder / "model")
        trainer.restore(json.loads((folder / STATE_FILE).read_text()))
        set_rng_state(torch.load(folder / f"rng_rank{dist.get_rank()}.pt", weights_only=True))

    def _prune(self) -> None:
        kept = sorted(p for p in self.root.glob("step_*") if p.is_dir())
        for old in kept[: max(0, len(kept) - self.keep_last)]:
            shutil.rmtree(old, ignore_errors=True)


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
