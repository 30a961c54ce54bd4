"""Early-exit training (training.objective) on CPU: the loss, each loop's reported loss and the
gradients of the trainer's step equal a plain-torch reference computed here from the HF relaxed
model, at (TP, PP) = (1, 1), (2, 1) with sequence parallelism, and (1, 2), where the first loop's
hidden state is computed on stage 0 and travels to the last stage with the activations."""

import pytest
import torch
import torch.nn.functional as F
from parity import EXIT_CASES, EXIT_LAYOUTS, TEACHER, TOKENS, full_grads
from pipeline import batch_from_tokens
from transformers import AutoModelForCausalLM

from relaxrec_megatron.model.state_adapter import canonical_getter


def kl(target_logits, logits, T):
    """KL(softmax(target / T) || softmax(logits / T)) per token."""
    p = F.log_softmax(target_logits / T, -1)
    return (p.exp() * (p - F.log_softmax(logits / T, -1))).sum(-1)


def reference(relaxed, case):
    """(loss, [CE of each loop's exit], canonical gradients) from the HF relaxed model."""
    model = AutoModelForCausalLM.from_pretrained(relaxed / "llama-lora", dtype=torch.float32).train()
    cfg, batch = model.config, batch_from_tokens(TOKENS)
    out = model(TOKENS, use_cache=False, output_hidden_states=True)
    K, B = cfg.num_shared_layers, cfg.num_loops
    logits = [model.lm_head(model.model.norm(out.hidden_states[(b + 1) * K])) for b in range(B - 1)] + [out.logits]
    ce = [F.cross_entropy(z.flatten(0, 1), batch["labels"].flatten(), reduction="none").view(TOKENS.shape)
          for z in logits]
    teacher = None
    if case["teacher"]:
        with torch.no_grad():
            teacher = AutoModelForCausalLM.from_pretrained(relaxed / TEACHER[0], dtype=torch.float32)(TOKENS).logits
    kd, e = case["kd"], case["exit"]
    final = ce[-1]
    if kd["enabled"]:
        a, T = kd["alpha"], kd["temperature"]
        final = a * ce[-1] + (1 - a) * T * T * kl(teacher, logits[-1], T)
    per_token = e["weights"][-1] * final
    target = {"final": logits[-1].detach(), "teacher": teacher, "none": None}[e["distill"]]
    for b in range(B - 1):
        lb = ce[b]
        if target is not None:
            a, T = e["alpha"], e["temperature"]
            lb = a * ce[b] + (1 - a) * T * T * kl(target, logits[b], T)
        per_token = per_token + e["weights"][b] * lb
    mask = batch["loss_mask"].float()
    masked_mean = lambda x: (x * mask).sum() / mask.sum()
    loss = masked_mean(per_token)
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    return (loss.item(), [masked_mean(c).item() for c in ce],
            canonical_getter(grads.__getitem__, cfg.num_key_value_heads))


@pytest.mark.slow
@pytest.mark.parametrize("layout", EXIT_LAYOUTS)
@pytest.mark.parametrize("case", EXIT_CASES, ids=[c["name"] for c in EXIT_CASES])
def test_exit_loss_and_gradients_equal_plain_torch(parity_runs, relaxed, layout, case):
    loss, loop_ce, ref = reference(relaxed, case)
    got = torch.load(parity_runs / layout / f"{case['name']}.reports.pt")
    assert got["loss"].item() == pytest.approx(loss, rel=1e-5)
    assert got["loops"].tolist() == pytest.approx(loop_ce, rel=1e-5)
    assert loop_ce[0] != pytest.approx(loop_ce[1], rel=1e-3)  # the two exits are different outputs
    grads = full_grads(parity_runs / layout, case["name"])
    assert any(".lora." in k for k in grads)
    pad = None
    for key, g in grads.items():
        r = ref(key)
        if key == "model.embed_tokens.weight":  # the HF embedding zeroes its pad row's gradient (test_megatron)
            pad = AutoModelForCausalLM.from_pretrained(relaxed / "llama-lora").config.pad_token_id if pad is None else pad
            if pad is not None:
                keep = torch.arange(r.shape[0]) != pad
                g, r = g[keep], r[keep]
        rel = float((g - r).norm() / r.norm().clamp_min(1e-30))
        assert rel <= 1e-5, (key, rel)
