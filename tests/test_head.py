"""The serving LM head's exact greedy token (inference/head.ScreenedArgmax) against fp32/fp64 argmax."""

import torch
import torch.nn.functional as F

from relaxrec_megatron.inference.head import ScreenedArgmax

V, H = 6000, 192


def head_and_states(seed: int = 0, near_ties: bool = False):
    """A head with rows of uneven norms, and states that point at some of its rows (peaked logits, as
    an LM's are). With near_ties, each state's target row gets a rival whose score differs by +-0.5
    (scores are about 3000): below bf16's resolution there, far above fp32's (checked against fp64)."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(V, H, generator=g) * torch.rand(V, 1, generator=g).mul(3).add(0.2)
    targets = torch.randperm(V, generator=g)[:64]
    x = W[targets] * 4 + torch.randn(64, H, generator=g)
    if near_ties:  # a rival row, otherwise random, moved along x to score the target's +-0.5
        rivals = (targets + V // 2) % V
        gap = torch.where(torch.arange(64) % 2 == 0, 0.5, -0.5)
        shift = ((x * W[targets]).sum(1) + gap - (x * W[rivals]).sum(1)) / x.pow(2).sum(1)
        W[rivals] += shift[:, None] * x
    return W, x


def test_bf16_scores_stay_within_the_error_bound():
    for seed in range(3):
        W, x = head_and_states(seed)
        s = ScreenedArgmax(W)
        exact = x.double() @ W.double().T
        err = (F.linear(x.bfloat16(), s.screen).double() - exact).abs()
        bound = s.error_bound(x).double()
        assert (err <= bound).all()
        assert (err / bound).max() > 0.01  # the bound is not so loose that it would pass anything


def test_screened_argmax_is_the_fp32_argmax_even_on_near_ties(monkeypatch):
    shapes = []
    linear = F.linear
    monkeypatch.setattr(F, "linear", lambda a, w: shapes.append((w.dtype, w.shape[0])) or linear(a, w))
    for seed in range(3):
        W, x = head_and_states(seed, near_ties=True)
        expected = linear(x, W).argmax(1)
        assert torch.equal(expected, (x.double() @ W.double().T).argmax(1))  # the ties are resolvable in fp32
        assert not torch.equal(linear(x.bfloat16(), W.bfloat16()).float().argmax(1), expected)  # not in bf16
        assert torch.equal(ScreenedArgmax(W)(x), expected)
        for n in (1, 3):
            assert torch.equal(ScreenedArgmax(W)(x[:n]), expected[:n])
    fp32_rows = [rows for dtype, rows in shapes if dtype == torch.float32]
    assert max(fp32_rows) < V // 8 < min(rows for dtype, rows in shapes if dtype == torch.bfloat16)  # screened


def test_exact_ties_go_to_the_lowest_index_as_torch_argmax():
    W, x = head_and_states(1)
    W[7] = W[3] = W[11]
    x[0] = W[3] * 5
    assert ScreenedArgmax(W)(x[:1]).item() == 3 == F.linear(x[:1], W).argmax(1).item()


def test_flat_logits_fall_back_to_the_whole_fp32_head(monkeypatch):
    g = torch.Generator().manual_seed(3)
    W = torch.randn(H, generator=g) + 1e-3 * torch.randn(V, H, generator=g)  # every row's score alike
    x = torch.randn(4, H, generator=g)
    shapes = []
    linear = F.linear
    monkeypatch.setattr(F, "linear", lambda a, w: shapes.append((w.dtype, w.shape[0])) or linear(a, w))
    assert torch.equal(ScreenedArgmax(W)(x), linear(x, W).argmax(1))
    assert shapes == [(torch.bfloat16, V), (torch.float32, V)]
