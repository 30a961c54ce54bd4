"""The kinds of folder that hold this project's Megatron checkpoints, told apart by their files:
a dist checkpoint (`relaxrec_config.json` beside it), a training checkpoint `step_N/` (holding
`model/`), a run's `checkpoints/` folder, and the run folder itself. Every command that takes a
checkpoint (eval, export, generate, bench serve) resolves it here, and those that take an HF model
of one kind (convert and model.source: the original; model.relaxed: a relaxed one) refuse the
other kinds here; telling a kind needs no megatron-core import (seconds).
"""

from __future__ import annotations

import json
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


def kind(name: str) -> str:
    """What a local folder holds: "megatron" (any of MEGATRON_NAMES), "relaxed" (a relaxed recursive HF
    checkpoint), "hf" (another HF checkpoint), or "other" (not a local folder: a hub id, a typo)."""
    path = Path(name).expanduser()
    if not path.is_dir():
        return "other"
    if megatron_checkpoint(path) is not None:
        return "megatron"
    config = path / "config.json"
    if config.is_file() and json.loads(config.read_text()).get("model_type") == "relaxed_recursive":
        return "relaxed"
    return "hf" if config.is_file() else "other"


def refuse_unless_original(name: str, what: str) -> None:
    """`what` (e.g. "model.source=X") converts an original HF model: a relaxed or a Megatron checkpoint
    there is refused in one line that says where it belongs."""
    found = kind(name)
    if found == "megatron":
        raise UserError(f"{what} is a Megatron checkpoint, already relaxed; `relaxrec export hf-relaxed {name} OUT` "
                        "writes its relaxed HF checkpoint (model.relaxed takes that), and conversion takes the "
                        "original HF model")
    if found == "relaxed":
        source = json.loads((Path(name).expanduser() / "config.json").read_text()).get("source_model")
        raise UserError(f"{what} is already a relaxed recursive checkpoint" + (f" (of {source})" if source else "")
                        + "; conversion takes the original HF model (model.relaxed takes this one)")


def refuse_unless_relaxed(name: str, what: str) -> None:
    """`what` (model.relaxed=X) takes a relaxed recursive HF checkpoint: the other kinds are refused in
    one line that says what to pass instead."""
    found = kind(name)
    if found == "megatron":
        raise UserError(f"{what} is a Megatron checkpoint; `relaxrec export hf-relaxed {name} OUT` writes the "
                        "relaxed HF checkpoint model.relaxed takes (or resume its run with checkpoint.resume)")
    if found == "hf":
        raise UserError(f"{what} is not relaxed recursive; set it as model.source to convert it, or pass a "
                        "relaxed checkpoint (relaxrec convert)")
    if found == "other":
        raise UserError(f"{what}: no relaxed checkpoint there (no config.json); give one (relaxrec convert) or "
                        "leave model.relaxed unset")
