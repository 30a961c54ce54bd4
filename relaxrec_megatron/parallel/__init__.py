"""Parallelism: process groups, the CPU (gloo) mode of megatron-core, local multi-process worlds, the
torchrun wrapper and the lifetimes of worker processes."""
