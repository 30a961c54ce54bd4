"""Streaming reads of HF checkpoints (sharded safetensors or .bin) and atomic sharded writes."""

from __future__ import annotations

import json
import mmap
import os
import shutil
import struct
import warnings
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..errors import UserError

_ST_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
EXIT_CALIBRATION_FILE = "exit_calibration.json"  # relaxrec eval exits: the calibrated early-exit thresholds
HF_SIDE_FILES = (
    "tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
    "vocab.json", "merges.txt", "generation_config.json", "chat_template.jinja",
    EXIT_CALIBRATION_FILE,
)


class CheckpointError(UserError):
    pass


def resolve_model_dir(name_or_path: str | os.PathLike, revision: str | None = None) -> Path:
    """A local checkpoint folder, a built-in model (`builtin:smollm2-135m`, materialised offline), or a
    hub repo id downloaded (weights, config, tokenizer only)."""
    from .smollm import resolve_builtin

    name_or_path = resolve_builtin(str(name_or_path))
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    if path.exists() or str(name_or_path).startswith((".", "/", "~")) or str(name_or_path).count("/") != 1:
        raise CheckpointError(f"{name_or_path}: not a checkpoint folder (nor a hub repo id like 'org/name')")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(
            str(name_or_path), revision=revision,
            allow_patterns=["*.json", "*.safetensors", "*.bin", "*.model", "*.txt", "*.jinja"],
        ))
    except Exception as e:  # network, auth, missing repo: one line for the user
        raise CheckpointError(f"cannot fetch {name_or_path!r} from the hub ({type(e).__name__}: {str(e).splitlines()[0]}); "
                              "pass a local checkpoint folder instead") from None


class CheckpointReader:
    """Reads one tensor at a time, so conversions never hold more than the tensors they work on."""

    def __init__(self, name_or_path: str | os.PathLike, revision: str | None = None):
        self.root = resolve_model_dir(name_or_path, revision)
        cfg_path = self.root / "config.json"
        if not cfg_path.is_file():
            raise CheckpointError(f"{self.root}: no config.json")
        try:
            self.config: dict = json.loads(cfg_path.read_text())
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{cfg_path}: invalid JSON ({e})") from None
        self._index: dict[str, tuple[Path, dict | None]] = {}
        st = sorted(self.root.glob("*.safetensors"))
        if st:
            for f in st:
                for name, meta in _safetensors_header(f).items():
                    self._index[name] = (f, meta)
        else:
            for f in sorted(self.root.glob("*.bin")):
                if f.name.startswith(("training_args", "optimizer")):
                    continue
                for name in _bin_names(f):
                    self._index[name] = (f, None)
        if not self._index:
            raise CheckpointError(f"{self.root}: no *.safetensors or *.bin weights found")
        self._bin_cache: tuple[Path, dict] | None = None
        self._maps: dict[Path, mmap.mmap] = {}

    def names(self) -> set[str]:
        return set(self._index)

    def __contains__(self, name: str) -> bool:
        return name in self._index

    def shape(self, name: str) -> tuple[int, ...]:
        f, meta = self._locate(name)
        return tuple(meta["shape"]) if meta is not None else tuple(self._bin(f)[name].shape)

    def dtype(self, name: str) -> torch.dtype:
        f, meta = self._locate(name)
        return _ST_DTYPES[meta["dtype"]] if meta is not None else self._bin(f)[name].dtype

    def get(self, name: str) -> torch.Tensor:
        f, meta = self._locate(name)
        if meta is None:
            return self._bin(f)[name].clone()
        begin, end = meta["data_offsets"]
        buf = bytearray(end - begin)
        with open(f, "rb") as fh:
            fh.seek(meta["_base"] + begin)
            if fh.readinto(buf) != len(buf):
                raise CheckpointError(f"{f}: truncated tensor {name}")
        dtype = _ST_DTYPES[meta["dtype"]]
        if not buf:
            return torch.empty(meta["shape"], dtype=dtype)
        return torch.frombuffer(buf, dtype=dtype).reshape(meta["shape"])

    def get_mapped(self, name: str) -> torch.Tensor:
        """A read-only tensor backed by the file's pages (safetensors): nothing is read until used,
        and the pages stay reclaimable by the OS, so handing many of these to a writer streams."""
        f, meta = self._locate(name)
        if meta is None:
            return self.get(name)
        if f not in self._maps:
            with open(f, "rb") as fh:
                self._maps[f] = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
        begin, end = meta["data_offsets"]
        dtype = _ST_DTYPES[meta["dtype"]]
        if end == begin:
            return torch.empty(meta["shape"], dtype=dtype)
        with warnings.catch_warnings():  # the buffer is read-only; the tensor is never written
            warnings.simplefilter("ignore", UserWarning)
            flat = torch.frombuffer(self._maps[f], dtype=dtype, count=(end - begin) // dtype.itemsize,
                                    offset=meta["_base"] + begin)
        return flat.reshape(meta["shape"])

    def _locate(self, name: str) -> tuple[Path, dict | None]:
        if name not in self._index:
            raise CheckpointError(f"{self.root}: missing tensor {name!r}; the checkpoint does not match its config.json")
        return self._index[name]

    def _bin(self, f: Path) -> dict:
        if self._bin_cache is None or self._bin_cache[0] != f:
            self._bin_cache = None
            self._bin_cache = (f, torch.load(f, map_location="cpu", mmap=True, weights_only=True))
        return self._bin_cache[1]


def _safetensors_header(f: Path) -> dict[str, dict]:
    with open(f, "rb") as fh:
        raw = fh.read(8)
        if len(raw) != 8:
            raise CheckpointError(f"{f}: not a safetensors file")
        (n,) = struct.unpack("<Q", raw)
        try:
            header = json.loads(fh.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise CheckpointError(f"{f}: corrupt safetensors header") from None
    header.pop("__metadata__", None)
    for meta in header.values():
        meta["_base"] = 8 + n
    return header


def _bin_names(f: Path) -> list[str]:
    try:
        sd = torch.load(f, map_location="cpu", mmap=True, weights_only=True)
    except Exception as e:
        raise CheckpointError(f"{f}: cannot read ({type(e).__name__}: {e})") from None
    return list(sd)


class ShardedWriter:
    """Writes safetensors shards one at a time and the HF index that ties them together."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.weight_map: dict[str, str] = {}
        self.total_bytes = 0

    def write(self, filename: str, tensors: dict[str, torch.Tensor]) -> None:
        tensors = {k: v.contiguous() for k, v in tensors.items()}
        save_file(tensors, str(self.folder / filename), metadata={"format": "pt"})
        for k, v in tensors.items():
            self.weight_map[k] = filename
            self.total_bytes += v.numel() * v.element_size()

    def finish(self) -> None:
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": dict(sorted(self.weight_map.items()))}
        (self.folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def copy_side_files(src: Path, dst: Path, same_weights: bool = True) -> None:
    """Tokenizer and generation files travel with every converted checkpoint; the exit calibration only
    where the weights are the same (not into a checkpoint trained from src)."""
    for name in HF_SIDE_FILES:
        if name == EXIT_CALIBRATION_FILE and not same_weights:
            continue
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)
