"""The fused (FlexAttention) gated attention against ``batched.gated_attention``.

CPU: flex_attention runs eagerly (torch's reference implementation), fp32 and fp64, ragged left and
right padding, GQA groups 1, 2 and 7, alpha 0, 1 and random, full-head masks, window edges, the
gradients (q, k, v, alpha) and a finite-difference check of d out / d alpha; the BlockMasks built from
the padding alone against torch's ``create_block_mask``; a tiny random Llama through ``hf_reference``
with the fused attention gives the batched one's logits and alpha gradients.

torch refuses flex_attention's backward on the CPU (its check, not its math: the eager backward is
the reference the compiled kernels are tested against); the gradient tests lift that check
(``cpu_flex_backward``).

CUDA (skipped without it): the compiled kernels equal the batched attention in fp32 (outputs and
gradients), bf16 tracks the fp64 oracle within a small factor of stock SDPA's own bf16 error, and a
[1, 32 heads, 8192 tokens] forward + backward peaks far below the [B, H, T, T] probabilities' size.
"""

from __future__ import annotations

import pytest
import torch

from rlkv_vllm.core import fused
from rlkv_vllm.core.batched import gated_attention
from rlkv_vllm.core.fused import PaddingMasks, fused_gated_attention
from tests.core.test_batched import _batch  # random padded rows, garbage in the padding

SINK, RECENT = 3, 5
CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs CUDA: flex_attention's compiled kernels run on the GPU")


@pytest.fixture
def cpu_flex_backward(monkeypatch):
    """Let torch's eager flex_attention run its backward on the CPU (torch refuses it up front)."""
    import torch.nn.attention.flex_attention as fa

    monkeypatch.setattr(fa, "_validate_device", lambda *args: None)


GATES = {
    "alpha0": lambda hk, gen: dict(alpha=torch.zeros(hk)),
    "alpha1": lambda hk, gen: dict(alpha=torch.ones(hk)),
    "alpha_random": lambda hk, gen: dict(alpha=torch.rand(hk, generator=gen)),
    "full_mask": lambda hk, gen: dict(full_heads=torch.arange(hk) % 2 == 0),
    "stream_mask": lambda hk, gen: dict(full_heads=torch.zeros(hk, dtype=torch.bool)),
    "all_full": lambda hk, gen: dict(),
}
LENGTHS = {"left": [1, 4, 9, 17, 23], "right": [1, 4, 9, 17, 23], "none": [23, 23]}


def _max_err(a, b):
    return float((a.double() - b.double()).abs().max())


@pytest.mark.parametrize("group", [1, 2, 7])
@pytest.mark.parametrize("pad_side", ["left", "right", "none"])
def test_equals_batched_fp32(group, pad_side):
    """Every gate kind, both full-branch kernels (SDPA where the padding allows it, flex), one
    PaddingMasks shared by all of them as the layers of a forward share it."""
    hk, d = 2, 8
    lengths = LENGTHS[pad_side]
    tk = max(lengths)
    q, k, v, mask = _batch(lengths, tk, hk, group, d, torch.float32, seed=group * 11 + len(pad_side),
                           pad_side=pad_side)
    masks = PaddingMasks.of(mask, len(lengths), tk, q.device)
    gen = torch.Generator().manual_seed(group)
    for gate, make in GATES.items():
        kw = make(hk, gen)
        want = gated_attention(q, k, v, scale=0.3, sink=SINK, recent=RECENT, attention_mask=mask, **kw)
        # left padding: "auto" is flex already
        for branch in ("auto",) if pad_side == "left" else ("auto", "flex"):
            got = fused_gated_attention(q, k, v, scale=0.3, sink=SINK, recent=RECENT, attention_mask=masks,
                                        full_branch=branch, **kw)
            assert got.dtype == torch.float32 and got.shape == q.shape
            assert torch.isfinite(got).all()
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, msg=f"{gate} {branch}")


@pytest.mark.parametrize("tq", [1, 3])
def test_tail_queries_equal_batched(tq):
    """Tq < Tk (decode with a cache): queries are the last Tq key slots, left and right padding."""
    hk, g, d = 2, 2, 8
    for side in ("left", "right"):
        q, k, v, mask = _batch([2, 6, 13, 20], tq, hk, g, d, torch.float32, seed=tq, pad_side=side)
        alpha = torch.tensor([0.3, 0.8])
        want = gated_attention(q, k, v, scale=0.3, sink=SINK, recent=RECENT, alpha=alpha, attention_mask=mask)
        got = fused_gated_attention(q, k, v, scale=0.3, sink=SINK, recent=RECENT, alpha=alpha, attention_mask=mask)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("sink, recent", [(0, 1), (0, 100), (100, 1), (1, 2), (40, 40)])
def test_window_edges(sink, recent):
    """sink 0, recent 1 (a query sees itself only), a window wider than every row (streaming = full)."""
    q, k, v, mask = _batch([3, 11, 19], 19, 1, 3, 8, torch.float64, seed=sink + recent, pad_side="left")
    alpha = torch.tensor([0.25], dtype=torch.float64)
    for kw in (dict(alpha=alpha), dict(full_heads=torch.tensor([False]))):
        want = gated_attention(q, k, v, scale=0.3, sink=sink, recent=recent, attention_mask=mask, **kw)
        got = fused_gated_attention(q, k, v, scale=0.3, sink=sink, recent=recent, attention_mask=mask, **kw)
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_seq_lens_and_no_mask():
    q, k, v, mask = _batch([5, 12, 8], 12, 2, 2, 16, torch.float64, seed=3, pad_side="right")
    alpha = torch.tensor([0.3, 0.9])
    a = fused_gated_attention(q, k, v, scale=0.25, sink=2, recent=4, alpha=alpha, attention_mask=mask)
    b = fused_gated_attention(q, k, v, scale=0.25, sink=2, recent=4, alpha=alpha, seq_lens=mask.sum(1))
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    q, k, v, _ = _batch([12, 12], 12, 2, 2, 16, torch.float64, seed=4, pad_side="right")
    want = gated_attention(q, k, v, scale=0.25, sink=2, recent=4, alpha=alpha)
    torch.testing.assert_close(fused_gated_attention(q, k, v, scale=0.25, sink=2, recent=4, alpha=alpha), want,
                               rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("pad_side", ["left", "right"])
def test_gradients_equal_batched(pad_side, cpu_flex_backward):
    """fp64: the gradients to q, k, v and alpha equal the batched attention's (right padding takes
    the SDPA full branch, left padding flex)."""
    q, k, v, mask = _batch([6, 19, 13], 19, 3, 2, 8, torch.float64, seed=6, pad_side=pad_side)
    weights = torch.randn(q.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(9))
    alpha0 = torch.tensor([0.2, 0.6, 1.0], dtype=torch.float64)

    def grads(fn):
        leaves = [x.clone().requires_grad_(True) for x in (q, k, v, alpha0)]
        out = fn(*leaves[:3], scale=0.3, sink=SINK, recent=RECENT, alpha=leaves[3], attention_mask=mask)
        (out * weights).sum().backward()
        return [x.grad for x in leaves]

    want = grads(gated_attention)
    got = grads(fused_gated_attention)
    assert want[3].abs().max() > 1e-3
    for name, a, b in zip("qkv", got, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=name)
    torch.testing.assert_close(got[3], want[3], rtol=1e-10, atol=1e-12)


def test_alpha_gradient_matches_finite_differences():
    """d out / d alpha on a tiny fp64 case (q, k, v constant: no flex backward needed)."""
    q, k, v, mask = _batch([4, 9], 9, 2, 2, 8, torch.float64, seed=12, pad_side="left")
    weights = torch.randn(q.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(13))
    masks = PaddingMasks.of(mask, 2, 9, q.device)

    def f(alpha):
        out = fused_gated_attention(q, k, v, scale=0.3, sink=2, recent=3, alpha=alpha, attention_mask=masks)
        return (out * weights).sum()

    alpha = torch.tensor([0.3, 0.7], dtype=torch.float64, requires_grad=True)
    f(alpha).backward()
    eps = 1e-6
    with torch.no_grad():
        fd = torch.stack([(f(alpha + eps * e) - f(alpha - eps * e)) / (2 * eps) for e in torch.eye(2).double()])
    assert alpha.grad.abs().max() > 1e-3
    torch.testing.assert_close(alpha.grad, fd, rtol=1e-7, atol=1e-9)


def test_mix_gradcheck():
    f = torch.randn(2, 3, 4, 5, dtype=torch.float64, requires_grad=True)
    s = torch.randn(2, 3, 4, 5, dtype=torch.float64, requires_grad=True)
    m = torch.rand(3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(fused._Mix.apply, (f, s, m))


@pytest.mark.parametrize("pad_side, lengths, tq", [("left", [1, 130, 300, 257], None), ("right", [129, 300, 5], None),
                                                   ("left", [200, 300], 7), ("right", [128, 256], None)])
def test_block_masks_equal_create_block_mask(pad_side, lengths, tq):
    """The BlockMasks built from the padding in query chunks list the same partial and full blocks as
    torch's create_block_mask of the same mask_mod (the eager CPU kernel reads only the mask_mod;
    the compiled kernels read the blocks)."""
    from torch.nn.attention.flex_attention import create_block_mask

    b, tk = len(lengths), max(lengths)
    tq = tq or tk
    *_, mask = _batch(lengths, 1, 1, 1, 1, torch.float32, seed=0, pad_side=pad_side)
    masks = PaddingMasks.of(mask, b, tk, torch.device("cpu"))
    for window in (None, (4, 70), (0, 1), (300, 300)):
        ours = masks.block_mask(tq, window)
        assert masks.block_mask(tq, window) is ours  # built once
        ref = create_block_mask(ours.mask_mod, b, None, tq, tk, device="cpu")
        assert torch.equal(ours.to_dense(), ref.to_dense()), window
        assert torch.equal(ours.kv_num_blocks, ref.kv_num_blocks), window
        assert torch.equal(ours.full_kv_num_blocks, ref.full_kv_num_blocks), window


def test_padding_masks_flags():
    m = torch.tensor([[1, 1, 0], [1, 1, 1]])
    p = PaddingMasks.of(m, 2, 3, torch.device("cpu"))
    assert p.padded and p.right_padded
    p = PaddingMasks.of(torch.tensor([[0, 1, 1], [1, 1, 1]]), 2, 3, torch.device("cpu"))
    assert p.padded and not p.right_padded
    p = PaddingMasks.of(None, 2, 3, torch.device("cpu"))
    assert not p.padded and p.right_padded
    with pytest.raises(ValueError, match="needs Tq == Tk and right padding"):
        q, k, v, mask = _batch([2, 3], 3, 1, 1, 8, torch.float32, seed=0, pad_side="left")
        fused_gated_attention(q, k, v, scale=0.3, sink=1, recent=1, attention_mask=mask, full_branch="sdpa")


# ------------------------------------------------------------------ transformers


def _tiny_llama(dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = LlamaForCausalLM(cfg).to(dtype).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def _padded(rows, side):
    tk = max(map(len, rows))
    ids = torch.full((len(rows), tk), 3, dtype=torch.long)
    mask = torch.zeros(len(rows), tk, dtype=torch.long)
    for i, r in enumerate(rows):
        sl = slice(tk - len(r), tk) if side == "left" else slice(0, len(r))
        ids[i, sl] = torch.tensor(r)
        mask[i, sl] = 1
    return ids, mask, (mask.cumsum(-1) - 1).clamp(min=0)


@pytest.mark.parametrize("side", ["left", "right"])
def test_hf_fused_equals_batched(side, cpu_flex_backward, monkeypatch):
    """A tiny random Llama in fp64, padded batch: the fused attention's logits and alpha gradients
    are the batched attention's; each forward builds each BlockMask once, for every layer."""
    from rlkv_vllm.core.hf_reference import install_oracle

    model = _tiny_llama(torch.float64)
    rows = [[11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22], [30, 31, 32], [40, 41, 42, 43, 44, 45, 46]]
    ids, mask, pos = _padded(rows, side)
    results = {}
    builds = []
    real_build = PaddingMasks._build
    monkeypatch.setattr(PaddingMasks, "_build", lambda self, *a: builds.append(a) or real_build(self, *a))
    for attention in ("batched", "fused"):
        alpha = torch.nn.Parameter(torch.rand(2, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64))
        install_oracle(model, alpha=alpha, sink=2, recent=3, attention=attention)
        logits = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits
        real = mask.bool()
        logits[real].logsumexp(-1).sum().backward()
        results[attention] = (logits.detach()[real], alpha.grad.clone())
    (lb, gb), (lf, gf) = results["batched"], results["fused"]
    torch.testing.assert_close(lf, lb, rtol=1e-10, atol=1e-10)
    assert gb.abs().max() > 1e-4
    torch.testing.assert_close(gf, gb, rtol=1e-8, atol=1e-10)
    # one forward of 2 layers: the streaming mask (and the full one under left padding) built once
    assert len(builds) == (1 if side == "right" else 2), builds


def test_install_oracle_refuses_unknown_attention():
    from rlkv_vllm.core.hf_reference import install_oracle

    with pytest.raises(ValueError, match="batched, fused"):
        install_oracle(_tiny_llama(torch.float32), attention="flash")


# ------------------------------------------------------------------ CUDA


@needs_cuda
@pytest.mark.parametrize("group", [1, 4, 7])
@pytest.mark.parametrize("pad_side", ["left", "right"])
def test_cuda_equals_batched_fp32(group, pad_side):
    """The compiled kernels (blocks crossing the 128-token tiles) in fp32: outputs and gradients."""
    hk, d = 2, 64
    q, k, v, mask = _batch([1, 100, 130, 300], 300, hk, group, d, torch.float32, seed=group, pad_side=pad_side,
                           device="cuda")
    k[mask == 0] = 0.0
    v[mask == 0] = 0.0
    weights = torch.randn(q.shape, generator=torch.Generator().manual_seed(2)).cuda()
    alpha0 = torch.rand(hk, generator=torch.Generator().manual_seed(3)).cuda()

    def run(fn):
        leaves = [x.clone().requires_grad_(True) for x in (q, k, v, alpha0)]
        out = fn(*leaves[:3], scale=d**-0.5, sink=4, recent=64, alpha=leaves[3], attention_mask=mask)
        (out * weights).sum().backward()
        return [out.detach()] + [x.grad for x in leaves]

    want = run(gated_attention)
    got = run(fused_gated_attention)
    for name, a, b in zip(["out", "q", "k", "v", "alpha"], got, want):
        # the kernels' fp32 matmuls may round differently from the einsum reference (TF32 is off by default)
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4, msg=name)


@needs_cuda
@pytest.mark.parametrize("group", [1, 4, 7])
def test_cuda_bf16_tracks_the_oracle(group):
    """bf16: our error against the fp64 batched attention is at most a small factor times stock SDPA's
    own bf16 error on the same inputs (causal, every head full)."""
    hk, d, t = 2, 128, 700
    q, k, v, mask = _batch([t, t - 1, 400], t, hk, group, d, torch.float64, seed=group, pad_side="right",
                           device="cuda")
    k[mask == 0] = 0.0
    v[mask == 0] = 0.0
    alpha = torch.rand(hk, generator=torch.Generator().manual_seed(group)).cuda()
    scale = d**-0.5
    kw = dict(scale=scale, sink=4, recent=64, attention_mask=mask)
    truth_full = gated_attention(q, k, v, **kw)
    truth = gated_attention(q, k, v, alpha=alpha, **kw)
    qb, kb, vb = (x.to(torch.bfloat16) for x in (q, k, v))
    rep = lambda x: x.repeat_interleave(group, dim=2).transpose(1, 2)  # noqa: E731 - [B, Hq, T, D]
    stock = torch.nn.functional.scaled_dot_product_attention(qb.transpose(1, 2), rep(kb), rep(vb), is_causal=True,
                                                             scale=scale).transpose(1, 2)
    real = mask.bool()
    err_stock = _max_err(stock[real], truth_full[real])
    for branch in ("auto", "flex"):
        ours = fused_gated_attention(qb, kb, vb, alpha=alpha, full_branch=branch, **kw)
        assert ours.dtype == torch.bfloat16
        err_ours = _max_err(ours, truth)
        print(f"group {group} {branch}: bf16 error {err_ours:.3g}, stock SDPA's {err_stock:.3g}")
        assert err_ours <= 2.0 * err_stock + 1e-3, (branch, err_ours, err_stock)


@needs_cuda
def test_cuda_memory_is_linear():
    """[1, 32 query heads (8 KV), 8192 tokens, D 128] bf16, forward and backward to q, k, v and alpha:
    the peak above the inputs stays far below the [B, Hq, T, T] float32 probabilities (8 GiB)."""
    b, hq, hk, t, d = 1, 32, 8, 8192, 128
    gen = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(b, t, h, d, device="cuda", dtype=torch.bfloat16, generator=gen).requires_grad_(True)
               for h in (hq, hk, hk))
    alpha = torch.rand(hk, device="cuda", generator=gen).requires_grad_(True)
    mask = torch.ones(b, t, dtype=torch.long, device="cuda")
    mask[0, -100:] = 0  # right padding: the learner's layout

    def step():
        out = fused_gated_attention(q, k, v, scale=d**-0.5, sink=16, recent=64, alpha=alpha, attention_mask=mask)
        out.float().square().mean().backward()

    step()  # compile outside the measurement
    torch.cuda.synchronize()
    q.grad = k.grad = v.grad = alpha.grad = None
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    materialised = b * hq * t * t * 4
    print(f"peak above inputs {peak / 2**20:.0f} MiB; materialised probabilities {materialised / 2**20:.0f} MiB")
    assert peak < materialised / 4, (peak, materialised)
    assert torch.isfinite(alpha.grad).all() and alpha.grad.abs().sum() > 0
