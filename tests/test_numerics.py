"""The shared numerics (relaxrec_megatron/numerics.py) against the copy the remote-code HF model
carries (hf/modeling_relaxrec.py), which must load without this package."""

import pytest
import torch

from relaxrec_megatron import numerics
from relaxrec_megatron.hf import modeling_relaxrec as remote
from relaxrec_megatron.hf.configuration_relaxrec import RelaxedRecursiveConfig

NORMS = [("rmsnorm", False), ("rmsnorm", True), ("layernorm", False)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind, zero_centered", NORMS)
def test_norms_equal_the_remote_codes(kind, zero_centered, dtype):
    cfg = RelaxedRecursiveConfig(hidden_size=64, norm_type=kind, norm_zero_centered=zero_centered, norm_eps=1e-5)
    ref = remote.Norm(cfg).to(dtype)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        ref.weight.copy_(torch.randn(64, generator=g) * 0.3 + (0 if zero_centered else 1))
        if ref.bias is not None:
            ref.bias.copy_(torch.randn(64, generator=g) * 0.1)
    x = (torch.randn(3, 5, 64, generator=g) * 4).to(dtype)
    got = numerics.norm(x, ref.weight, ref.bias, kind, zero_centered, 1e-5)
    # fp32: the same statistics up to summation order; bf16: one rounding of the same fp32 result
    tol = {"rtol": 1e-6, "atol": 1e-6} if dtype == torch.float32 else {"rtol": 8e-3, "atol": 8e-3}
    torch.testing.assert_close(got, ref(x), **tol)
    assert got.dtype == dtype


@pytest.mark.parametrize("rope", [{"rope_type": "default", "rope_theta": 10000.0},
                                  {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.25},
                                  {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                                   "high_freq_factor": 4.0, "original_max_position_embeddings": 64}])
def test_rotary_equals_the_remote_codes(rope):
    cfg = RelaxedRecursiveConfig(hidden_size=64, num_attention_heads=4, head_dim=16, rope_parameters=rope,
                                 max_position_embeddings=256)
    ref = remote.RotaryEmbedding(cfg)
    inv_freq, scaling = numerics.rope_inv_freq(cfg)
    assert torch.equal(inv_freq, ref.inv_freq) and scaling == ref.attention_scaling
    x = torch.randn(2, 4, 7, 16)  # (b, heads, s, hd)
    cos, sin = ref(x, torch.arange(7)[None].expand(2, 7))
    expected = remote.apply_rotary(x, cos, sin)
    assert torch.equal(numerics.rotate(x, cos.unsqueeze(1), sin.unsqueeze(1)), expected)
    if inv_freq.numel() * 2 < 16:  # partial rotary leaves the other dims alone
        assert torch.equal(expected[..., inv_freq.numel() * 2:], x[..., inv_freq.numel() * 2:])
