"""FP8 training settings: what a run config's model.fp8* keys become in megatron-core's
TransformerConfig, and the checks that this machine can run them.

megatron-core owns FP8: its `fp8` / `fp8_recipe` settings choose the Transformer Engine recipe, its
`get_fp8_context` wraps each unrolled layer (the decoder asks it per layer, so the first and last
can stay in bf16), and `set_is_first_microbatch` refreshes TE's FP8 weight cache, which it does only
when the config has fp8 set. A bare `fp8_autocast` would leave that cache stale after each update.
"""

from __future__ import annotations

from ..errors import UserError


def fp8_settings(model_cfg) -> dict:
    """TransformerConfig keyword arguments for model.fp8* ({} with FP8 off)."""
    if not model_cfg.fp8:
        return {}
    return {"fp8": model_cfg.fp8_format, "fp8_recipe": model_cfg.fp8_recipe,
            "first_last_layers_bf16": bool(model_cfg.fp8_first_last_bf16),
            "num_layers_at_start_in_bf16": 1, "num_layers_at_end_in_bf16": 1}


def check_fp8_runtime(recipe: str) -> None:
    """A one-line UserError unless CUDA, Transformer Engine and the GPU's FP8 support are there."""
    import torch

    off = "; or set model.fp8=false"
    if not torch.cuda.is_available():
        raise UserError(f"model.fp8 needs a CUDA GPU with FP8 (compute capability 8.9 or newer), "
                        f"and this machine has none{off}")
    try:
        from transformer_engine.pytorch.fp8 import FP8GlobalStateManager
    except ImportError:
        raise UserError(f"model.fp8 needs Transformer Engine: pip install 'relaxrec-megatron[te]'{off}") from None
    check = {"tensorwise": "is_fp8_available", "blockwise": "is_fp8_block_scaling_available",
             "mxfp8": "is_mxfp8_available"}[recipe]
    available = getattr(FP8GlobalStateManager, check, None)
    if available is None:
        raise UserError(f"model.fp8_recipe={recipe}: this Transformer Engine has no {check}(); "
                        f"upgrade transformer-engine{off}")
    ok, reason = available()
    if not ok:
        name = torch.cuda.get_device_name()
        raise UserError(f"model.fp8_recipe={recipe} does not run on this {name}: {reason}{off}")
