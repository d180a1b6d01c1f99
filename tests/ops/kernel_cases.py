"""Kernel checks shared by the Triton and CUDA kernel tests (oracle-backed, fresh random inputs)."""

from __future__ import annotations

import random
from typing import Any, Callable

import torch

from rlkv_vllm.ops.views import LayerPools, StepRows
from tests.stream_harness import Step

# decode_step(q, k, v, out, q_full, rows: StepRows, pools: LayerPools, scale)
DecodeFn = Callable[..., None]


def fp8_queries(q: torch.Tensor, num_kv_heads: int, per: str, rng: random.Random
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """vLLM's query quantisation for an FA3 fp8 layer: (q8 e4m3 [T, Hq, D], q_scale float32 [] (per
    "tensor") or [Hkv] (per "head"), the model-dtype queries a kernel must attend with:
    ``q8 * q_scale`` as float32)."""
    t, hq, d = q.shape
    if per == "head":
        scale = torch.tensor([rng.uniform(0.05, 0.5) for _ in range(num_kv_heads)], dtype=torch.float32)
        per_q = scale.repeat_interleave(hq // num_kv_heads).view(1, hq, 1)
    else:
        scale = torch.tensor(rng.uniform(0.05, 0.5), dtype=torch.float32)
        per_q = scale
    q8 = (q.float() / per_q).clamp(-448, 448).to(torch.float8_e4m3fn)
    return q8, scale, q8.float() * per_q


def embed_stream_heads(kernels: Any, extra_full: int, rng: random.Random, sink: int, recent: int,
                       decode_fn: DecodeFn | None = None):
    """A StreamFn that runs the Triton kernels with the case's heads embedded among
    `extra_full` full heads (at random KV positions), and checks it leaves the full heads
    untouched. With ``decode_fn``, steps with one token per row go through it instead."""

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
        rows = StepRows(step.query_start_loc, step.seq_lens, step.slot_ids, max_query_len=step.max_query_len)
        pools = LayerPools(sink=sink, recent=recent, ring_k=ring_k, ring_v=ring_v, ring_src=idx.to(torch.int32),
                           k_scale=step.k_scale, v_scale=step.v_scale)
        if decode_fn is not None and step.max_query_len == 1:
            decode_fn(big_q.view(t, total * g, d), big_k, big_v, big_out.view(t, total * g, d), None, rows, pools,
                      scale)
        else:
            kernels.ring_attention(big_q.view(t, total * g, d), big_k, big_v, big_out.view(t, total * g, d), rows,
                                   pools, scale)
            kernels.fused_kv_write(big_k, big_v, rows, pools)
        full_pos = [i for i in range(total) if i not in stream_pos]
        assert torch.isnan(big_out[:, full_pos]).all(), "kernel wrote a head it does not own"
        out.copy_(big_out[:, idx])

    return fn



def check_writes_and_gather(kernels: Any, decode_fn: DecodeFn | None, block_size: int, num_paged: int,
                            num_full: int, seed: int, device: str, kv_dtype: torch.dtype | None = None,
                            query_scale: str | None = None) -> None:
    """Full heads land at their slot_mapping rows of a strided paged cache (padding heads
    zeroed, -1 slots skipped) and their query heads in q_full (zeros for padding heads);
    streaming heads land in their ring rows; nothing else moves.

    kv_dtype fp8: the paged cache and the ring are fp8 and every stored key/value must be
    bit for bit ``quantize_kv(x, scale)`` with random per-layer scales.
    query_scale ("tensor" / "head", decode only): the queries come as vLLM's fp8 ones with their
    q_scale; q_full is fp8 and must hold the paged heads' fp8 queries byte for byte."""
    from rlkv_vllm.ops.torch_stream import quantize_kv

    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    d, sink, recent, group = 32, 2, 3, 3
    c = sink + recent
    num_stream = 2
    h = num_full + num_stream
    heads = rng.sample(range(h), h)
    full_heads, stream_heads = heads[:num_full], heads[num_full:]
    num_blocks = 6
    # vLLM's Triton layout: logical [blocks, heads, block_size, 2 * D], heads-last physical order
    fp8 = kv_dtype is not None
    kv = torch.full((num_blocks, block_size, num_paged, 2 * d), float("nan"),
                    dtype=kv_dtype or torch.float32).transpose(1, 2)
    if decode_fn is None:
        # two requests: a 7-token prefill chunk at positions 0..6 and a decode at position 9
        qsl = torch.tensor([0, 7, 8, 8], dtype=torch.int32)  # plus one padding row
        seq_lens = torch.tensor([7, 10, 0], dtype=torch.int32)
        slot_ids = torch.tensor([1, 0, 2], dtype=torch.int32)
        real, t = 8, 10  # two padding tokens
        # ring: request 0 (slot 1) keeps positions 0,1 (sinks) and 4,5,6 (last 3); the
        # decode (slot 0, position 9) writes its one key; padding writes nothing
        expect = {1 * c + 0: 0, 1 * c + 1: 1, 1 * c + 2 + (4 - 2) % 3: 4, 1 * c + 2 + (5 - 2) % 3: 5,
                  1 * c + 2 + (6 - 2) % 3: 6, 0 * c + 2 + (9 - 2) % 3: 7}
    else:
        # three decodes (positions 9, 0 and 20) and one padding row
        qsl = torch.tensor([0, 1, 2, 3, 3], dtype=torch.int32)
        seq_lens = torch.tensor([10, 1, 21, 0], dtype=torch.int32)
        slot_ids = torch.tensor([1, 0, 2, 3], dtype=torch.int32)
        real, t = 3, 5
        expect = {1 * c + 2 + (9 - 2) % 3: 0, 0 * c + 0: 1, 2 * c + 2 + (20 - 2) % 3: 2}
    k = torch.randn(t, h, d, generator=gen)
    v = torch.randn(t, h, d, generator=gen)
    q = torch.randn(t, h * group, d, generator=gen)
    q_in, q_kw = q, {}
    if query_scale:
        assert decode_fn is not None, "fp8 queries are a decode_step input"
        q_in, q_scale, q = fp8_queries(q, h, query_scale, rng)
        q_kw = dict(q_scale=q_scale.to(device))
    perm = rng.sample(range(num_blocks * block_size), t)
    slot_mapping = torch.tensor(perm, dtype=torch.int64)
    slot_mapping[real:] = -1
    paged_src = torch.tensor(full_heads + [-1] * (num_paged - num_full), dtype=torch.int32)
    # earlier steps' keys (decode rows read them): random, so any stray write shows
    ring_k = torch.randn(5 * c, num_stream, d, generator=gen).to(kv_dtype or torch.float32)
    ring_v = torch.randn(5 * c, num_stream, d, generator=gen).to(kv_dtype or torch.float32)
    k_scale = torch.tensor(rng.uniform(0.2, 2.0)) if fp8 else None
    v_scale = torch.tensor(rng.uniform(0.2, 2.0)) if fp8 else None

    def stored(x: torch.Tensor, s: torch.Tensor | None) -> torch.Tensor:
        """What the cache must hold for x, as bytes (bit-exact comparison, NaN included)."""
        y = quantize_kv(x, s, kv_dtype) if fp8 else x
        return y.contiguous().view(torch.uint8)

    def raw(x: torch.Tensor) -> torch.Tensor:
        return x.contiguous().view(torch.uint8)
    ring_src = torch.tensor(stream_heads, dtype=torch.int32)
    dev = lambda x: x.to(device)  # noqa: E731
    kv_d = dev(kv)
    key_cache, value_cache = kv_d.transpose(1, 2).split(d, dim=-1)
    ring_k_d, ring_v_d = dev(ring_k), dev(ring_v)
    q_full = torch.full((t, num_paged * group, d), float("nan"), device=device).to(q_in.dtype)
    out = torch.full((t, h * group, d), float("nan"), device=device)
    rows = StepRows(dev(qsl), dev(seq_lens), dev(slot_ids), slot_mapping=dev(slot_mapping))
    pools = LayerPools(sink=sink, recent=recent, key_cache=key_cache, value_cache=value_cache,
                       paged_src=dev(paged_src), ring_k=ring_k_d, ring_v=ring_v_d, ring_src=dev(ring_src),
                       k_scale=dev(k_scale) if fp8 else None, v_scale=dev(v_scale) if fp8 else None)
    if decode_fn is None:
        kernels.fused_kv_write(dev(k), dev(v), rows, pools, q=dev(q), q_full=q_full)
    else:
        decode_fn(dev(q_in), dev(k), dev(v), out, q_full, rows, pools, d**-0.5, **q_kw)
        o = out.cpu().view(t, h, group, d)
        assert torch.isfinite(o[:real, stream_heads]).all(), f"seed {seed}: streaming output not written"
        assert (o[real:, stream_heads] == 0).all(), f"seed {seed}: padding tokens must get zeros"
        assert torch.isnan(o[:, full_heads]).all(), f"seed {seed}: decode_step wrote a full head's output"
    key_cache, value_cache = kv_d.cpu().transpose(1, 2).split(d, dim=-1)
    qf = q_full.cpu().view(t, num_paged, group, d)
    written = torch.zeros(num_blocks, block_size, dtype=torch.bool)
    for tok in range(real):
        s = int(slot_mapping[tok])
        b, o = divmod(s, block_size)
        written[b, o] = True
        for j in range(num_paged):
            full = j < num_full
            want_k = k[tok, full_heads[j]] if full else torch.zeros(d)
            want_v = v[tok, full_heads[j]] if full else torch.zeros(d)
            want_q = q_in.view(t, h, group, d)[tok, full_heads[j]] if full else torch.zeros(group, d).to(q_in.dtype)
            assert torch.equal(raw(key_cache[b, o, j]), stored(want_k, k_scale)), f"seed {seed}: token {tok} head {j}"
            assert torch.equal(raw(value_cache[b, o, j]), stored(want_v, v_scale)), f"seed {seed}: token {tok} head {j}"
            assert torch.equal(raw(qf[tok, j]), raw(want_q)), f"seed {seed}: gathered query, token {tok} head {j}"
    if num_paged:
        assert torch.isnan(key_cache[~written].float()).all() and torch.isnan(value_cache[~written].float()).all()
    rk, rv = ring_k_d.cpu(), ring_v_d.cpu()
    for row in range(rk.shape[0]):
        if row in expect:
            tok = expect[row]
            assert torch.equal(raw(rk[row]), stored(k[tok, stream_heads], k_scale)), f"seed {seed}: ring row {row}"
            assert torch.equal(raw(rv[row]), stored(v[tok, stream_heads], v_scale)), f"seed {seed}: ring row {row}"
        else:
            assert torch.equal(raw(rk[row]), raw(ring_k[row])) and torch.equal(raw(rv[row]), raw(ring_v[row])), \
                f"ring row {row} written"


def check_decode_batch(decode_fn: DecodeFn, group: int, num_ring: int, head_dim: int, sink: int, recent: int,
                       seed: int, device: str, kv_dtype: torch.dtype | None = None,
                       query_scale: str | None = None) -> None:
    """One decode batch straight from a filled ring: rows at every state of the window (shorter
    than the sink, at its edges, wrapped many times), a padding row and padding tokens, permuted
    ring slots, ring heads at random KV heads in random order among full heads.

    Each ring row holds what earlier steps stored (kv_dtype fp8: quantised with random scales),
    every row no query may read is NaN. The outputs must match the oracle on the keys the kernel
    sees (earlier positions as the ring returns them, the current one from k/v) within 1e-5;
    the token's key/value must land in its ring row and nothing else may move.
    query_scale ("tensor" / "head"): vLLM's fp8 queries with their q_scale; the oracle attends
    with ``q8 * q_scale``."""
    from rlkv_vllm.core.plan import ring_index
    from rlkv_vllm.core.reference import oracle_attention
    from rlkv_vllm.ops.torch_stream import dequantize_kv, quantize_kv

    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    c = sink + recent
    lens = sorted({1, max(1, sink - 1), sink + 1, c - 1, c, rng.randint(c + 1, 5 * c)})
    rng.shuffle(lens)
    n_real = len(lens)
    seq_lens = lens + [0]  # and a padding row
    num_tokens = n_real + 2  # and two padding tokens
    num_slots = n_real + 3
    slots = rng.sample(range(num_slots), n_real) + [num_slots]
    extra = rng.randint(0, 2)
    total = num_ring + extra
    ring_src = rng.sample(range(total), num_ring)
    fp8 = kv_dtype is not None
    k_scale = torch.tensor(rng.uniform(0.2, 2.0)) if fp8 else None
    v_scale = torch.tensor(rng.uniform(0.2, 2.0)) if fp8 else None
    ring_dtype = kv_dtype or torch.float32
    ring_k = torch.full(((num_slots + 1) * c, num_ring, head_dim), float("nan")).to(ring_dtype)
    ring_v = ring_k.clone()
    q = torch.randn(num_tokens, total * group, head_dim, generator=gen)
    k = torch.randn(num_tokens, total, head_dim, generator=gen)
    v = torch.randn(num_tokens, total, head_dim, generator=gen)
    q_in, q_kw = q, {}
    if query_scale:
        q_in, q_scale, q = fp8_queries(q, total, query_scale, rng)
        q_kw = dict(q_scale=q_scale.to(device))
    scale = head_dim**-0.5
    refs = []
    for r, n in enumerate(lens):
        kh = torch.randn(n, num_ring, head_dim, generator=gen)
        vh = torch.randn(n, num_ring, head_dim, generator=gen)
        kh[-1], vh[-1] = k[r, ring_src], v[r, ring_src]  # this step's token
        pos = torch.arange(n - 1)
        seen = (pos < sink) | (pos >= n - recent)  # the earlier positions the window reads
        rows = slots[r] * c + ring_index(pos[seen], sink, recent)
        if fp8:
            ring_k[rows] = quantize_kv(kh[:-1][seen], k_scale, kv_dtype)
            ring_v[rows] = quantize_kv(vh[:-1][seen], v_scale, kv_dtype)
            # the keys the kernel sees: earlier ones read back from the ring, its own from k/v
            kh[:-1][seen] = dequantize_kv(ring_k[rows], k_scale)
            vh[:-1][seen] = dequantize_kv(ring_v[rows], v_scale)
        else:
            ring_k[rows], ring_v[rows] = kh[:-1][seen], vh[:-1][seen]
        qh = q[r].view(total, group, head_dim)[ring_src].reshape(1, num_ring * group, head_dim)
        refs.append(oracle_attention(qh, kh, vh, scale=scale, full_heads=torch.zeros(num_ring, dtype=torch.bool),
                                     sink=sink, recent=recent)[0])
    before_k, before_v = ring_k.clone(), ring_v.clone()
    dev = lambda x: x.to(device)  # noqa: E731
    qsl = torch.tensor(list(range(n_real + 1)) + [n_real], dtype=torch.int32)
    rows_ = StepRows(dev(qsl), dev(torch.tensor(seq_lens, dtype=torch.int32)),
                     dev(torch.tensor(slots, dtype=torch.int32)), max_query_len=1)
    ring_k_d, ring_v_d = dev(ring_k), dev(ring_v)
    pools = LayerPools(sink=sink, recent=recent, ring_k=ring_k_d, ring_v=ring_v_d,
                       ring_src=dev(torch.tensor(ring_src, dtype=torch.int32)),
                       k_scale=dev(k_scale) if fp8 else None, v_scale=dev(v_scale) if fp8 else None)
    out = torch.full_like(q, float("nan"), device=device)
    decode_fn(dev(q_in), dev(k), dev(v), out, None, rows_, pools, scale, **q_kw)
    o = out.cpu().view(num_tokens, total, group, head_dim)
    others = [h for h in range(total) if h not in ring_src]
    assert torch.isnan(o[:, others]).all(), f"seed {seed}: wrote a head it does not own"
    assert (o[n_real:, ring_src] == 0).all(), f"seed {seed}: padding tokens must get zeros"
    for r, n in enumerate(lens):
        got = o[r, ring_src].reshape(num_ring * group, head_dim).double()
        err = float((got - refs[r].double()).norm() / refs[r].double().norm())
        assert err < 1e-5, f"seed {seed}: row {r} (seq_len {n}): rel err {err}"
    # the ring: each real row's token at its ring row, everything else as it was
    want_k, want_v = before_k, before_v
    for r, n in enumerate(lens):
        row = slots[r] * c + int(ring_index(torch.tensor(n - 1), sink, recent))
        kk, vv = k[r, ring_src], v[r, ring_src]
        want_k[row] = quantize_kv(kk, k_scale, kv_dtype) if fp8 else kk
        want_v[row] = quantize_kv(vv, v_scale, kv_dtype) if fp8 else vv
    for name, got, want in (("ring_k", ring_k_d.cpu(), want_k), ("ring_v", ring_v_d.cpu(), want_v)):
        same = (got.view(torch.uint8) == want.view(torch.uint8)).all(-1).all(-1)
        bad = same.logical_not().nonzero().flatten()[:8].tolist()
        assert bool(same.all()), f"seed {seed}: {name} rows differ: {bad}"
