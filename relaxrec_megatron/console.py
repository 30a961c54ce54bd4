"""What the console shows: the project's own lines and real warnings about the user's run. Third-party
chatter that says nothing about the run (import-time notices of absent CUDA, Apex or Transformer
Engine on CPU machines, deprecations of defaults megatron passes itself, DeepSpeed's accelerator
detection, one-dataset blends, weight-loading bars) stays behind RELAXREC_VERBOSE=1 (or a command's --verbose).
"""

from __future__ import annotations

import logging
import os
import warnings

VERBOSE_ENV = "RELAXREC_VERBOSE"


def verbose() -> bool:
    return os.environ.get(VERBOSE_ENV, "") not in ("", "0")


class _Drop(logging.Filter):
    """Drops the records of one logger that carry a phrase, keeping its other records."""

    def __init__(self, phrase: str):
        super().__init__()
        self.phrase = phrase

    def filter(self, record: logging.LogRecord) -> bool:
        return self.phrase not in record.getMessage()


def _drop(logger: str, phrase: str) -> None:
    log = logging.getLogger(logger)
    if not any(isinstance(f, _Drop) and f.phrase == phrase for f in log.filters):
        log.addFilter(_Drop(phrase))


def quiet_third_party() -> None:
    """Call before the libraries are imported (their notices come at import time); idempotent."""
    if verbose():
        return
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    _drop("megatron.core.datasets.blended_dataset", "for a single MegatronDataset")
    # megatron's own default for a synchronous save, not the user's choice
    _drop("megatron.core.dist_checkpointing.strategies.torch", "async save is deprecated")
    warnings.filterwarnings("ignore", module=r"megatron(\.|$)")
    warnings.filterwarnings("ignore", message=r".*(Transformer Engine|Apex|absl\.logging|async save).*")
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"(torch|deepspeed|transformers)(\.|$)")
    # torch's distributed checkpoint on the one-process reads of `relaxrec export` and the demo, and on
    # the argument order megatron passes it
    warnings.filterwarnings("ignore", message=r"torch\.distributed is disabled, unavailable or uninitialized")
    warnings.filterwarnings("ignore", message=r"The argument order of load has been changed")
    try:
        import transformers

        transformers.utils.logging.disable_progress_bar()
    except ImportError:
        pass
