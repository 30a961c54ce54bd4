"""The LM head at decode: the final norm, then the logits, or only the greedy token where that is all
a step needs (every emitted token, and every exit but a confidence exit's).

Logits (`logits`): on CPU in fp32 with MKL, MKL's packed GEMM. The weight is packed once instead of on
every call, which runs the SmolLM2 LM head (49152 x 576) at 8 rows 2.3x faster (4.9 vs 11.5 ms,
measured here); it keeps a packed copy of the weight and differs from F.linear only by summation
order (max |diff| 6e-5 on logits of that head). Elsewhere (GPU, bf16, no MKL): F.linear.

Greedy token (`argmax`), exact, on CPUs with native bf16 GEMMs (AMX / AVX512-BF16) and an fp32 head:
a bf16 copy of the head (half the bytes to read) scores every vocabulary row, and only the rows that
may still be the fp32 argmax are scored in fp32. A bf16 score a_i of state x and head row w_i is within
e_i = c ||x|| ||w_i|| of the exact score: x and w_i are rounded to bf16, the products summed in fp32,
the sum rounded to bf16, so |error| <= (3u + d 2^-24) sum_j |x_j w_ij| to first order (u = 2^-8, d the
hidden size), then Cauchy-Schwarz, and c keeps a factor 2 to spare. So the argmax is among the rows
with a_i + e_i >= max_j (a_j - e_j), and only those are scored in fp32: the token is the fp32 argmax,
as exact as any other fp32 GEMM's (summation order aside, as above). tests/test_head.py checks the
bound, and that near-ties below bf16's resolution go to the fp32 winner. It keeps a bf16 copy
of the head (56 MB for SmolLM2); where the logits are so flat that over 1/8 of the vocabulary
survives, it scores the whole head in fp32 instead. Head time per call, full packed fp32 vs screened,
on the states of SmolLM2 bench runs (scratch timing): batch 8, 2 loops: seq-CB (7.1 rows a call) 5.5
vs 3.7 ms, CDB (4.7 rows) 5.7 vs 3.4 ms; 3 loops: seq-CB 5.6 vs 4.1 ms, CDB (4.0 rows) 5.0 vs 3.0 ms;
batch 64, 3 loops: CDB (22 rows) 9.2 vs 5.8 ms, seq-CB (36 rows) 12.2 vs 9.5 ms, 64 rows 14.8 vs 14.8.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .block import norm
from .weights import EngineWeights

BF16_UNIT_ROUNDOFF = 2.0 ** -8


class RowsLinear:
    """x @ W^T for a weight applied many times to a few rows (module docstring)."""

    def __init__(self, weight: torch.Tensor, batch_hint: int = 8):
        self.weight, self.batch_hint = weight, batch_hint
        self.packed = None
        if weight.device.type == "cpu" and weight.dtype == torch.float32 and torch.backends.mkl.is_available():
            self.packed = torch.ops.mkl._mkl_reorder_linear_weight(weight, batch_hint)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed is None:
            return F.linear(x, self.weight)
        return torch.ops.mkl._mkl_linear(x, self.packed, self.weight, None, self.batch_hint)


class ScreenedArgmax:
    """The exact argmax of x @ W^T from a bf16 screen and fp32 scores of the survivors (module docstring)."""

    def __init__(self, weight: torch.Tensor, full=None):
        """full: the fp32 head GEMM for flat logits (LMHead passes its packed RowsLinear)."""
        self.weight = weight
        self.full = full or (lambda x: F.linear(x, weight))
        self.screen = weight.bfloat16()
        self.row_norms = weight.norm(dim=1)
        self.c = 2 * (3 * BF16_UNIT_ROUNDOFF + weight.shape[1] * 2.0 ** -24)

    @staticmethod
    def available(weight: torch.Tensor) -> bool:
        return (weight.device.type == "cpu" and weight.dtype == torch.float32
                and torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())

    def _scale(self, x: torch.Tensor) -> torch.Tensor:
        """(n, 1): e_i / ||w_i|| for each state."""
        return self.c * x.norm(dim=1, keepdim=True)

    def error_bound(self, x: torch.Tensor) -> torch.Tensor:
        """(n, V): e_i for every state and vocabulary row (__call__ forms it in place, from _scale)."""
        return self._scale(x) * self.row_norms[None]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        score = F.linear(x.bfloat16(), self.screen).float()
        scale = self._scale(x)
        best_lower = torch.addcmul(score, scale, self.row_norms[None], value=-1).amax(dim=1, keepdim=True)
        may_win = score.addcmul_(scale, self.row_norms[None]) >= best_lower
        cols = may_win.any(dim=0).nonzero().flatten()
        if cols.numel() > self.weight.shape[0] // 8:  # flat logits: the whole fp32 head is cheaper
            return self.full(x).argmax(dim=1)
        exact = F.linear(x, self.weight[cols]).masked_fill_(~may_win[:, cols], -torch.inf)
        return cols[exact.argmax(dim=1)]  # cols ascend: exact ties go to the lowest index, as torch.argmax


class LMHead:
    def __init__(self, w: EngineWeights, batch_hint: int = 8):
        self.w = w
        self.gemm = RowsLinear(w.lm_head, batch_hint)
        self.screened = ScreenedArgmax(w.lm_head, self.gemm) if ScreenedArgmax.available(w.lm_head) else None

    def _normed(self, hidden: torch.Tensor) -> torch.Tensor:
        return norm(hidden, self.w.final_norm, self.w.config, None)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """(n, h) last hidden states -> (n, V) fp32 logits."""
        return self.gemm(self._normed(hidden)).float()

    def argmax(self, hidden: torch.Tensor) -> list[int]:
        """The greedy token of each state, exactly argmax(logits(hidden))."""
        if self.screened is None:
            return self.logits(hidden).argmax(-1).tolist()
        return self.screened(self._normed(hidden)).tolist()
