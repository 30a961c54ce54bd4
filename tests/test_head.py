"""The serving LM head (inference/head.ScreenedHead): its greedy tokens and confidence exits against
those of fp32 logits, and its bf16 error bound against fp64."""

import math

import pytest
import torch
import torch.nn.functional as F

from relaxrec_megatron.inference.head import EXIT_WINDOW, PackedBF16Linear, ScreenedHead, confidence

V, H = 6000, 192

pytestmark = pytest.mark.skipif(not ScreenedHead.available(torch.zeros(1, 1)),
                                reason="the screened head runs only on CPUs with native bf16 GEMMs")


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


def counting(W, calls):
    """The fp32 head GEMM, recording how many states each call scores."""
    return lambda x: calls.append(x.shape[0]) or F.linear(x, W)


def test_packed_bf16_gemm_is_bitwise_the_plain_one():
    W, x = head_and_states(0)
    for n in (1, 5, 64):
        xb = x[:n].bfloat16()
        assert torch.equal(PackedBF16Linear(W.bfloat16())(xb), F.linear(xb, W.bfloat16()))


def test_bf16_scores_stay_within_the_error_bound():
    for seed in range(3):
        W, x = head_and_states(seed)
        x = torch.cat([x, torch.randn(16, H) * 3])  # states that point nowhere too
        score, best, bound = ScreenedHead(W).bounded_scores(x)
        assert torch.equal(best, score.amax(dim=1))
        err = (score.double() - x.double() @ W.double().T).abs()
        assert (err <= bound.double()[:, None]).all()
        assert (err.amax(dim=1) / bound).max() > 0.05  # the bound is not so loose that it would pass anything


def test_screened_argmax_is_the_fp32_argmax_even_on_near_ties():
    for seed in range(3):
        W, x = head_and_states(seed, near_ties=True)
        expected = F.linear(x, W).argmax(1)
        assert torch.equal(expected, (x.double() @ W.double().T).argmax(1))  # the ties are resolvable in fp32
        assert not torch.equal(F.linear(x.bfloat16(), W.bfloat16()).float().argmax(1), expected)  # not in bf16
        calls = []
        head = ScreenedHead(W, counting(W, calls))
        assert torch.equal(head.argmax(x), expected)
        for n in (1, 3):
            assert torch.equal(head.argmax(x[:n]), expected[:n])
        assert calls == []  # screened: the whole fp32 head never ran


def test_exact_ties_go_to_the_lowest_index_as_torch_argmax():
    W, x = head_and_states(1)
    W[7] = W[3] = W[11]
    x[0] = W[3] * 5
    assert ScreenedHead(W).argmax(x[:1]).item() == 3 == F.linear(x[:1], W).argmax(1).item()


def test_flat_logits_fall_back_to_the_whole_fp32_head():
    g = torch.Generator().manual_seed(3)
    W = torch.randn(H, generator=g) + 1e-3 * torch.randn(V, H, generator=g)  # every row's score alike
    x = torch.randn(4, H, generator=g)
    calls = []
    head = ScreenedHead(W, counting(W, calls))
    assert torch.equal(head.argmax(x), F.linear(x, W).argmax(1))
    tokens, exits = head.exits(x, "maxprob", 1e-4, torch.ones(4, dtype=torch.bool))
    assert torch.equal(tokens, F.linear(x, W).argmax(1))
    assert torch.equal(exits, confidence(F.linear(x, W), "maxprob") >= 1e-4)
    assert calls == [4, 4]


def states_at_confidence(W, x, kind: str, target: float, rtol: float) -> torch.Tensor:
    """Each state rescaled (a softmax temperature) so that its fp32 confidence is just above
    target * (1 + rtol) or just below target * (1 - rtol), alternately: decisions the bf16 scores
    alone cannot make."""
    above = torch.arange(x.shape[0]) % 2 == 0
    goal = torch.where(above, target * (1 + rtol), target * (1 - rtol))
    lo, hi = torch.full((x.shape[0], 1), 1e-3), torch.full((x.shape[0], 1), 1e3)
    for _ in range(100):  # bisection on the scale; the confidence grows with it
        mid = (lo * hi).sqrt()
        reached = (confidence(F.linear(x * mid, W), kind) >= goal)[:, None]
        lo, hi = torch.where(reached, lo, mid), torch.where(reached, mid, hi)
    return x * torch.where(above[:, None], hi, lo)


@pytest.mark.parametrize("kind", ["maxprob", "margin"])
def test_confidence_exits_decide_as_the_fp32_logits(kind):
    decide = torch.ones(64, dtype=torch.bool)
    decide[::5] = False  # rows at their last loop: a token, no decision
    for seed in range(3):
        W, x = head_and_states(seed)
        x = x / x.norm(dim=1, keepdim=True) * 2  # softer than head_and_states's: confidences across (0, 1)
        for threshold in (0.1, 0.5, 0.9):
            calls = []
            tokens, exits = ScreenedHead(W, counting(W, calls)).exits(x, kind, threshold, decide)
            logits = F.linear(x, W)
            assert torch.equal(tokens, logits.argmax(1))
            assert torch.equal(exits, decide & (confidence(logits, kind) >= threshold))
            assert sum(calls) < 64  # most decisions made without the whole fp32 head


def long_tail_head_and_states(seed: int = 0):
    """A head whose rows all score about alike, but for one target row per state: at a confidence of
    0.5 about half the probability lies in rows 8 or more nats below the top, where the bounds, not
    fp32 scores, account for it."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(H, generator=g) + 0.05 * torch.randn(V, H, generator=g)
    targets = torch.randperm(V, generator=g)[:64]
    W[targets] += 0.3 * torch.randn(64, H, generator=g)
    return W, W[targets] / W[targets].norm(dim=1, keepdim=True)


@pytest.mark.parametrize("kind", ["maxprob", "margin"])
def test_exits_at_the_threshold_are_decided_in_fp32(kind, monkeypatch):
    """Confidences within 3e-5 of the threshold: the bounds leave them open and the fp32 logits decide.
    With the bound set to zero, the bf16 scores decide some of them wrongly."""
    W, x = long_tail_head_and_states()
    x = states_at_confidence(W, x, kind, 0.5, 3e-5)
    logits = F.linear(x, W)
    expected = confidence(logits, kind) >= 0.5
    assert int(expected.sum()) == 32  # both sides of the threshold
    decide = torch.ones(64, dtype=torch.bool)
    calls = []
    tokens, exits = ScreenedHead(W, counting(W, calls)).exits(x, kind, 0.5, decide)
    assert torch.equal(exits, expected) and torch.equal(tokens, logits.argmax(1))
    assert sum(calls) > 32
    bounded = ScreenedHead.bounded_scores
    monkeypatch.setattr(ScreenedHead, "bounded_scores", lambda self, x: (*bounded(self, x)[:2], torch.zeros(len(x))))
    assert not torch.equal(ScreenedHead(W).exits(x, kind, 0.5, decide)[1], expected)


def test_margin_scores_the_runner_up_in_fp32():
    """Each state x (a unit vector) has a top row x and a runner-up row x / 2; every other row is small
    and scores about 0. At the threshold the runner-up is about 9.5 nats below the top, beyond
    EXIT_WINDOW, and its fp32 score is what decides a margin within 3e-5 of the threshold."""
    g = torch.Generator().manual_seed(4)
    W = 1e-3 * torch.randn(V, H, generator=g)
    x = F.normalize(torch.randn(64, H, generator=g), dim=1)
    rows = torch.randperm(V, generator=g)[:128]
    W[rows[:64]], W[rows[64:]] = x, x / 2
    threshold = 1 - 2 * math.exp(-9.5)
    x = states_at_confidence(W, x, "margin", threshold, 3e-5)
    logits = F.linear(x, W)
    assert (logits.topk(2, dim=1).values.diff(dim=1).neg() > EXIT_WINDOW + 2).all()
    expected = confidence(logits, "margin") >= threshold
    assert int(expected.sum()) == 32
    tokens, exits = ScreenedHead(W).exits(x, "margin", threshold, torch.ones(64, dtype=torch.bool))
    assert torch.equal(exits, expected) and torch.equal(tokens, logits.argmax(1))
