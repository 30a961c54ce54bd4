"""Vocab-parallel distillation loss against a single-process reference in plain torch."""

import pytest
import torch
import torch.nn.functional as F
from megatron_jobs import kd_job

from relaxrec_megatron.parallel.local_world import run_world


def reference(student, teacher, labels, alpha, T):
    s = student.clone().requires_grad_(True)
    ce = F.cross_entropy(s.flatten(0, -2), labels.flatten(), reduction="none").view(labels.shape)
    log_ps, log_pt = F.log_softmax(s / T, -1), F.log_softmax(teacher / T, -1)
    kl = (log_pt.exp() * (log_pt - log_ps)).sum(-1)
    loss = alpha * ce + (1 - alpha) * T * T * kl
    (loss * torch.linspace(0.5, 1.5, loss.numel()).view_as(loss)).sum().backward()
    return loss.detach(), ce.detach(), kl.detach(), s.grad


# 15 tokens in chunks of `chunk` (a partial last chunk, one token at a time, all at once)
CASES = [(0.5, 1.0, 4), (0.0, 2.0, 1), (1.0, 1.0, 100)]


@pytest.fixture(scope="module")
def tp2_world(tmp_path_factory):
    """One TP=2 world computes every case."""
    out = tmp_path_factory.mktemp("kd")
    g = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(5, 3, 64, generator=g) * 3, torch.randn(5, 3, 64, generator=g) * 3
    labels = torch.randint(0, 64, (5, 3), generator=g)
    run_world(kd_job, 2, student, teacher, labels, CASES, 2, str(out), timeout=300)
    return student, teacher, labels, out


@pytest.mark.slow
@pytest.mark.parametrize("case", range(len(CASES)), ids=[f"alpha{a}-T{t}-chunk{c}" for a, t, c in CASES])
def test_kd_loss_matches_plain_torch_at_tp2(tp2_world, case):
    student, teacher, labels, out = tp2_world
    alpha, T, _ = CASES[case]
    shards = [torch.load(out / f"kd{case}.{r}.pt") for r in range(2)]
    loss, ce, kl, grad = reference(student, teacher, labels, alpha, T)
    for s in shards:  # the loss is replicated on every TP rank
        torch.testing.assert_close(s["loss"], loss, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(s["ce"], ce, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(s["kl"], kl, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.cat([s["grad"] for s in shards], -1), grad, rtol=1e-5, atol=1e-6)
    if alpha < 1:
        assert kl.abs().max() > 1e-2  # the teacher term matters in this test


def test_kd_loss_on_bf16_logits_in_one_process():
    # logits stay in the model's dtype: the gradient comes back in bf16, each chunk computed in fp32
    from relaxrec_megatron.training.kd import distillation_loss

    g = torch.Generator().manual_seed(1)
    student, teacher = torch.randn(2, 7, 50, generator=g) * 3, torch.randn(2, 7, 50, generator=g) * 3
    labels = torch.randint(0, 50, (2, 7), generator=g)
    s = student.bfloat16().requires_grad_(True)
    loss, ce, kl = distillation_loss(s, teacher.bfloat16(), labels, 0.3, 1.5, chunk_bytes=3 * 4 * 50)
    (loss * torch.linspace(0.5, 1.5, loss.numel()).view_as(loss)).sum().backward()
    ref_loss, ref_ce, ref_kl, ref_grad = reference(student.bfloat16().float(), teacher.bfloat16().float(), labels,
                                                   0.3, 1.5)
    assert s.grad.dtype == torch.bfloat16 and loss.dtype == torch.float32
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(s.grad.float(), ref_grad, rtol=1e-2, atol=1e-3)  # bf16 rounding of the gradient
