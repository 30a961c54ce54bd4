"""Framework-free recursion math: sharing plans, shared-weight init, LoRA factors, parameter counts."""

from .init import InitMethod, init_shared, shared_init_sources
from .lora import LoraFactors, LoraInit, clip_rank, lora_factors, relative_error
from .plan import SharingPlan, Strategy

__all__ = [
    "SharingPlan",
    "Strategy",
    "InitMethod",
    "shared_init_sources",
    "init_shared",
    "LoraFactors",
    "LoraInit",
    "clip_rank",
    "lora_factors",
    "relative_error",
]
