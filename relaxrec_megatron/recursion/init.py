"""Initialisation of the shared layers from the source layers (pure tensor math)."""

from __future__ import annotations

from enum import Enum
from typing import Sequence

import numpy as np
import torch

from .plan import SharingPlan, Strategy


class InitMethod(str, Enum):
    STEPWISE = "stepwise"  # layer round(linspace(0, L-1, K))[i] (numpy rounding: half to even)
    AVERAGE = "average"  # mean of the layers tied to shared layer i
    LOWER = "lower"  # the first K layers
    UPPER = "upper"  # the last K layers


def shared_init_sources(plan: SharingPlan, method: InitMethod | str) -> list[list[int]]:
    """For each shared layer, the source layers whose mean initialises it."""
    method = InitMethod(method)
    K, L = plan.num_shared, plan.num_layers
    if method is InitMethod.AVERAGE:
        return [plan.tied_layers(k) for k in range(K)]
    if method is InitMethod.STEPWISE:
        picks = np.round(np.linspace(0, L - 1, K)).astype(int).tolist()
        return [[p] for p in picks]
    if method is InitMethod.LOWER:
        return [[k] for k in range(K)]
    return [[L - K + k] for k in range(K)]


def init_shared(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """The shared tensor from the source tensors chosen by `shared_init_sources` (fp32 mean)."""
    if len(tensors) == 1:
        return tensors[0].float().clone()
    acc = torch.zeros_like(tensors[0], dtype=torch.float32)
    for t in tensors:
        acc += t.float()
    return acc / len(tensors)


__all__ = ["InitMethod", "Strategy", "shared_init_sources", "init_shared"]
