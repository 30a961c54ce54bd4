import pytest
import torch

from relaxrec_megatron.recursion.lora import clip_rank, lora_factors, randomized_pays


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


def _residual_with_decay(m=320, n=256, seed=0):
    """A residual whose singular values decay like a trained weight difference's, then flatten."""
    g = torch.Generator().manual_seed(seed)
    U, _ = torch.linalg.qr(torch.randn(m, n, generator=g))
    V, _ = torch.linalg.qr(torch.randn(n, n, generator=g))
    s = 1.0 / (1.0 + torch.arange(n) / 8.0) + 0.05
    return (U * s) @ V.T


def test_randomized_svd_leaves_a_near_optimal_residual_and_reports_it_exactly():
    """The randomized method's ||R - BA|| is within 0.5% of the optimal rank-r residual (LAPACK), and
    rel_error is that residual as measured, not an estimate."""
    R = _residual_with_decay()
    W, S = R + 1.0, torch.full_like(R, 1.0)
    s = torch.linalg.svdvals(R.double())
    for r in (8, 24):
        assert randomized_pays(*R.shape, r)
        f = lora_factors(W, S, r, generator=torch.Generator().manual_seed(3), svd="randomized")
        residual = float((R.double() - f.B.double() @ f.A.double()).norm())
        optimal = float(s[r:].pow(2).sum().sqrt())
        assert optimal <= residual <= optimal * 1.005
        assert f.rel_error == pytest.approx(residual / float(W.double().norm()), rel=1e-4)
        torch.testing.assert_close(f.A @ f.A.T, torch.eye(r), atol=1e-5, rtol=0)


def test_randomized_takes_the_exact_path_where_it_saves_nothing(pair):
    W, S = pair
    assert not randomized_pays(*W.shape, 17)
    exact, randomized = lora_factors(W, S, 17), lora_factors(W, S, 17, svd="randomized")
    assert torch.equal(exact.A, randomized.A) and torch.equal(exact.B, randomized.B)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the GPU path runs where CUDA is")
def test_factors_on_the_gpu_equal_the_cpus():
    R = _residual_with_decay()
    cpu, gpu = lora_factors(R, torch.zeros_like(R), 24), lora_factors(R, torch.zeros_like(R), 24, device="cuda")
    assert gpu.A.device.type == "cpu"
    torch.testing.assert_close(gpu.B @ gpu.A, cpu.B @ cpu.A, atol=1e-5, rtol=0)
