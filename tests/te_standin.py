"""Transformer Engine's linears as megatron-core wraps them, for machines without CUDA (TE installs
only where CUDA is). A stand-in, written to the contract read from megatron-core 0.19's
`extensions/transformer_engine.py` (TELinear, TEColumnParallelLinear, TERowParallelLinear) and TE's
`pytorch/module/linear.py` (`Linear`, `_Linear`, v2.0-v2.18):

- the wrappers' constructor arguments; attributes te_return_bias, is_first_microbatch (passed to TE,
  then set False after every call) and disable_parameter_transpose_cache; weight (out/TP, in) for a
  column-parallel and (out, in/TP) for a row-parallel linear; a bias parameter only with bias=True;
- forward(x) -> (out, None), or (out, bias) when te_return_bias; `out` comes out of a custom autograd
  Function whose forward ends in `out.view(-1, *inp.shape[1:-1], out_features)`, as `_Linear`'s does,
  so autograd forbids modifying it in place;
- the TP collectives inside that Function: a column-parallel linear under sequence parallelism
  all-gathers its input over the sequence (and reduce-scatters dgrad), otherwise all-reduces dgrad; a
  row-parallel one reduce-scatters (SP) or all-reduces its output;
- the FP8 weight cache of `get_weight_workspace`: inside an FP8 autocast the GEMM reads a copy of the
  weight that is made again when is_first_microbatch is None or True (or when there is none yet) and
  reused otherwise. Outside FP8 nothing is cached. Every call is recorded in `calls` as
  (fp8, recast), so a test sees which calls refresh the copy, and a stale copy gives stale outputs.

`install()` puts these classes into megatron's TE extension module (the attention is megatron-core's
local one: TE's attention kernels are not what these tests check) and returns the stand-in FP8
context, which chooses FP8 layers as megatron's get_fp8_context does.
"""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist

FP8 = {"enabled": False}


def _gather_seq(x, group):
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, x.contiguous(), group=group)
    return torch.cat(parts, 0)


def _scatter_seq(x, group):
    out = torch.empty_like(x.chunk(dist.get_world_size(group), 0)[0])
    dist.reduce_scatter(out, list(t.contiguous() for t in x.chunk(dist.get_world_size(group), 0)), group=group)
    return out


class _Linear(torch.autograd.Function):
    """TE's `_Linear`: the GEMM with its TP communication, the output returned as a view."""

    @staticmethod
    def forward(ctx, inp, weight, gemm_weight, bias, mode, sp, group):
        tp = dist.get_world_size(group) if group is not None else 1
        x = _gather_seq(inp, group) if mode == "column" and sp and tp > 1 else inp
        out = x.reshape(-1, x.shape[-1]) @ gemm_weight.t()
        if mode == "row" and tp > 1:
            out = _scatter_seq(out, group) if sp else out.clone()
            if not sp:
                dist.all_reduce(out, group=group)
        if bias is not None:
            out = out + bias
        ctx.save_for_backward(x, gemm_weight)
        ctx.cfg = (mode, sp, group, tp, bias is not None, inp.shape)
        return out.view(-1, *inp.shape[1:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, grad):
        x, gemm_weight = ctx.saved_tensors
        mode, sp, group, tp, has_bias, in_shape = ctx.cfg
        g = grad.reshape(-1, grad.shape[-1])
        if mode == "row" and sp and tp > 1:
            g = _gather_seq(g, group)
        x2 = x.reshape(-1, x.shape[-1])
        dgrad = g @ gemm_weight
        if mode == "column" and tp > 1:
            if sp:
                dgrad = _scatter_seq(dgrad, group)
            else:
                dist.all_reduce(dgrad, group=group)
        wgrad = g.t() @ x2
        bgrad = grad.reshape(-1, grad.shape[-1]).sum(0) if has_bias else None
        return dgrad.view(in_shape), wgrad, None, bgrad, None, None, None


class TELinear(torch.nn.Module):
    def __init__(self, input_size, output_size, *, parallel_mode, config, init_method, bias, skip_bias_add,
                 tp_group=None):
        from megatron.core import parallel_state as ps

        super().__init__()
        self.config, self.parallel_mode = config, parallel_mode
        self.tp_group = tp_group or ps.get_tensor_model_parallel_group()
        tp = dist.get_world_size(self.tp_group)
        self.te_return_bias = skip_bias_add and bias
        self.is_first_microbatch = True
        self.disable_parameter_transpose_cache = getattr(config, "disable_parameter_transpose_cache", False)
        self.sequence_parallel = config.sequence_parallel
        shape = (output_size // tp, input_size) if parallel_mode == "column" else (output_size, input_size // tp)
        self.weight = torch.nn.Parameter(torch.empty(*shape, dtype=config.params_dtype))
        init_method(self.weight)
        out_local = shape[0]
        self.bias = torch.nn.Parameter(torch.zeros(out_local, dtype=config.params_dtype)) if bias else None
        if bias and parallel_mode == "row":
            self.bias.sequence_parallel = config.sequence_parallel
        self.fp8_weight: torch.Tensor | None = None
        self.calls: list[tuple[bool, bool]] = []

    def _gemm_weight(self, is_first_microbatch) -> torch.Tensor:
        fp8 = FP8["enabled"]
        recast = fp8 and (is_first_microbatch is None or is_first_microbatch or self.fp8_weight is None)
        if recast:
            self.fp8_weight = self.weight.detach().clone()
        self.calls.append((fp8, recast))
        return self.fp8_weight if fp8 else self.weight

    def te_forward(self, x, is_first_microbatch):
        """transformer_engine.pytorch.Linear.forward(inp, is_first_microbatch)."""
        gemm_weight = self._gemm_weight(is_first_microbatch)  # dgrad reads it too; wgrad is the weight's
        bias = None if self.te_return_bias else self.bias
        out = _Linear.apply(x, self.weight, gemm_weight, bias, self.parallel_mode, self.sequence_parallel,
                            self.tp_group)
        return (out, self.bias) if self.te_return_bias else out

    def forward(self, x):
        first = None if self.disable_parameter_transpose_cache else self.is_first_microbatch
        out = self.te_forward(x, first)
        self.is_first_microbatch = False
        return out if self.te_return_bias else (out, None)


class TEColumnParallelLinear(TELinear):
    def __init__(self, input_size, output_size, *, config, init_method, gather_output, bias, skip_bias_add,
                 is_expert, skip_weight_param_allocation=False, tp_comm_buffer_name=None, tp_group=None, stride=1,
                 name=None):
        if gather_output:
            raise ValueError("Transformer Engine linear layers do not support gather_output = True")
        super().__init__(input_size, output_size, parallel_mode="column", config=config, init_method=init_method,
                         bias=bias, skip_bias_add=skip_bias_add, tp_group=tp_group)


class TERowParallelLinear(TELinear):
    def __init__(self, input_size, output_size, *, config, init_method, bias, input_is_parallel, skip_bias_add,
                 is_expert, tp_comm_buffer_name=None, tp_group=None, name=None):
        if not input_is_parallel:
            raise ValueError("Transformer Engine linear layers do not support input_is_parallel = False")
        super().__init__(input_size, output_size, parallel_mode="row", config=config, init_method=init_method,
                         bias=bias, skip_bias_add=skip_bias_add, tp_group=tp_group)


def fp8_context(config, layer_no: int = -1, is_init: bool = False):
    """megatron's get_fp8_context: FP8 for every layer unless config.fp8 is off or the layer is one
    of the first/last kept in bf16; here the autocast is the flag the stand-in linears read."""
    from megatron.core.fp8_utils import is_first_last_bf16_layer

    if is_init or not config.fp8 or is_first_last_bf16_layer(config, layer_no):
        return contextlib.nullcontext()

    @contextlib.contextmanager
    def autocast():
        before, FP8["enabled"] = FP8["enabled"], True
        try:
            yield
        finally:
            FP8["enabled"] = before

    return autocast()


def install():
    """The stand-in in place of megatron's TE extension (in a spawned test process only); returns
    the FP8 context to put in place of megatron's get_fp8_context."""
    import megatron.core.extensions.transformer_engine as module  # imports without TE (HAVE_TE False)

    from relaxrec_megatron.model.attention import FusedCausalAttention

    module.TEColumnParallelLinear, module.TERowParallelLinear = TEColumnParallelLinear, TERowParallelLinear
    module.TEDotProductAttention = FusedCausalAttention
    return fp8_context
