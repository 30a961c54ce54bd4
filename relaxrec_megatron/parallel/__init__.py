"""Parallelism: process groups, the CPU (gloo) mode, gradient contracts of shared layers."""
