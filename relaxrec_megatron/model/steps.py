"""A run's checkpoints/ folder (training.checkpoints): each step_N/ holds the Megatron dist checkpoint
model/ and the optimizer state. A step_N is complete when every file its MANIFEST_FILE names is there
with its size (and, for the small ones, its CRC-32); the manifest is written last. LATEST_FILE names
the newest step, as a hint for people (the folders themselves are what counts)."""

from __future__ import annotations

import json
from pathlib import Path

LATEST_FILE = "latest"
MANIFEST_FILE = "manifest.json"
CHECKSUM_BELOW = 1 << 20  # files smaller than this carry a CRC-32 in the manifest


def write_manifest(folder: Path) -> None:
    """Lists every file of a checkpoint folder with its size (and CRC-32 below CHECKSUM_BELOW); the
    folder counts as complete from then on."""
    import zlib

    from ..files import write_json

    files = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST_FILE):
        entry = {"bytes": path.stat().st_size}
        if entry["bytes"] < CHECKSUM_BELOW:
            entry["crc32"] = zlib.crc32(path.read_bytes())
        files[str(path.relative_to(folder))] = entry
    write_json(folder / MANIFEST_FILE, {"files": files})


def incomplete(folder: Path) -> str | None:
    """Why a checkpoint folder cannot be resumed from, or None when it is complete."""
    import zlib

    manifest = folder / MANIFEST_FILE
    if not manifest.is_file():
        return "no manifest (the save did not finish)"
    try:
        files = json.loads(manifest.read_text())["files"]
    except (ValueError, KeyError, UnicodeDecodeError):
        return f"{MANIFEST_FILE} is unreadable"
    for name, entry in files.items():
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != entry["bytes"]:
            return f"{name} has {path.stat().st_size} bytes, not {entry['bytes']}"
        if "crc32" in entry and zlib.crc32(path.read_bytes()) != entry["crc32"]:
            return f"{name} does not match its checksum"
    return None


def step_folders(root: str | Path) -> list[Path]:
    """A run's step_N folders, newest (highest step) first."""
    def step(p: Path) -> int:
        try:
            return int(p.name.split("_", 1)[1])
        except (IndexError, ValueError):
            return -1

    return sorted((p for p in Path(root).glob("step_*") if p.is_dir() and step(p) >= 0), key=step, reverse=True)


def latest_checkpoint(root: str | Path) -> Path | None:
    """The newest complete step_N of a run's checkpoints/ folder, if any (`latest` is not trusted)."""
    return next((p for p in step_folders(root) if incomplete(p) is None), None)
