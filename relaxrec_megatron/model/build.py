"""This rank's stage of the relaxed recursive GPT model, on the current device."""

from __future__ import annotations

import torch


def build_model(settings, dtype: torch.dtype = torch.float32, use_te: bool | None = None, fp8: dict | None = None,
                init_weights: bool = True, loop_exits: int = 0):
    """This rank's stage of the relaxed recursive GPT model (parameters on the current device);
    `fp8`: megatron's FP8 settings (training.precision.fp8_settings), which need the TE layers.
    init_weights=False leaves megatron's weights uninitialised, for a caller that loads every one
    (state_adapter.load_canonical checks that it does): random initialisation of a 2B model is
    most of its build time. loop_exits: how many earlier loops' exits the model computes for
    early-exit training (model.gpt)."""
    from megatron.core import parallel_state as ps

    from .gpt import RelaxedRecursiveGPTModel
    from .layer import te_available
    from .settings import transformer_config

    config = transformer_config(settings, dtype, fp8, perform_initialization=init_weights)
    model = RelaxedRecursiveGPTModel(
        config, settings, pre_process=ps.is_pipeline_first_stage(), post_process=ps.is_pipeline_last_stage(),
        use_te=(bool(fp8) or te_available()) if use_te is None else use_te, loop_exits=loop_exits,
    )
    if torch.cuda.is_available():
        model.cuda()
    return model
