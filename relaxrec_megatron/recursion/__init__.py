"""Framework-free recursion math: sharing plans, shared-weight init, LoRA factors, parameter counts."""

from .plan import SharingPlan, Strategy
from .init import InitMethod, shared_init_sources, init_shared
from .lora import LoraFactors, LoraInit, clip_rank, lora_factors, relative_error

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
