"""What `relaxrec eval` scores: any checkpoint a run produces, opened as an HF causal LM.

A model reference is anything model.reference.open_ref takes: an original or relaxed HF folder, a
hub id, `builtin:smollm2-135m`, or a Megatron checkpoint (dist checkpoint, `step_N/`, a run's
checkpoints/ or the run folder), which is exported to a relaxed HF checkpoint in a temporary folder.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import UserError
from ..model.reference import Kind, open_as

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
LABELS = {Kind.ORIGINAL: "vanilla", Kind.RELAXED: "relaxed", Kind.MEGATRON: "megatron"}


@dataclass
class EvalModel:
    name: str  # as the user wrote it
    folder: Path  # an HF checkpoint folder
    tokenizer: object  # loaded when the reference is resolved, so a missing one fails before any scoring
    kind: str  # relaxed | vanilla | megatron, as reports name it


def export_dir():
    """Where Megatron checkpoints are exported for scoring; removed when the block ends."""
    return tempfile.TemporaryDirectory(prefix="relaxrec-eval-")


def _tokenizer(name: str, ref: str):
    import transformers
    from transformers import AutoTokenizer

    transformers.logging.set_verbosity_error()
    try:
        return AutoTokenizer.from_pretrained(ref)
    except Exception as e:
        raise UserError(f"{name}: cannot load a tokenizer from {ref} ({type(e).__name__}); pass --tokenizer") from None


def resolve(name: str, workdir: Path, tokenizer: str | None = None, use: str = "eval") -> EvalModel:
    """An HF folder and the tokenizer for `name`, if `use` takes its kind; Megatron checkpoints are
    exported under `workdir`."""
    ref = open_as(name, use)
    tok = tokenizer or ref.tokenizer()
    if tok is None:
        raise UserError(f"{name}: no tokenizer beside the checkpoint or in its run; pass --tokenizer")
    tokenizer_obj = _tokenizer(name, tok)  # before an export: a missing tokenizer fails in seconds
    return _checked(EvalModel(name, ref.hf_folder(workdir), tokenizer_obj, LABELS[ref.kind]), tok)


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
