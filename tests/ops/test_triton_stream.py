"""The Triton ring kernels against the oracle.

Without CUDA they run under TRITON_INTERPRET=1 on small shapes (CI catches a kernel
regression that way); with CUDA the grid is larger. Inputs are fresh random every run;
the seed is in each assertion message.
"""

from __future__ import annotations

import importlib
import os
import random

import pytest
import torch

from tests.stream_harness import Case, Step, run_case

ON_GPU = torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"


@pytest.fixture(scope="module")
def kernels():
    """The kernel module, in interpreter mode when there is no GPU."""
    if not ON_GPU:
        os.environ["TRITON_INTERPRET"] = "1"
    mod = importlib.import_module("rlkv_vllm.ops.triton_stream")
    if not mod.HAVE_TRITON:
        pytest.skip("Triton is not installed")
    if not ON_GPU:
        from triton.language import standard
        from triton.runtime.interpreter import InterpretedFunction

        assert isinstance(standard.zeros, InterpretedFunction), (
            "triton.language was imported before TRITON_INTERPRET=1 was set; tests/conftest.py "
            "must import it first (run through pytest, without importing vLLM beforehand)")
    return importlib.reload(mod)  # @triton.jit reads TRITON_INTERPRET when it decorates


def fresh_seed() -> int:
    return random.SystemRandom().randrange(1 << 30)


def embed_stream_heads(kernels, extra_full: int, rng: random.Random, sink: int, recent: int):
    """A StreamFn that runs the kernels with the case's heads embedded among `extra_full`
    full heads (at random KV positions), and checks it leaves the full heads untouched."""

    def fn(q, k, v, ring_k, ring_v, step: Step, scale, out):
        t, h, g, d = q.shape
        total = h + extra_full
        stream_pos = sorted(rng.sample(range(total), h))
        big_q = torch.randn(t, total, g, d, dtype=q.dtype, device=q.device)
        big_k = torch.randn(t, total, d, dtype=k.dtype, device=k.device)
        big_v = torch.randn_like(big_k)
        idx = torch.tensor(stream_pos, device=q.device)
        big_q[:, idx], big_k[:, idx], big_v[:, idx] = q, k, v
        big_out = torch.full_like(big_q, float("nan"))
        ring_src = idx.to(torch.int32)
        common = (step.query_start_loc, step.seq_lens, step.slot_ids)
        kernels.ring_attention(
            big_q.view(t, total * g, d), big_k, big_v, big_out.view(t, total * g, d),
            ring_k, ring_v, ring_src, *common, sink=sink, recent=recent, scale=scale,
        )
        kernels.fused_kv_write(big_k, big_v, None, None, None, None, ring_k, ring_v, ring_src,
                               *common, sink=sink, recent=recent)
        full_pos = [i for i in range(total) if i not in stream_pos]
        assert torch.isnan(big_out[:, full_pos]).all(), "kernel wrote a head it does not own"
        out.copy_(big_out[:, idx])

    return fn


if ON_GPU:
    WINDOWS = [(1, 1), (4, 8), (16, 64), (3, 5)]
    GQA = [(1, 1), (2, 3), (1, 7), (3, 2), (2, 8), (4, 4)]
    DIMS = [64, 128]
    REQS, MAX_LEN = 6, 300
else:  # interpreter: small, still wraps the ring many times and covers odd groups
    WINDOWS = [(4, 8), (3, 5)]
    GQA = [(1, 7), (2, 3)]
    DIMS = [32]
    REQS, MAX_LEN = 4, 60


@pytest.mark.parametrize("sink,recent", WINDOWS)
@pytest.mark.parametrize("kv_heads,group", GQA)
@pytest.mark.parametrize("head_dim", DIMS)
def test_ring_kernels_match_oracle_fp32(kernels, sink, recent, kv_heads, group, head_dim):
    seed = fresh_seed()
    case = Case(num_reqs=REQS, max_len=MAX_LEN, kv_heads=kv_heads, group=group, head_dim=head_dim,
                sink=sink, recent=recent, seed=seed, pad=True, max_chunk=24 if not ON_GPU else 40)
    fn = embed_stream_heads(kernels, random.Random(seed).randint(0, 2), random.Random(seed), sink, recent)
    err, n = run_case(case, fn, DEVICE)
    assert n > 0
    assert err < 1e-5, f"seed {seed}: rel err {err}"


@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 2e-2), (torch.float16, 5e-3)])
def test_ring_kernels_match_oracle_half(kernels, dtype, tol):
    seed = fresh_seed()
    sink, recent = (16, 64) if ON_GPU else (4, 8)
    case = Case(num_reqs=REQS, max_len=MAX_LEN * 2 if ON_GPU else MAX_LEN, kv_heads=2, group=4,
                head_dim=128 if ON_GPU else 32, sink=sink, recent=recent, dtype=dtype, seed=seed, pad=True)
    err, _ = run_case(case, embed_stream_heads(kernels, 1, random.Random(seed), sink, recent), DEVICE)
    assert err < tol, f"seed {seed}: rel err {err}"


@pytest.mark.parametrize("gqa", [(2, 4), (3, 1)])
def test_gated_mix(kernels, gqa):
    """alpha mixes the full result already in ``out`` with the streaming result."""
    from rlkv_vllm.reference import oracle_attention

    seed = fresh_seed()
    gen = torch.Generator().manual_seed(seed)
    h, g = gqa
    d, sink, recent, n = 32, 2, 5, 23
    q = torch.randn(n, h * g, d, generator=gen)
    k = torch.randn(n, h, d, generator=gen)
    v = torch.randn(n, h, d, generator=gen)
    alpha = torch.rand(h, generator=gen)
    scale = d**-0.5
    full = oracle_attention(q, k, v, scale=scale).float()
    c = sink + recent
    ring = torch.full((2 * c, h, d), float("nan"), device=DEVICE)
    ring_v = torch.full_like(ring, float("nan"))
    out = full.clone().to(DEVICE)
    dev = lambda x: x.to(DEVICE)  # noqa: E731
    kernels.ring_attention(
        dev(q), dev(k), dev(v), out, ring, ring_v, dev(torch.arange(h, dtype=torch.int32)),
        dev(torch.tensor([0, n], dtype=torch.int32)), dev(torch.tensor([n], dtype=torch.int32)),
        dev(torch.tensor([0], dtype=torch.int32)), sink, recent, scale, alpha=dev(alpha),
    )
    ref = oracle_attention(q, k, v, scale=scale, alpha=alpha, sink=sink, recent=recent).float()
    err = (out.cpu().double() - ref.double()).norm() / ref.double().norm()
    assert err < 1e-5, f"seed {seed}: rel err {err}"


@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize("num_paged,num_full", [(3, 3), (4, 2), (2, 0)])
def test_fused_write_paged_and_ring(kernels, block_size, num_paged, num_full):
    """Full heads land at their slot_mapping rows of a strided paged cache (padding heads
    zeroed, -1 slots skipped); streaming heads land in their ring rows; nothing else moves."""
    seed = fresh_seed()
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    d, sink, recent = 32, 2, 3
    c = sink + recent
    num_stream = 2
    h = num_full + num_stream
    heads = rng.sample(range(h), h)
    full_heads, stream_heads = heads[:num_full], heads[num_full:]
    num_blocks = 6
    # vLLM's Triton layout: logical [blocks, heads, block_size, 2 * D], heads-last physical order
    kv = torch.full((num_blocks, block_size, num_paged, 2 * d), float("nan")).transpose(1, 2)
    key_cache, value_cache = kv.transpose(1, 2).split(d, dim=-1)
    # two requests: a 7-token prefill chunk at positions 0..6 and a decode at position 9
    qsl = torch.tensor([0, 7, 8, 8], dtype=torch.int32)  # plus one padding row
    seq_lens = torch.tensor([7, 10, 0], dtype=torch.int32)
    slot_ids = torch.tensor([1, 0, 2], dtype=torch.int32)
    t = 10  # two padding tokens
    k = torch.randn(t, h, d, generator=gen)
    v = torch.randn(t, h, d, generator=gen)
    perm = rng.sample(range(num_blocks * block_size), t)
    slot_mapping = torch.tensor(perm, dtype=torch.int64)
    slot_mapping[8:] = -1
    paged_src = torch.tensor(full_heads + [-1] * (num_paged - num_full), dtype=torch.int32)
    ring_k = torch.full((4 * c, num_stream, d), float("nan"))
    ring_v = torch.full_like(ring_k, float("nan"))
    ring_src = torch.tensor(stream_heads, dtype=torch.int32)
    dev = lambda x: x.to(DEVICE)  # noqa: E731
    kv_d = dev(kv)
    key_cache, value_cache = kv_d.transpose(1, 2).split(d, dim=-1)
    ring_k_d, ring_v_d = dev(ring_k), dev(ring_v)
    kernels.fused_kv_write(
        dev(k), dev(v), key_cache, value_cache, dev(slot_mapping), dev(paged_src),
        ring_k_d, ring_v_d, dev(ring_src), dev(qsl), dev(seq_lens), dev(slot_ids), sink, recent,
    )
    key_cache, value_cache = kv_d.cpu().transpose(1, 2).split(d, dim=-1)
    written = torch.zeros(num_blocks, block_size, dtype=torch.bool)
    for tok in range(8):
        s = int(slot_mapping[tok])
        b, o = divmod(s, block_size)
        written[b, o] = True
        for j in range(num_paged):
            want_k = k[tok, full_heads[j]] if j < num_full else torch.zeros(d)
            want_v = v[tok, full_heads[j]] if j < num_full else torch.zeros(d)
            assert torch.equal(key_cache[b, o, j], want_k), f"seed {seed}: token {tok} head {j}"
            assert torch.equal(value_cache[b, o, j], want_v), f"seed {seed}: token {tok} head {j}"
    if num_paged:
        assert torch.isnan(key_cache[~written]).all() and torch.isnan(value_cache[~written]).all()
    # ring: request 0 (slot 1) keeps positions 0,1 (sinks) and 4,5,6 (last 3); the
    # decode (slot 0, position 9) writes its one key; padding writes nothing
    expect = {1 * c + 0: 0, 1 * c + 1: 1, 1 * c + 2 + (4 - 2) % 3: 4, 1 * c + 2 + (5 - 2) % 3: 5,
              1 * c + 2 + (6 - 2) % 3: 6, 0 * c + 2 + (9 - 2) % 3: 7}
    rk, rv = ring_k_d.cpu(), ring_v_d.cpu()
    for row in range(rk.shape[0]):
        if row in expect:
            tok = expect[row]
            assert torch.equal(rk[row], k[tok, stream_heads]), f"seed {seed}: ring row {row}"
            assert torch.equal(rv[row], v[tok, stream_heads]), f"seed {seed}: ring row {row}"
        else:
            assert torch.isnan(rk[row]).all() and torch.isnan(rv[row]).all(), f"ring row {row} written"
