"""What the console shows: the project's own lines and real warnings about the user's run. Third-party
chatter that says nothing about the run (import-time notices of absent CUDA, Apex or Transformer
Engine on CPU machines, deprecations of defaults megatron passes itself, DeepSpeed's accelerator
detection, one-dataset blends, weight-loading bars) stays behind RELAXREC_VERBOSE=1 (or a command's --verbose).
"""

from __future__ import annotations

import importlib
import logging
import os
import warnings
from contextlib import contextmanager

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


@contextmanager
def own_bars_hidden(*modules: str):
    """Hides, for a block, the bars that these modules draw with their own `tqdm` (transformers'
    progress-bar switch does not reach them), unless verbose."""
    if verbose():
        yield
        return
    hidden = {}
    for name in modules:
        mod = importlib.import_module(name)
        if isinstance(getattr(mod, "tqdm", None), type):
            hidden[mod] = mod.tqdm
            mod.tqdm = _hidden_bar(mod.tqdm)
    try:
        yield
    finally:
        for mod, bar in hidden.items():
            mod.tqdm = bar


def _hidden_bar(bar: type) -> type:
    class Hidden(bar):
        def __init__(self, *args, **kwargs):
            kwargs["disable"] = True  # over the caller's own disable=False
            super().__init__(*args, **kwargs)

    return Hidden
