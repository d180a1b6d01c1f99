"""The oracle against a naive per-query loop, and its own identities."""

import pytest
import torch

from rlkv_vllm.core.reference import lambda_mask, oracle_attention


def naive(q, k, v, scale, sink, recent, streaming):
    tq, hq, d = q.shape
    tk, hk, _ = k.shape
    g = hq // hk
    out = torch.zeros(tq, hq, d, dtype=torch.float64)
    for i in range(tq):
        p = tk - tq + i
        for h in range(hq):
            keys = [j for j in range(p + 1) if not streaming or j < sink or j > p - recent]
            s = torch.stack([(q[i, h].double() @ k[j, h // g].double()) * scale for j in keys])
            w = torch.softmax(s, 0)
            out[i, h] = sum(w[n] * v[j, h // g].double() for n, j in enumerate(keys))
    return out


@pytest.mark.parametrize("streaming", [False, True])
def test_oracle_vs_naive(streaming):
    g = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(7, 4, 8, generator=g), torch.randn(20, 2, 8, generator=g), torch.randn(20, 2, 8, generator=g)
    full = torch.tensor([not streaming] * 2)
    got = oracle_attention(q, k, v, scale=0.3, full_heads=full, sink=3, recent=4)
    torch.testing.assert_close(got.double(), naive(q, k, v, 0.3, 3, 4, streaming), rtol=1e-6, atol=1e-6)


def test_gated_identities():
    g = torch.Generator().manual_seed(1)
    q, k, v = torch.randn(9, 6, 16, generator=g), torch.randn(30, 3, 16, generator=g), torch.randn(30, 3, 16, generator=g)
    full = oracle_attention(q, k, v, scale=0.25)
    stream = oracle_attention(q, k, v, scale=0.25, full_heads=torch.zeros(3, dtype=torch.bool), sink=2, recent=5)
    a1 = oracle_attention(q, k, v, scale=0.25, alpha=torch.ones(3), sink=2, recent=5)
    a0 = oracle_attention(q, k, v, scale=0.25, alpha=torch.zeros(3), sink=2, recent=5)
    torch.testing.assert_close(a1, full)
    torch.testing.assert_close(a0, stream)
    assert (full - stream).abs().max() > 1e-3  # the window really cuts keys
    alpha = torch.tensor([0.2, 0.7, 1.0])
    mixed = oracle_attention(q, k, v, scale=0.25, alpha=alpha, sink=2, recent=5).view(9, 3, 2, 16)
    expect = alpha.view(1, 3, 1, 1) * full.view(9, 3, 2, 16) + (1 - alpha.view(1, 3, 1, 1)) * stream.view(9, 3, 2, 16)
    torch.testing.assert_close(mixed, expect)


def test_lambda_mask_shape():
    m = lambda_mask(torch.arange(10), torch.arange(10), 2, 3)
    assert m[9].nonzero().flatten().tolist() == [0, 1, 7, 8, 9]
    assert m[1].nonzero().flatten().tolist() == [0, 1]
    assert not m.triu(1).any()
