"""The LM head at decode: the final norm, then the greedy token and, for confidence exits, whether
each row is confident enough to exit: both exactly as the fp32 logits give them.

Logits (`RowsLinear`): on CPU in fp32 with MKL, MKL's packed GEMM. The weight is packed once instead of
on every call, which is what a head applied to a few rows at a time pays for most (docs/benchmarks.md,
Serving kernels); it keeps a packed copy of the weight and differs from F.linear only by summation
order (max |diff| 6e-5 on the logits of SmolLM2's head). Elsewhere (GPU, bf16, no MKL): F.linear.

Screened head (`ScreenedHead`), on CPUs with native bf16 GEMMs (AMX / AVX512-BF16) and an fp32 head:
a bf16 copy of the head (half the bytes; packed once for oneDNN, `PackedBF16Linear`) scores every
vocabulary row, with a rigorous bound E on how far any of a state's scores a_i is from the fp32 one;
then only what the bound leaves open is computed in fp32.
- The bound. With x~ = bf16(x) and w~_i = bf16(w_i), x.w_i - x~.w~_i = (x - x~).w_i + x~.(w_i - w~_i)
  exactly; the GEMM sums the products of x~ and w~_i in fp32 (error <= gamma_d ||x~|| ||w~_i||,
  gamma_d = d 2^-24 / (1 - d 2^-24)) and rounds the sum to bf16 (error <= u |a_i| / (1 - u), u = 2^-8).
  Cauchy-Schwarz on the rounding terms, with the rounding errors' actual norms and the largest over
  the vocabulary of each row term, gives one bound per state:
  E = ||x - x~|| max ||w_i|| + ||x~|| max (||w_i - w~_i|| + gamma_d ||w~_i||) + u max |a_i| / (1 - u),
  and BOUND_MARGIN covers the bound's own fp32 arithmetic. On SmolLM2's exit states E is about 1 nat
  and the largest actual error about 0.3 of it (6u ||x|| ||w_i|| would be about 3 nats).
- Greedy token (`argmax`): the argmax is among the rows with a_i >= max_j a_j - 2E; those rows are
  scored in fp32 (one small GEMM over every state's candidates), so the token is the fp32 argmax.
- Confidence exit (`exits`): max-prob p_1 = 1 / S and margin p_1 - p_2 = (1 - exp(l_2 - l_1)) / S,
  with S = sum_i exp(l_i - l_1). The rows within EXIT_WINDOW nats of the top (and, for the margin, every
  row that may be second) are scored in fp32, which gives l_1 and l_2 exactly; every other row's term
  lies in [0, exp(a_i + E - l_1)], so S lies in an interval. Where the interval leaves the decision
  open (or it lies within a relative 1e-5 of the threshold, so that no decision rests on summation
  order), that state's logits are computed in fp32 whole: 0.6% of the decisions (4% of the calls)
  on SmolLM2's states at 3 loops with max-prob >= 0.5, 2.6% (16%) at 2 loops.
Where the logits are so flat that over 1/8 of the vocabulary needs fp32 scores, the whole fp32 head
is used instead. tests/test_head.py checks the bound against fp64, near-ties below bf16's resolution,
and exit decisions at 3e-5 of the threshold against the fp32 logits'. Memory: the packed bf16 head
(56 MB for SmolLM2) next to the packed fp32 one. docs/benchmarks.md (Serving kernels) has its time
per call against the whole fp32 head's.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .block import norm
from .weights import EngineWeights

BF16_UNIT_ROUNDOFF = 2.0 ** -8
BOUND_MARGIN = 1.01
DECISION_RTOL = 1e-5
EXIT_WINDOW = 6.0  # nats below the best score that confidence exits score in fp32


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


class PackedBF16Linear:
    """x @ W^T in bf16 with fp32 accumulation, the weight reordered once for oneDNN: F.linear reorders it
    on every call, which costs as much as the GEMM. The same products, summed the same way: the
    results are bitwise equal."""

    def __init__(self, weight: torch.Tensor, batch_hint: int = 8):
        self.weight, self.packed = weight, None
        try:
            self.packed, self.weight = torch.ops.mkldnn._reorder_linear_weight(weight, batch_hint), None
        except (RuntimeError, AttributeError):  # a torch build without the op: plain oneDNN calls
            pass

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed is None:
            return F.linear(x, self.weight)
        return torch.ops.mkldnn._linear_pointwise(x.contiguous(), self.packed, None, "none", [None], "")


def confidence(logits: torch.Tensor, kind: str) -> torch.Tensor:
    """The reference: max-prob or margin (top-1 minus top-2 probability) of each row of fp32 logits."""
    top = torch.softmax(logits, dim=-1).topk(2, dim=-1).values
    return top[:, 0] if kind == "maxprob" else top[:, 0] - top[:, 1]


def exits_from_logits(logits: torch.Tensor, kind: str, threshold: float, decide: torch.Tensor
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy tokens and confidence exits (where `decide` is set) from whole fp32 logits."""
    return logits.argmax(dim=-1), decide & (confidence(logits, kind) >= threshold)


class ScreenedHead:
    """Exact greedy tokens and confidence exits from a bf16 screen with bounds (module docstring)."""

    def __init__(self, weight: torch.Tensor, full=None, batch_hint: int = 8):
        """full: the fp32 head GEMM for flat logits and open decisions (LMHead passes its RowsLinear)."""
        self.weight = weight
        self.full = full or (lambda x: F.linear(x, weight))
        screen = weight.bfloat16()
        self.screen_gemm = PackedBF16Linear(screen, batch_hint)
        rounded = screen.float()
        d = weight.shape[1]
        gamma = d * 2.0 ** -24 / (1 - d * 2.0 ** -24)
        self.max_row_norm = float(weight.norm(dim=1).max()) * BOUND_MARGIN
        self.max_screen_term = float(((weight - rounded).norm(dim=1) + gamma * rounded.norm(dim=1)).max()) * BOUND_MARGIN
        self.output_rounding = BF16_UNIT_ROUNDOFF / (1 - BF16_UNIT_ROUNDOFF) * BOUND_MARGIN

    @staticmethod
    def available(weight: torch.Tensor) -> bool:
        return (weight.device.type == "cpu" and weight.dtype == torch.float32
                and torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())

    def bounded_scores(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(n, V) bf16 scores a (as fp32), (n,) their maxima, and (n,) bounds E: |x.w_i - a_i| <= E."""
        xq = x.bfloat16()
        score = self.screen_gemm(xq).float()
        xr = xq.float()
        low, high = torch.aminmax(score, dim=1)
        bound = ((x - xr).norm(dim=1) * self.max_row_norm + xr.norm(dim=1) * self.max_screen_term
                 + torch.maximum(high, -low) * self.output_rounding)
        return score, high, bound

    def _rescored(self, x: torch.Tensor, score: torch.Tensor, cut: torch.Tensor):
        """The vocabulary rows some state scores at least its cut (ascending) and every state's fp32
        scores on them; None where the logits are too flat for screening to pay."""
        cols = (score >= cut[:, None]).any(dim=0).nonzero().flatten()
        if cols.numel() > self.weight.shape[0] // 8:
            return None
        return cols, F.linear(x, self.weight[cols])

    def argmax(self, x: torch.Tensor) -> torch.Tensor:
        score, best, bound = self.bounded_scores(x)
        rescored = self._rescored(x, score, best - 2 * bound)  # a_i + E >= max_j a_j - E
        if rescored is None:
            return self.full(x).argmax(dim=1)
        cols, exact = rescored
        return cols[exact.argmax(dim=1)]  # cols ascend: exact ties go to the lowest index, as torch.argmax

    def exits(self, x: torch.Tensor, kind: str, threshold: float, decide: torch.Tensor
              ) -> tuple[torch.Tensor, torch.Tensor]:
        """Greedy tokens (n,) and, for the states where `decide` is set, confidence >= threshold."""
        score, best, bound = self.bounded_scores(x)
        cut = best - 2 * bound - EXIT_WINDOW
        if kind == "margin":  # also every row that may be second
            cut = torch.minimum(cut, score.topk(2, dim=1).values[:, 1] - 2 * bound)
        rescored = self._rescored(x, score, cut)
        if rescored is None:
            return exits_from_logits(self.full(x), kind, threshold, decide)
        cols, exact = rescored
        top2 = exact.topk(min(2, cols.numel()), dim=1).values
        l1 = top2[:, :1]
        in_cols = (exact - l1).exp_().sum(dim=1)
        rest = (torch.logsumexp(score.index_fill_(1, cols, -torch.inf), dim=1) - l1[:, 0] + bound).exp_()
        lead = 1 if kind == "maxprob" else 1 - (top2[:, 1] - top2[:, 0]).exp()
        low, high = lead / (in_cols + rest * BOUND_MARGIN), lead / in_cols
        exit_ = low >= threshold * (1 + DECISION_RTOL)
        open_ = decide & ~exit_ & (high >= threshold * (1 - DECISION_RTOL))
        if open_.any():
            exit_[open_] = confidence(self.full(x[open_]), kind) >= threshold
        return cols[exact.argmax(dim=1)], decide & exit_


class LMHead:
    def __init__(self, w: EngineWeights, batch_hint: int = 8):
        self.w = w
        self.gemm = RowsLinear(w.lm_head, batch_hint)
        self.screened = ScreenedHead(w.lm_head, self.gemm, batch_hint) if ScreenedHead.available(w.lm_head) else None

    def _normed(self, hidden: torch.Tensor) -> torch.Tensor:
        return norm(hidden, self.w.final_norm, self.w.config, None)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """(n, h) last hidden states -> (n, V) fp32 logits."""
        return self.gemm(self._normed(hidden)).float()

    def argmax(self, hidden: torch.Tensor) -> list[int]:
        """The greedy token of each state, exactly argmax(logits(hidden))."""
        if self.screened is None:
            return self.logits(hidden).argmax(-1).tolist()
        return self.screened.argmax(self._normed(hidden)).tolist()

    def exits(self, hidden: torch.Tensor, kind: str, threshold: float, decide: torch.Tensor
              ) -> tuple[list[int], list[bool]]:
        """Greedy tokens, and which states (of those with `decide` set) exit: confidence(logits(hidden),
        kind) >= threshold, kind "maxprob" or "margin"."""
        if self.screened is None:
            tokens, exit_ = exits_from_logits(self.logits(hidden), kind, threshold, decide)
        else:
            tokens, exit_ = self.screened.exits(self._normed(hidden), kind, threshold, decide)
        tokens, exit_ = torch.stack([tokens, exit_.to(tokens.dtype)]).tolist()  # one sync for both
        return tokens, [bool(e) for e in exit_]
