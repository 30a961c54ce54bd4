"""What makes a folder a standard HF checkpoint, for every folder the project writes: config.json
with `architectures` and the dtype under both of its names, generation_config.json, and the source's
tokenizer and chat template. Servers and converters pick the model class from `architectures` and
the generation defaults (bos/eos/pad) from generation_config.json; transformers 5 writes `dtype`,
older readers look for `torch_dtype`.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from .checkpoint import copy_side_files

RELAXED_CLASS = "RelaxedRecursiveForCausalLM"
REMOTE_CODE = ("configuration_relaxrec.py", "modeling_relaxrec.py")  # a relaxed folder loads without this package
SOURCE_CLASSES = {"llama": "LlamaForCausalLM", "gemma": "GemmaForCausalLM", "gpt_neox": "GPTNeoXForCausalLM"}
GENERATION_FILE = "generation_config.json"
TOKEN_IDS = ("bos_token_id", "eos_token_id", "pad_token_id")


def model_class(cfg: dict) -> str:
    if cfg.get("model_type") == "relaxed_recursive":
        return RELAXED_CLASS
    return SOURCE_CLASSES[cfg["model_type"]]


def standard_config(cfg: dict, dtype: str | None = None) -> dict:
    """cfg with `architectures` naming the class that loads it and the dtype as `dtype` and `torch_dtype`."""
    cfg = dict(cfg)
    cfg["architectures"] = [model_class(cfg)]
    dtype = dtype or cfg.get("dtype") or cfg.get("torch_dtype")
    if dtype:
        cfg["dtype"] = cfg["torch_dtype"] = str(dtype).removeprefix("torch.")
    return cfg


def generation_config(cfg: dict) -> dict:
    """The generation defaults transformers derives from a model config: its special token ids."""
    ids = {k: cfg.get(k) for k in TOKEN_IDS}
    ids = {k: v for k, v in ids.items() if v is not None}
    return {"_from_model_config": True, **ids}


def write_hf_folder_files(folder: Path, cfg: dict, source: Path | None, dtype: str | None = None,
                          same_weights: bool = True) -> None:
    """config.json, generation_config.json (the source's, or derived from cfg), the source's side files
    (tokenizer, chat template, exit calibration where the weights are the same) and, in a relaxed
    folder, the model's code for trust_remote_code."""
    (folder / "config.json").write_text(json.dumps(standard_config(cfg, dtype), indent=2, default=str))
    if model_class(cfg) == RELAXED_CLASS:
        for name in REMOTE_CODE:
            shutil.copy2(Path(__file__).parent / name, folder / name)
    if source is not None:
        copy_side_files(Path(source), folder, same_weights=same_weights)
    if not (folder / GENERATION_FILE).is_file():
        (folder / GENERATION_FILE).write_text(json.dumps(generation_config(cfg), indent=2))
