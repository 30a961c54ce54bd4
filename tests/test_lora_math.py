import pytest
import torch

from relaxrec_megatron.recursion.lora import clip_rank, lora_factors


@pytest.fixture(params=[(48, 32), (32, 48), (40, 40)], ids=["tall", "wide", "square"])
def pair(request):
    g = torch.Generator().manual_seed(0)
    W = torch.randn(*request.param, generator=g)
    return W, 0.5 * torch.randn(*request.param, generator=g)


def test_full_rank_reconstructs_exactly(pair):
    W, S = pair
    f = lora_factors(W, S, -1)
    assert f.rank == min(W.shape)
    torch.testing.assert_close(S + f.B @ f.A, W, atol=1e-5, rtol=0)
    assert f.rel_error < 1e-6


def test_matches_lapack_truncated_svd(pair):
    """B A equals U_r S_r V_r^T from torch.linalg.svd (fp64 reference), and B = U_r S_r, A = V_r^T."""
    W, S = pair
    U, s, Vh = torch.linalg.svd((W - S).double(), full_matrices=False)
    for r in (1, 5, 17):
        f = lora_factors(W, S, r)
        ref = (U[:, :r] * s[:r]) @ Vh[:r]
        torch.testing.assert_close((f.B @ f.A).double(), ref, atol=1e-5, rtol=0)
        # rows of A are orthonormal right singular vectors, B's columns carry the singular values
        torch.testing.assert_close(f.A @ f.A.T, torch.eye(r), atol=1e-5, rtol=0)
        torch.testing.assert_close(f.B.norm(dim=0).double(), s[:r], atol=1e-4, rtol=1e-5)
        expected_err = float(s[r:].pow(2).sum().sqrt() / W.double().norm())
        assert f.rel_error == pytest.approx(expected_err, rel=1e-5)


def test_error_falls_as_rank_rises(pair):
    W, S = pair
    errors = [lora_factors(W, S, r).rel_error for r in (0, 2, 8, 16, 32)]
    assert all(a > b for a, b in zip(errors, errors[1:])), errors


def test_rank_zero_and_zero_init():
    W, S = torch.randn(8, 6), torch.randn(8, 6)
    f0 = lora_factors(W, S, 0)
    assert f0.A.shape == (0, 6) and f0.B.shape == (8, 0)
    fz = lora_factors(W, S, 4, init="zero", generator=torch.Generator().manual_seed(1))
    assert fz.A.shape == (4, 6) and torch.count_nonzero(fz.B) == 0 and torch.count_nonzero(fz.A) > 0
    assert fz.rel_error == pytest.approx(f0.rel_error)


def test_identical_weights_give_zero_factors():
    W = torch.randn(16, 8)
    f = lora_factors(W, W.clone(), -1)
    assert torch.isfinite(f.A).all() and torch.isfinite(f.B).all()
    torch.testing.assert_close(f.B @ f.A, torch.zeros(16, 8))


def test_clip_rank():
    assert clip_rank(512, 256, 2048) == 256
    assert clip_rank(64, 256, 2048) == 64
    assert clip_rank(-1, 300, 200) == 200
    assert clip_rank(0, 3, 3) == 0
