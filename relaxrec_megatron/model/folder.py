"""The kinds of folder that hold this project's Megatron checkpoints, told apart by their files:
a dist checkpoint (`relaxrec_config.json` beside it), a training checkpoint `step_N/` (holding
`model/`), a run's `checkpoints/` folder, and the run folder itself. Every command that takes a
checkpoint (eval, export, generate, bench serve) resolves it here; telling a kind needs no
megatron-core import (seconds).
"""

from __future__ import annotations

from pathlib import Path

from ..errors import UserError

CONFIG_FILE = "relaxrec_config.json"  # the architecture and the recursion, beside the dist checkpoint
LATEST_FILE = "latest"  # in a run's checkpoints/: names the newest step, as a hint for people
MEGATRON_NAMES = ("a Megatron checkpoint (relaxrec_config.json), a training step folder (step_N/), a run's "
                  "checkpoints/ folder or the run folder")
ACCEPTED = f"an HF folder (config.json), {MEGATRON_NAMES}"


def is_megatron_checkpoint(folder) -> bool:
    return (Path(folder) / CONFIG_FILE).is_file()


def megatron_checkpoint(path: str | Path) -> Path | None:
    """The Megatron dist checkpoint a folder names (the newest complete step of a run or of its
    checkpoints/ folder), or None where the folder is none of those kinds."""
    path = Path(path).expanduser()
    if is_megatron_checkpoint(path):
        return path
    if is_megatron_checkpoint(path / "model"):  # a training checkpoint step_N/
        return path / "model"
    if (path / "config.json").is_file():  # an HF folder (a run folder's config.json sits beside checkpoints/)
        if not (path / "checkpoints").is_dir():
            return None
    for folder in (path, path / "checkpoints"):  # a run's checkpoints/ folder, or the run folder
        if (folder / LATEST_FILE).is_file() or any(folder.glob("step_*")):
            from .checkpoint import latest_checkpoint

            step = latest_checkpoint(folder)
            if step is None:
                raise UserError(f"{folder}: none of its step folders is a complete checkpoint (manifest.json); "
                                "pass an earlier step_N/ that is")
            return step / "model"
    return None


def local_checkpoint(path: Path, name: str) -> Path | None:
    """For a local folder: the Megatron checkpoint it names, or None where it is an HF folder; any
    other folder is refused in one line (`name` as the user wrote it)."""
    ckpt = megatron_checkpoint(path)
    if ckpt is None and not (Path(path) / "config.json").is_file():
        raise not_a_checkpoint(name)
    return ckpt


def not_a_checkpoint(name: str) -> UserError:
    return UserError(f"{name}: not a checkpoint; pass {ACCEPTED}")
