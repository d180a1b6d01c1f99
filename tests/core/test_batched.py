"""The batched gated attention against the per-row oracle on ragged, padded batches."""

from __future__ import annotations

import pytest
import torch

from rlkv_vllm.core.batched import gated_attention, key_padding
from rlkv_vllm.core.reference import oracle_attention

SINK, RECENT = 3, 5


def _batch(lengths, tq, hk, g, d, dtype, seed, pad_side, device="cpu"):
    """Random rows of the given real lengths, padded to one Tk; padding slots hold garbage."""
    gen = torch.Generator().manual_seed(seed)
    b, tk = len(lengths), max(lengths)
    q = torch.randn(b, tq, hk * g, d, generator=gen, dtype=torch.float64).to(dtype)
    k = torch.randn(b, tk, hk, d, generator=gen, dtype=torch.float64).to(dtype)
    v = torch.randn(b, tk, hk, d, generator=gen, dtype=torch.float64).to(dtype)
    mask = torch.zeros(b, tk, dtype=torch.long)
    for i, n in enumerate(lengths):
        if pad_side == "left":
            mask[i, tk - n:] = 1
        else:
            mask[i, :n] = 1
    garbage = (mask == 0)
    k[garbage] = 1e4  # never read
    v[garbage] = float("nan")
    return tuple(x.to(device) for x in (q, k, v, mask))


def _oracle_rows(q, k, v, mask, scale, **kw):
    """The oracle on each unpadded row; rows of zeros where the query slot is padding."""
    b, tq = q.shape[:2]
    tk = k.shape[1]
    out = torch.zeros(q.shape, dtype=torch.float64)
    for i in range(b):
        real = mask[i].bool()
        kr, vr = k[i, real], v[i, real]
        q_slots = torch.arange(tk - tq, tk)
        q_real = real[q_slots]
        if not q_real.any():
            continue
        pos = real.long().cumsum(0) - 1
        q_start = int(pos[q_slots[q_real][0]])
        out[i, q_real] = oracle_attention(q[i, q_real], kr, vr, scale=scale, q_start=q_start,
                                          compute_dtype=torch.float64, **kw).double()
    return out


GATES = {
    "alpha0": lambda hk, gen: dict(alpha=torch.zeros(hk)),
    "alpha1": lambda hk, gen: dict(alpha=torch.ones(hk)),
    "alpha_random": lambda hk, gen: dict(alpha=torch.rand(hk, generator=gen)),
    "full_mask": lambda hk, gen: dict(full_heads=torch.arange(hk) % 2 == 0),
    "all_full": lambda hk, gen: dict(),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("group", [1, 2, 7])
@pytest.mark.parametrize("gate", sorted(GATES))
@pytest.mark.parametrize("pad_side", ["left", "right"])
@pytest.mark.parametrize("queries", ["prefill", "tail"])
def test_equals_per_row_oracle(dtype, group, gate, pad_side, queries):
    hk, d = 2, 8
    lengths = [1, 4, 9, 17, 23]
    tk = max(lengths)
    tq = tk if queries == "prefill" else 3
    q, k, v, mask = _batch(lengths, tq, hk, group, d, dtype, seed=group * 7 + len(gate), pad_side=pad_side)
    gen = torch.Generator().manual_seed(5)
    kw = GATES[gate](hk, gen)
    got = gated_attention(q, k, v, scale=0.3, sink=SINK, recent=RECENT, attention_mask=mask, **kw)
    assert got.dtype == dtype and got.shape == q.shape
    want = _oracle_rows(q, k, v, mask, 0.3, sink=SINK, recent=RECENT, **kw)
    tol = 1e-12 if dtype == torch.float64 else 2e-6
    torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol)


def test_seq_lens_equals_right_padding_mask():
    q, k, v, mask = _batch([5, 12, 8], 12, 2, 2, 16, torch.float32, seed=3, pad_side="right")
    alpha = torch.tensor([0.3, 0.9])
    a = gated_attention(q, k, v, scale=0.25, sink=2, recent=4, alpha=alpha, attention_mask=mask)
    b = gated_attention(q, k, v, scale=0.25, sink=2, recent=4, alpha=alpha, seq_lens=mask.sum(1))
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_query_blocks_do_not_change_the_result():
    q, k, v, mask = _batch([30, 41, 7], 41, 2, 2, 8, torch.float64, seed=4, pad_side="left")
    alpha = torch.tensor([0.5, 0.1])
    whole = gated_attention(q, k, v, scale=0.3, sink=SINK, recent=RECENT, alpha=alpha, attention_mask=mask)
    blocked = gated_attention(q, k, v, scale=0.3, sink=SINK, recent=RECENT, alpha=alpha, attention_mask=mask,
                              q_block=6)
    torch.testing.assert_close(whole, blocked, rtol=1e-13, atol=1e-13)


def test_alpha_gradient_equals_oracle():
    """The learner trains alpha through this function: its gradient must be the oracle's."""
    q, k, v, mask = _batch([6, 19, 13], 19, 3, 2, 8, torch.float64, seed=6, pad_side="left")
    weights = torch.randn(q.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(9))
    alpha = torch.tensor([0.2, 0.6, 1.0], dtype=torch.float64, requires_grad=True)
    got = gated_attention(q, k, v, scale=0.3, sink=SINK, recent=RECENT, alpha=alpha, attention_mask=mask)
    (got * weights).sum().backward()
    grad = alpha.grad.clone()
    alpha.grad = None
    want = _oracle_rows(q, k, v, mask, 0.3, sink=SINK, recent=RECENT, alpha=alpha)
    (want * weights).sum().backward()
    assert grad.abs().max() > 1e-3
    torch.testing.assert_close(grad, alpha.grad, rtol=1e-10, atol=1e-12)
    assert torch.isfinite(got).all()


def test_padding_never_leaks():
    """NaN in padding values and huge padding keys change nothing (tested above) and padding
    queries give zeros."""
    q, k, v, mask = _batch([2, 9], 9, 1, 2, 8, torch.float32, seed=8, pad_side="right")
    out = gated_attention(q, k, v, scale=0.3, sink=SINK, recent=RECENT, alpha=torch.tensor([0.5]),
                          attention_mask=mask)
    assert torch.isfinite(out).all()
    assert (out[0, 2:] == 0).all()


def test_bad_shapes_name_the_argument():
    q = torch.zeros(2, 4, 4, 8)
    k = torch.zeros(2, 4, 2, 8)
    with pytest.raises(ValueError, match="attention_mask"):
        gated_attention(q, k, k, scale=1.0, sink=1, recent=1, attention_mask=torch.ones(2, 3))
    with pytest.raises(ValueError, match="not a multiple"):
        gated_attention(torch.zeros(2, 4, 3, 8), k, k, scale=1.0, sink=1, recent=1)
    with pytest.raises(ValueError, match="not both"):
        key_padding(2, 4, torch.device("cpu"), torch.ones(2, 4), torch.ones(2))
