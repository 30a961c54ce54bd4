"""Outputs that appear whole or not at all: every command writes beside the destination and renames,
so a failure (bad input, a crash, Ctrl-C) leaves no half-written file or folder behind."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path
from typing import Callable, Iterator

from .errors import UserError


def check_output(path: str | os.PathLike, overwrite: bool = False) -> Path:
    """The output's absolute path; refused where it exists and may not be replaced (before any work)."""
    final = Path(path).expanduser().resolve()
    if final.exists() and not overwrite:
        raise UserError(f"{final} already exists; pass --overwrite to replace it")
    return final


@contextlib.contextmanager
def atomic_output_dir(path: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yields a temporary sibling folder that becomes `path` only if the block succeeds."""
    final = check_output(path, overwrite)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{final.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if final.exists():
        shutil.rmtree(final) if final.is_dir() else final.unlink()
    os.replace(tmp, final)


def write_atomically(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """write(tmp) fills a temporary sibling of `path` (same suffix, for writers that read it), which
    then replaces `path`."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.stem}.tmp-{os.getpid()}{out.suffix}")
    try:
        write(tmp)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out


def write_json(path: str | os.PathLike, data) -> Path:
    return write_atomically(path, lambda tmp: tmp.write_text(json.dumps(data, indent=1, default=str)))


def write_text(path: str | os.PathLike, text: str) -> Path:
    return write_atomically(path, lambda tmp: tmp.write_text(text))
