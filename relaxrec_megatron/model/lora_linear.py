"""Column- and row-parallel linears that carry one LoRA per loop (and optionally one bias per loop).

Layouts under tensor parallelism (as Megatron-Bridge's ParallelLinearAdapter):

| base            | A                          | B                     |
| column-parallel | (r, d_in), input replicated | (d_out / TP, r)      |
| row-parallel    | (r, d_in / TP)             | (d_out, r), replicated |

Column side: z = A x is computed once per rank and B_local z gives this rank's output rows; with
sequence parallelism z (r wide, not h) is what gets all-gathered. Row side: B (A_local x_local) is a
partial sum like the base output, so it is added *before* the base's all-reduce / reduce-scatter
and LoRA adds no collective; B's gradient is then a partial sum too: each module lists such
parameters in `tp_summed_grads`, which `training.grads.grad_contracts` sums over TP.

A fused output (linear_qkv, linear_fc1) is several modules: q, k, v interleaved per query group
[q heads of g, k_g, v_g], and [gate_i; up_i] on each TP rank. Each module has its own A and B.
"""

from __future__ import annotations

import torch
from megatron.core import parallel_state as ps
from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
from megatron.core.tensor_parallel.mappings import (
    copy_to_tensor_model_parallel_region,
    gather_from_sequence_parallel_region,
    reduce_from_tensor_model_parallel_region,
    reduce_scatter_to_sequence_parallel_region,
)
from torch import nn


class AddLora(torch.autograd.Function):
    """out[..., columns of module i] += z_i @ B_i^T for every module, in place on the base linear's
    output, and the same in backward: no output-sized LoRA temporaries, concatenations or
    interleaving copies (on CPU they cost 5-10% of a fwd+bwd step at r=64), and no CopySlices
    clones of the gradient that autograd would make for in-place adds into slices.

    in_place=False adds into one copy of `out` instead: Transformer Engine's Linear returns its output
    as a view made inside its autograd Function (`out.view(...)` at the end of `_Linear.forward`), and
    autograd forbids modifying such a view in place.

    out (..., n) is viewed as (T, groups, per_group) and module i owns columns [start_i, start_i +
    width_i) of every group (megatron's per-query-group [q; k; v] layout, or one group for [gate; up]
    or a single module); modules without a LoRA are simply not listed. z (..., sum r_i) holds the
    listed modules' r-wide activations, B_i (groups * width_i, r_i).
    """

    @staticmethod
    def forward(ctx, out, z, groups: int, columns: tuple[tuple[int, int], ...], ranks: tuple[int, ...],
                in_place: bool, *Bs):
        if not in_place:
            out = out.clone()
        n = out.shape[-1]
        out3 = out.view(-1, groups, n // groups)
        zs = z.reshape(-1, z.shape[-1]).split(ranks, dim=-1)
        for (start, width), zi, B in zip(columns, zs, Bs):
            if groups == 1:
                out3[:, 0, start:start + width].addmm_(zi, B.t())
            else:
                out3[:, :, start:start + width].add_(torch.matmul(zi, B.t()).view(-1, groups, width))
        if in_place:
            ctx.mark_dirty(out)
        ctx.save_for_backward(z, *Bs)
        ctx.layout = (groups, columns, ranks)
        return out

    @staticmethod
    def backward(ctx, grad):
        z, *Bs = ctx.saved_tensors
        groups, columns, ranks = ctx.layout
        g3 = grad.reshape(-1, groups, grad.shape[-1] // groups)
        zs = z.reshape(-1, z.shape[-1]).split(ranks, dim=-1)
        grad_z, grad_Bs = [], []
        for (start, width), zi, B in zip(columns, zs, Bs):
            gi = g3[:, 0, start:start + width] if groups == 1 else g3[:, :, start:start + width].reshape(g3.shape[0], -1)
            grad_z.append(gi @ B)
            grad_Bs.append(gi.t() @ zi)
        return (grad, torch.cat(grad_z, dim=-1).view_as(z), None, None, None, None, *grad_Bs)


class LoopAware:
    """A module whose parameters depend on the loop being run; the decoder sets `active_loop`."""

    active_loop: int = 0


def _key(module: str, loop: int) -> str:
    return f"{module}_{loop}"


class LoopLora(nn.Module):
    """The per-loop factors of one linear: lora_A[f"{module}_{loop}"], lora_B[...]."""

    def __init__(self, shapes: dict[str, tuple[int, int]], ranks: dict[str, int], loops, dtype):
        super().__init__()
        self.modules_ = [m for m in shapes if ranks.get(m, 0) > 0]
        self.ranks = {m: ranks[m] for m in self.modules_}
        self.lora_A = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()
        for loop in loops:
            for m in self.modules_:
                d_out, d_in = shapes[m]  # local shapes
                self.lora_A[_key(m, loop)] = nn.Parameter(torch.zeros(self.ranks[m], d_in, dtype=dtype))
                self.lora_B[_key(m, loop)] = nn.Parameter(torch.zeros(d_out, self.ranks[m], dtype=dtype))

    def __bool__(self) -> bool:
        return bool(self.modules_)


class ColumnLora(LoopAware):
    """Per-loop LoRA (and bias) of a column-parallel linear whose output may fuse several modules."""

    def _init_lora(self, input_size, output_size, config, lora_modules, lora_ranks, loops, per_loop_bias, bias,
                   heads_per_group):
        tp = ps.get_tensor_model_parallel_world_size()
        self.lora_modules, self.heads_per_group = lora_modules, heads_per_group
        self.lora_tp_group = ps.get_tensor_model_parallel_group()
        self.lora_sp = config.sequence_parallel
        self.local_out = output_size // tp
        # TP > query groups (e.g. MQA): a rank's rows are a slice of one group, so the q/k/v B factors
        # are kept whole on every rank and the rank takes its rows of the fused LoRA output
        self.lora_replicated = lora_modules == ("q", "k", "v") and config.num_query_groups % tp != 0
        self.tp_rank = ps.get_tensor_model_parallel_rank()
        self.shapes = self._lora_shapes(input_size, output_size if self.lora_replicated else self.local_out)
        self.lora = LoopLora(self.shapes, lora_ranks, loops, config.params_dtype)
        self.lora_layout = None if self.lora_replicated else self._lora_layout()
        self.loop_bias = nn.ParameterDict({str(b): nn.Parameter(torch.zeros(self.local_out, dtype=config.params_dtype))
                                           for b in loops}) if per_loop_bias and bias else None
        # A sees only this rank's tokens under SP; a replicated B's gradient covers this rank's rows only
        self.tp_summed_grads = [*(self.lora.lora_A.values() if self.lora_sp else ()),
                                *(self.lora.lora_B.values() if self.lora_replicated else ())]

    def _lora_shapes(self, d_in: int, out: int) -> dict[str, tuple[int, int]]:
        if self.lora_modules == ("q", "k", "v"):
            hd = self.config.kv_channels
            groups = out // ((self.heads_per_group + 2) * hd)
            return {"q": (groups * self.heads_per_group * hd, d_in), "k": (groups * hd, d_in), "v": (groups * hd, d_in)}
        share = out // len(self.lora_modules)
        return {m: (share, d_in) for m in self.lora_modules}

    def _lora_layout(self) -> tuple[int, tuple[tuple[int, int], ...], tuple[int, ...]]:
        """AddLoraInPlace's (groups, columns, ranks) for the modules that carry a LoRA."""
        sizes = [self.shapes[m][0] for m in self.lora_modules]
        if self.lora_modules == ("q", "k", "v"):
            groups = sizes[1] // self.config.kv_channels
            widths = [size // groups for size in sizes]
        else:
            groups, widths = 1, sizes
        columns = {m: (sum(widths[:i]), widths[i]) for i, m in enumerate(self.lora_modules)}
        return groups, tuple(columns[m] for m in self.lora.modules_), tuple(self.lora.ranks[m] for m in self.lora.modules_)

    def lora_activation(self, x: torch.Tensor) -> torch.Tensor:
        """z = [A_m x for each module] of the active loop, gathered over TP (SP) or marked replicated."""
        loop, lora = self.active_loop, self.lora
        A = torch.cat([lora.lora_A[_key(m, loop)] for m in lora.modules_]) if len(lora.modules_) > 1 \
            else lora.lora_A[_key(lora.modules_[0], loop)]
        z = torch.matmul(x, A.t())
        return gather_from_sequence_parallel_region(z, group=self.lora_tp_group) if self.lora_sp \
            else copy_to_tensor_model_parallel_region(z, group=self.lora_tp_group)

    def lora_delta(self, x: torch.Tensor) -> torch.Tensor:
        loop, lora = self.active_loop, self.lora
        z = self.lora_activation(x)
        parts = dict(zip(lora.modules_, z.split([lora.ranks[m] for m in lora.modules_], dim=-1)))
        outs = {}
        for m in self.lora_modules:
            if m in parts:
                outs[m] = torch.matmul(parts[m], lora.lora_B[_key(m, loop)].t())
            else:
                outs[m] = z.new_zeros(*z.shape[:-1], self.shapes[m][0])
        if self.lora_modules == ("q", "k", "v"):
            hd, lead = self.config.kv_channels, z.shape[:-1]
            groups = self.shapes["k"][0] // hd
            q = outs["q"].view(*lead, groups, self.heads_per_group * hd)
            k, v = outs["k"].view(*lead, groups, hd), outs["v"].view(*lead, groups, hd)
            fused = torch.cat([q, k, v], dim=-1).view(*lead, -1)
            if self.lora_replicated:
                fused = fused[..., self.tp_rank * self.local_out:(self.tp_rank + 1) * self.local_out]
            return fused
        if len(outs) == 1:
            return next(iter(outs.values()))
        return torch.cat([outs[m] for m in self.lora_modules], dim=-1)

    def add_lora(self, out: torch.Tensor, x: torch.Tensor, in_place: bool) -> torch.Tensor:
        """out + LoRA(x), added into the base output (in place, or into one copy: AddLora)."""
        if self.lora_replicated:  # this rank's columns are a slice of one query group's fused LoRA output
            return out + self.lora_delta(x)
        loop, lora = self.active_loop, self.lora
        return AddLora.apply(out, self.lora_activation(x), *self.lora_layout, in_place,
                             *(lora.lora_B[_key(m, loop)] for m in lora.modules_))

    def _relax(self, out, bias, x, in_place: bool = True):
        if self.lora:
            out = self.add_lora(out, x, in_place)
        if self.loop_bias is not None:
            loop_bias = self.loop_bias[str(self.active_loop)]
            if self.skip_bias_add:
                bias = loop_bias
            else:
                out = out + loop_bias
        return out, bias


class LoraColumnParallelLinear(ColumnParallelLinear, ColumnLora):
    def __init__(self, input_size, output_size, *, config, init_method, lora_modules: tuple[str, ...],
                 lora_ranks: dict[str, int], loops: tuple[int, ...], per_loop_bias: bool = False,
                 heads_per_group: int = 0, bias: bool = True, **kwargs):
        super().__init__(input_size, output_size, config=config, init_method=init_method,
                         bias=bias and not per_loop_bias, **kwargs)
        self._init_lora(input_size, output_size, config, lora_modules, lora_ranks, loops, per_loop_bias, bias,
                        heads_per_group)

    def forward(self, input_, **kwargs):
        out, bias = super().forward(input_, **kwargs)
        return self._relax(out, bias, input_)


class RowLora(LoopAware):
    def _init_lora(self, input_size, output_size, config, lora_modules, lora_ranks, loops, per_loop_bias, bias):
        tp = ps.get_tensor_model_parallel_world_size()
        (self.module,) = lora_modules
        self.lora = LoopLora({self.module: (output_size, input_size // tp)}, lora_ranks, loops, config.params_dtype)
        self.loop_bias = nn.ParameterDict({str(b): nn.Parameter(torch.zeros(output_size, dtype=config.params_dtype))
                                           for b in loops}) if per_loop_bias and bias else None
        self.tp_summed_grads = list(self.lora.lora_B.values()) if tp > 1 else []
        for p in (self.loop_bias or {}).values():  # added after the reduce-scatter: a partial sum under SP
            p.sequence_parallel = config.sequence_parallel

    def _bias(self):
        return self.loop_bias[str(self.active_loop)] if self.loop_bias is not None else self.bias


class LoraRowParallelLinear(RowParallelLinear, RowLora):
    """Row-parallel linear whose per-loop LoRA is added before the TP reduction."""

    def __init__(self, input_size, output_size, *, config, init_method, lora_modules: tuple[str, ...],
                 lora_ranks: dict[str, int], loops: tuple[int, ...], per_loop_bias: bool = False,
                 bias: bool = True, **kwargs):
        super().__init__(input_size, output_size, config=config, init_method=init_method,
                         bias=bias and not per_loop_bias, **kwargs)
        self._init_lora(input_size, output_size, config, lora_modules, lora_ranks, loops, per_loop_bias, bias)

    def forward(self, input_):
        assert self.input_is_parallel, "relaxed recursive layers feed row-parallel linears a parallel input"
        out = self._forward_impl(input=input_, weight=self.weight, bias=None,
                                 gradient_accumulation_fusion=self.gradient_accumulation_fusion,
                                 allreduce_dgrad=False, sequence_parallel=False, tp_group=None,
                                 grad_output_buffer=None, gtp_remat_size=self.gtp_remat_size)
        if self.lora:
            key = _key(self.module, self.active_loop)
            z = torch.matmul(input_, self.lora.lora_A[key].t())
            out = AddLora.apply(out, z, 1, ((0, out.shape[-1]),), (z.shape[-1],), True, self.lora.lora_B[key])
        if self.sequence_parallel:
            out = reduce_scatter_to_sequence_parallel_region(out, group=self.tp_group)
        else:
            out = reduce_from_tensor_model_parallel_region(out, group=self.tp_group)
        bias = self._bias()
        if self.skip_bias_add:
            return out, bias
        return (out + bias if bias is not None else out), None


def te_linear_classes():
    """Transformer Engine variants (imported only with CUDA): TE GEMMs (FP8-capable) for the shared
    weights, LoRA in the activation dtype. TE fuses the row-parallel reduction into its GEMM, so there
    the LoRA term takes its own reduction, on the r-wide activation (not the h-wide output)."""
    from megatron.core.extensions.transformer_engine import TEColumnParallelLinear, TERowParallelLinear

    class TELoraColumnParallelLinear(TEColumnParallelLinear, ColumnLora):
        def __init__(self, input_size, output_size, *, config, init_method, lora_modules, lora_ranks, loops,
                     per_loop_bias=False, heads_per_group=0, bias=True, **kwargs):
            super().__init__(input_size, output_size, config=config, init_method=init_method,
                             bias=bias and not per_loop_bias, **kwargs)
            # megatron's TE wrappers keep only te_return_bias (False here: the base has no bias);
            # _relax returns the loop's bias the way the caller asked for it
            self.skip_bias_add = bool(kwargs.get("skip_bias_add", False))
            self._init_lora(input_size, output_size, config, lora_modules, lora_ranks, loops, per_loop_bias, bias,
                            heads_per_group)

        def forward(self, x):
            out, bias = super().forward(x)
            return self._relax(out, bias, x, in_place=False)  # TE's output is a view of its Function

    class TELoraRowParallelLinear(TERowParallelLinear, RowLora):
        def __init__(self, input_size, output_size, *, config, init_method, lora_modules, lora_ranks, loops,
                     per_loop_bias=False, bias=True, **kwargs):
            super().__init__(input_size, output_size, config=config, init_method=init_method,
                             bias=bias and not per_loop_bias, **kwargs)
            self._init_lora(input_size, output_size, config, lora_modules, lora_ranks, loops, per_loop_bias, bias)
            self.lora_sp = config.sequence_parallel
            # B multiplies the reduced activation: every rank computes the same term without SP,
            # and only its own tokens' share under SP (a partial sum over TP then)
            self.tp_summed_grads = list(self.lora.lora_B.values()) if self.lora_sp else []

        def forward(self, x):
            out, bias = super().forward(x)
            if self.lora:
                key = _key(self.module, self.active_loop)
                z = torch.matmul(x, self.lora.lora_A[key].t())  # a partial sum over TP, every token
                # under SP, TE's output is this rank's slice of the sequence: reduce-scatter z, whose
                # backward all-gathers, so A's gradient sees every token's gradient, not one slice's
                z = reduce_scatter_to_sequence_parallel_region(z) if self.lora_sp \
                    else reduce_from_tensor_model_parallel_region(z)
                out = out + torch.matmul(z, self.lora.lora_B[key].t())
            if self.loop_bias is not None:
                if self.te_return_bias:
                    bias = self.loop_bias[str(self.active_loop)]
                else:
                    out = out + self.loop_bias[str(self.active_loop)]
            return out, bias

    return TELoraColumnParallelLinear, TELoraRowParallelLinear
