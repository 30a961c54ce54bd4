"""The recursive decoder: K physical shared layers run in the sharing plan's order, B loops.

Pipeline layout (replicas): the unrolled depth L is split evenly over the PP stages; a stage
builds each shared layer it runs, with the LoRA of the loops it runs. A shared layer that appears
on several stages is a replica on each, kept identical by summing its gradients over those stages
(`training.grads.finalize_grads`, the contract megatron-core keeps for tied word embeddings).
Cost: with CYCLE and PP <= B every stage holds all K shared layers (memory K layers per stage, an
all-reduce of K layers' gradients over the stages per step); with SEQUENCE a shared layer's loops
are contiguous, so it lives on one stage (two at a boundary) and nearly nothing is replicated.
"""

from __future__ import annotations

import torch
from megatron.core import tensor_parallel
from megatron.core.fp8_utils import get_fp8_context, is_first_last_bf16_layer
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import build_module
from torch import nn

from .layer import relaxed_layer_spec
from .lora_linear import LoopAware
from .norms import LoopedNorm
from .settings import RelaxedSettings


class RecursiveDecoder(MegatronModule):
    def __init__(self, config, settings: RelaxedSettings, pp_rank: int, post_process: bool, use_te: bool = False):
        super().__init__(config=config)
        self.settings = settings
        self.unrolled = list(settings.stage_layers(pp_rank))
        # megatron iterates decoder.layers as a list; shared_ids[i] is the shared index of layers[i]
        self.layers = nn.ModuleList()
        self.shared_ids: list[int] = []
        self._loop_aware: dict[int, list[LoopAware]] = {}
        self._fp8_cached: dict[int, list[nn.Module]] = {}  # TE linears: is_first_microbatch recasts FP8 weights
        for k, loops in sorted(settings.stage_shared(pp_rank).items()):
            spec = relaxed_layer_spec(settings, tuple(sorted(loops)), use_te=use_te)
            # layer_number only names the layer inside megatron (and keys its inference KV cache)
            layer = build_module(spec, config=config, layer_number=k + 1)
            self.layers.append(layer)
            self.shared_ids.append(k)
            self._loop_aware[k] = [m for m in layer.modules() if isinstance(m, LoopAware)]
            self._fp8_cached[k] = [m for m in layer.modules() if hasattr(m, "is_first_microbatch")]
        self.final_norm = LoopedNorm(config, config.hidden_size, config.layernorm_epsilon,
                                     kind=settings.norm_type, zero_centered=bool(settings.norm_zero_centered),
                                     loops=(), shared=True) if post_process else None
        self.input_tensor = None

    def set_input_tensor(self, input_tensor: torch.Tensor) -> None:
        self.input_tensor = input_tensor

    def _run(self, l: int, hidden, attention_mask, rotary_pos_emb):
        k, loop = self.settings.plan.shared_index(l), self.settings.plan.loop_index(l)
        for m in self._loop_aware[k]:  # set inside the (re)computed function: recompute sees the same loop
            m.active_loop = loop
        flags = [m.is_first_microbatch for m in self._fp8_cached[k]]
        # per unrolled layer (so the first and last can stay bf16), and inside recompute as well
        with get_fp8_context(self.config, l):
            out = self.layers[self.shared_ids.index(k)](hidden, attention_mask=attention_mask,
                                                        rotary_pos_emb=rotary_pos_emb)[0]
        if self.config.fp8 and is_first_last_bf16_layer(self.config, l):
            # a bf16 call of a shared layer casts nothing but clears TE's once-per-step recast flag
            # (set_is_first_microbatch); keep it for the layer's first FP8 loop, or that loop and
            # every later one would run on the FP8 copy of the weights from the run's first step
            for m, first in zip(self._fp8_cached[k], flags):
                m.is_first_microbatch = first
        return out

    def forward(self, hidden_states, attention_mask, rotary_pos_emb, loop_ends: list | None = None):
        """loop_ends: one slot per earlier loop (all but the last); the slot of each loop that ends on
        this stage is replaced by the hidden state after it, before the final norm (early exits)."""
        if self.input_tensor is not None:  # non-first pipeline stage
            hidden_states = self.input_tensor
        for l in self.unrolled:
            if self.settings.layout.recompute and self.training:
                hidden_states = tensor_parallel.checkpoint(
                    lambda h, l=l: self._run(l, h, attention_mask, rotary_pos_emb), False, hidden_states)
            else:
                hidden_states = self._run(l, hidden_states, attention_mask, rotary_pos_emb)
            loop = self.settings.plan.loop_end(l)
            if loop_ends is not None and loop is not None and loop < len(loop_ends):
                loop_ends[loop] = hidden_states
        if self.final_norm is not None:
            hidden_states = self.final_norm(hidden_states)
        return hidden_states
