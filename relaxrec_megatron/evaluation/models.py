"""What `relaxrec eval` scores: any checkpoint a run produces, opened as an HF causal LM.

A model reference is one of
- an HF folder: a relaxed recursive checkpoint (loaded in process, no trust_remote_code), an
  unrolled export or any vanilla model; or a hub id / `builtin:smollm2-135m`;
- a Megatron dist checkpoint, a training checkpoint `step_N/`, a run's checkpoints/ folder or the
  run folder (model.folder.megatron_checkpoint): exported to a relaxed HF checkpoint in a temporary
  folder.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import UserError
from ..hf.checkpoint import HF_SIDE_FILES, resolve_model_dir
from ..model.folder import local_checkpoint

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class EvalModel:
    name: str  # as the user wrote it
    folder: Path  # an HF checkpoint folder
    tokenizer: object  # loaded when the reference is resolved, so a missing one fails before any scoring
    kind: str  # relaxed | vanilla | megatron


def export_dir():
    """Where Megatron checkpoints are exported for scoring; removed when the block ends."""
    return tempfile.TemporaryDirectory(prefix="relaxrec-eval-")


def _has_tokenizer(folder: Path) -> bool:
    return any((folder / f).is_file() for f in HF_SIDE_FILES if f.startswith(("tokenizer", "vocab")))


def _tokenizer_for_megatron(ckpt: Path, config: dict) -> str | None:
    """The checkpoint's own tokenizer files, its run's student init, or the source model it names."""
    for folder in (ckpt, ckpt.parent, ckpt.parent.parent.parent / "init" / "student"):
        if _has_tokenizer(folder):
            return str(folder)
    return config.get("source_model")


def _tokenizer(name: str, ref: str):
    import transformers
    from transformers import AutoTokenizer

    transformers.logging.set_verbosity_error()
    try:
        return AutoTokenizer.from_pretrained(ref)
    except Exception as e:
        raise UserError(f"{name}: cannot load a tokenizer from {ref} ({type(e).__name__}); pass --tokenizer") from None


def resolve(name: str, workdir: Path, tokenizer: str | None = None) -> EvalModel:
    """An HF folder and the tokenizer for `name`; Megatron checkpoints are exported under `workdir`."""
    from ..hf.smollm import resolve_builtin

    source = resolve_builtin(name)
    path = Path(source).expanduser()
    if path.is_dir():
        ckpt = local_checkpoint(path, name)
        if ckpt is not None:
            from ..model.checkpoint import read_config
            from ..model.convert_megatron import megatron_to_relaxed

            config = read_config(ckpt)
            out = Path(tempfile.mkdtemp(prefix="export-", dir=workdir)) / "relaxed"
            megatron_to_relaxed(ckpt, out)
            tok = tokenizer or _tokenizer_for_megatron(ckpt, config)
            if tok is None:
                raise UserError(f"{name}: no tokenizer beside the checkpoint or in its run; pass --tokenizer")
            return _checked(EvalModel(name, out, _tokenizer(name, tok), "megatron"), tok)
    folder = resolve_model_dir(source)
    model_type = json.loads((folder / "config.json").read_text()).get("model_type")
    kind = "relaxed" if model_type == "relaxed_recursive" else "vanilla"
    return _checked(EvalModel(name, folder, _tokenizer(name, tokenizer or str(folder)), kind), tokenizer or str(folder))


def _checked(model: EvalModel, tokenizer_ref: str) -> EvalModel:
    """Refuses a tokenizer whose ids the model's embedding does not have (an index error mid-scoring)."""
    vocab = json.loads((model.folder / "config.json").read_text()).get("vocab_size")
    if vocab is not None and len(model.tokenizer) > vocab:
        raise UserError(f"{model.name}: the tokenizer from {tokenizer_ref} has {len(model.tokenizer)} tokens but the "
                        f"model's vocabulary is {vocab}; pass --tokenizer with the one it was trained with")
    return model


def load(model: EvalModel, device: str = "cpu", dtype: str = "auto"):
    """The model, in eval mode on `device`, in `dtype` (auto: the checkpoint's)."""
    import transformers
    from transformers import AutoModelForCausalLM

    from .. import register

    register()

    transformers.utils.logging.disable_progress_bar()
    lm = AutoModelForCausalLM.from_pretrained(model.folder, dtype="auto" if dtype == "auto" else DTYPES[dtype])
    return lm.to(device).eval()
