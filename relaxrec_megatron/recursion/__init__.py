"""Framework-free recursion math: the recursion spec, sharing plans, shared-weight init, LoRA factors,
parameter counts."""

from .init import InitMethod, init_shared, shared_init_sources
from .lora import LoraFactors, LoraInit, clip_rank, lora_factors, relative_error
from .plan import SharingPlan, Strategy
from .spec import RecursionSpec

__all__ = [
    "RecursionSpec",
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
