"""Per-unrolled-layer LoRA factors from the residual between a source weight and its shared weight."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

import torch


class LoraInit(str, Enum):
    SVD = "svd"  # truncated SVD of W_l - W_shared: B = U_r S_r, A = V_r^T (scale 1, no dropout)
    ZERO = "zero"  # B = 0, A random (LoRA's usual init): the model starts as the pure recursive one


class SvdMethod(str, Enum):
    # LAPACK's truncated SVD to fp64 accuracy; O(d^3) per matrix whatever the rank
    EXACT = "exact"
    # randomized subspace iteration (oversampling r, POWER_ITERS passes): O(d_out d_in r) per matrix; the
    # residual it leaves is within a fraction of a percent of the optimal one (the report gives it exactly),
    # but where singular values near the r-th are close, its B A is a different near-optimal rank-r matrix
    RANDOMIZED = "randomized"


POWER_ITERS = 8


@dataclass
class LoraFactors:
    A: torch.Tensor  # (r, d_in)
    B: torch.Tensor  # (d_out, r)
    # ||W - (W' + BA)||_F / ||W||_F in fp32, from the discarded singular values
    rel_error: float

    @property
    def rank(self) -> int:
        return self.A.shape[0]


def clip_rank(rank: int, d_out: int, d_in: int) -> int:
    """Rank actually used for a (d_out, d_in) weight: never above min(d_in, d_out); -1 means full."""
    full = min(d_in, d_out)
    if rank < 0:
        return full
    return min(rank, full)


def relative_error(W: torch.Tensor, approx: torch.Tensor) -> float:
    W = W.float()
    return float(torch.linalg.matrix_norm(W - approx.float()) / torch.linalg.matrix_norm(W).clamp_min(1e-30))


def lora_factors(
    W: torch.Tensor,
    W_shared: torch.Tensor,
    rank: int,
    init: LoraInit | str = LoraInit.SVD,
    generator: torch.Generator | None = None,
    svd: SvdMethod | str = SvdMethod.EXACT,
    device: torch.device | str | None = None,
) -> LoraFactors:
    """Factors (A, B) with W ~= W_shared + B @ A, by truncated SVD of the residual (fp32), computed on
    `device` (default: the CPU) and returned on the CPU.

    rank is clipped to min(d_in, d_out); at full rank the reconstruction is exact up to fp32 rounding
    (the randomized method takes the exact path where the rank saves nothing).
    """
    init, svd = LoraInit(init), SvdMethod(svd)
    W32, S32 = W.float(), W_shared.float()
    d_out, d_in = W32.shape
    r = clip_rank(rank, d_out, d_in)
    R = W32 - S32
    w_norm = float(torch.linalg.matrix_norm(W32).clamp_min(1e-30))
    if r == 0 or init is LoraInit.ZERO:
        A = torch.randn(r, d_in, generator=generator) / d_in**0.5
        return LoraFactors(A=A, B=W32.new_zeros(d_out, r), rel_error=float(torch.linalg.matrix_norm(R)) / w_norm)
    R = R.to(device) if device is not None else R
    if svd is SvdMethod.RANDOMIZED and randomized_pays(d_out, d_in, r):
        B, A, discarded = _randomized_svd(R, r, generator)
    else:
        B, A, discarded = _truncated_svd(R, r)
    return LoraFactors(A=A.cpu(), B=B.cpu(), rel_error=discarded**0.5 / w_norm)


def _truncated_svd(R: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(U_r S_r, V_r^T, sum of discarded S^2) of R, via the eigendecomposition of the smaller Gram matrix.

    fp64 Gram + eigh is 2x faster than LAPACK's SVD on the MLP shapes of a 2B model and keeps the
    full-rank reconstruction exact to fp32: on the tall side B = R V_r (no division by S), and on
    the wide side A = U_r^T R / S_r with numerically-null directions (S ~ 0) dropped.
    """
    R64 = R.double()
    tall = R64.shape[0] >= R64.shape[1]
    gram = R64.T @ R64 if tall else R64 @ R64.T
    evals, evecs = torch.linalg.eigh(gram)  # ascending
    evals, evecs = evals.flip(0).clamp_min(0), evecs.flip(1)
    discarded = float(evals[r:].sum())
    basis = evecs[:, :r]
    if tall:  # basis = V_r
        B, A = R64 @ basis, basis.T
    else:  # basis = U_r
        s = evals[:r].sqrt()
        keep = s > s.max().clamp_min(1e-300) * torch.finfo(torch.float64).eps * max(R64.shape)
        inv_s = torch.where(keep, 1.0 / s.clamp_min(1e-300), torch.zeros_like(s))
        B, A = basis * torch.where(keep, s, torch.zeros_like(s)), (basis.T @ R64) * inv_s[:, None]
    return B.float().contiguous(), A.float().contiguous(), discarded


def randomized_pays(d_out: int, d_in: int, r: int) -> bool:
    """Whether subspace iteration (about m n r work) is cheaper than the Gram matrix and its eigh (about
    n^2 (m + 4 n)), with m >= n; the weights are fitted to CPU timings of both at Llama's shapes."""
    m, n = max(d_out, d_in), min(d_out, d_in)
    return r < n * (0.032 + 0.139 * n / m)


def _randomized_svd(R: torch.Tensor, r: int, generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(U_r S_r, V_r^T, ||R - B A||_F^2) from subspace iteration on a 2r-wide block (fp32 products,
    re-orthonormalised every half step) and the SVD of R's projection on it (fp64). B A is R projected
    on the span of B's columns, so the residual's norm follows from the kept singular values."""
    block = 2 * r
    omega = torch.randn(R.shape[1], block, generator=generator).to(R.device)
    Q = torch.linalg.qr(R @ omega).Q
    for _ in range(POWER_ITERS):
        Q = torch.linalg.qr(R @ torch.linalg.qr(R.T @ Q).Q).Q
    U, s, Vh = torch.linalg.svd((Q.T @ R).double(), full_matrices=False)
    B = (Q.double() @ U[:, :r]) * s[:r]
    discarded = max(float(R.double().pow(2).sum() - s[:r].pow(2).sum()), 0.0)
    return B.float().contiguous(), Vh[:r].float().contiguous(), discarded
