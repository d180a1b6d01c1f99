"""Triton kernels for RLKV's split pools (the GPU path; checked on CPU with TRITON_INTERPRET=1).

Two kernels per layer and step, both graph-capturable: every index is computed on the
device from vLLM's persistent per-step buffers (query_start_loc, seq_lens, slot_mapping)
and our persistent ring-slot buffer, so a captured CUDA graph replays them correctly.

- ``ring_attention``: streaming heads of every query token attend over the Lambda
  window (``sink`` first positions plus the ``recent`` last ones, causal). Keys of
  earlier steps come from the request's ring slot; keys of this step's chunk come from
  the step's key/value tensors. Optionally mixes the result into ``out`` with a
  per-KV-head alpha (gated mode: out = alpha * out + (1 - alpha) * stream).
- ``fused_kv_write``: one launch that stores full heads into the paged cache
  (through ``slot_mapping``) and streaming heads into their ring rows. It runs after
  ``ring_attention``: a chunk longer than the window would otherwise overwrite ring
  keys its own earlier queries still read.

Tokens past ``query_start_loc[num_rows]`` are padding (CUDA-graph batches): they write
nothing and get a zero output. Rows with ``seq_len == 0`` are padding rows.

Ring layout per layer: ``[(num_slots + 1) * C, ring_heads, head_dim]`` with
C = sink + recent; position j of a request in slot s lives at row
``s * C + (j if j < sink else sink + (j - sink) % recent)``.
"""

from __future__ import annotations

import os

import torch

try:  # the package must import without Triton (e.g. a CPU-only install of another build)
    import triton
    import triton.language as tl

    HAVE_TRITON = True
except ImportError:  # pragma: no cover - every supported vLLM build ships Triton
    HAVE_TRITON = False


def _interpreting() -> bool:
    # Triton's interpreter multiplies bfloat16 dots as integers: use float32 there
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _next_pow2(x: int) -> int:
    return 1 << max(0, (x - 1).bit_length())


if HAVE_TRITON:

    @triton.jit
    def _vec(cond, like):
        """A scalar condition broadcast to ``like``'s shape (Triton's interpreter cannot
        combine a scalar mask with a block one)."""
        return (like * 0 + cond.to(tl.int32)) != 0

    @triton.jit
    def _find_row(qsl_ptr, t, num_rows):
        """Largest row r in [0, num_rows) with query_start_loc[r] <= t."""
        lo = 0
        hi = num_rows
        while lo < hi:
            mid = (lo + hi) // 2
            if tl.load(qsl_ptr + mid) <= t:
                lo = mid + 1
            else:
                hi = mid
        return lo - 1

    @triton.jit
    def _token_context(qsl_ptr, seq_lens_ptr, slot_ptr, t, num_rows):
        """(real, first token of the row, chunk start position, position, seq_len, slot)."""
        row = tl.maximum(_find_row(qsl_ptr, t, num_rows), 0)
        q_start = tl.load(qsl_ptr + row).to(tl.int64)
        q_end = tl.load(qsl_ptr + row + 1).to(tl.int64)
        seq_len = tl.load(seq_lens_ptr + row).to(tl.int64)
        real = (t < q_end) & (seq_len > 0)
        ctx_start = seq_len - (q_end - q_start)
        pos = ctx_start + (t - q_start)
        slot = tl.load(slot_ptr + row).to(tl.int64)
        return real, q_start, ctx_start, pos, seq_len, slot

    @triton.jit
    def _ring_attention_kernel(
        q_ptr, k_ptr, v_ptr, out_ptr, ring_k_ptr, ring_v_ptr, ring_src_ptr, alpha_ptr,
        qsl_ptr, seq_lens_ptr, slot_ptr, num_rows, scale,
        stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
        stride_ot, stride_oh, stride_rr, stride_rh,
        SINK: tl.constexpr, RECENT: tl.constexpr, GROUP: tl.constexpr, GROUP_PAD: tl.constexpr,
        HEAD_DIM: tl.constexpr, DIM_PAD: tl.constexpr, BLOCK_C: tl.constexpr, GATED: tl.constexpr,
        DOT_F32: tl.constexpr,
    ):
        t = tl.program_id(0).to(tl.int64)
        ring_head = tl.program_id(1)
        C: tl.constexpr = SINK + RECENT
        real, q_start, ctx_start, pos, seq_len, slot = _token_context(
            qsl_ptr, seq_lens_ptr, slot_ptr, t, num_rows)
        kv_head = tl.load(ring_src_ptr + ring_head).to(tl.int64)

        g = tl.arange(0, GROUP_PAD)
        d = tl.arange(0, DIM_PAD)
        g_ok = g < GROUP
        d_ok = d < HEAD_DIM
        q_heads = kv_head * GROUP + g
        g_real = g_ok & _vec(real, g)
        q = tl.load(q_ptr + t * stride_qt + q_heads[:, None] * stride_qh + d[None, :],
                    mask=g_real[:, None] & d_ok[None, :], other=0.0)
        if DOT_F32:
            q = q.to(tl.float32)

        m_i = tl.full([GROUP_PAD], float("-inf"), tl.float32)
        l_i = tl.zeros([GROUP_PAD], tl.float32)
        acc = tl.zeros([GROUP_PAD, DIM_PAD], tl.float32)
        for c0 in tl.static_range(0, C, BLOCK_C):
            c = c0 + tl.arange(0, BLOCK_C)
            is_sink = c < SINK
            cpos = tl.where(is_sink, c, pos - RECENT + 1 + (c - SINK))
            valid = tl.where(is_sink, cpos <= pos, cpos >= SINK) & (c < C) & _vec(real, c)
            from_ring = valid & (cpos < ctx_start)
            from_tok = valid & (cpos >= ctx_start)
            ring_pos = tl.where(cpos < SINK, cpos, SINK + (tl.maximum(cpos - SINK, 0) % RECENT))
            ring_row = slot * C + ring_pos
            tok_row = q_start + (cpos - ctx_start)
            kd = d_ok[None, :]
            k = tl.load(ring_k_ptr + ring_row[:, None] * stride_rr + ring_head * stride_rh + d[None, :],
                        mask=from_ring[:, None] & kd, other=0.0)
            k += tl.load(k_ptr + tok_row[:, None] * stride_kt + kv_head * stride_kh + d[None, :],
                         mask=from_tok[:, None] & kd, other=0.0)
            v = tl.load(ring_v_ptr + ring_row[:, None] * stride_rr + ring_head * stride_rh + d[None, :],
                        mask=from_ring[:, None] & kd, other=0.0)
            v += tl.load(v_ptr + tok_row[:, None] * stride_vt + kv_head * stride_vh + d[None, :],
                         mask=from_tok[:, None] & kd, other=0.0)
            if DOT_F32:
                k = k.to(tl.float32)
                v = v.to(tl.float32)
            s = tl.dot(q, tl.trans(k)).to(tl.float32) * scale
            s = tl.where(valid[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            # rows that have seen no valid key yet keep m = -inf: avoid (-inf) - (-inf)
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.exp(s - m_safe[:, None])
            corr = tl.exp(m_i - m_safe)
            l_i = l_i * corr + tl.sum(p, axis=1)
            acc = acc * corr[:, None] + tl.dot(p.to(v.dtype), v).to(tl.float32)
            m_i = m_new

        res = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
        o_ptrs = out_ptr + t * stride_ot + q_heads[:, None] * stride_oh + d[None, :]
        o_mask = g_ok[:, None] & d_ok[None, :]
        if GATED:
            alpha = tl.load(alpha_ptr + kv_head).to(tl.float32)
            full = tl.load(o_ptrs, mask=g_real[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
            res = alpha * full + (1.0 - alpha) * res
        res = tl.where(g_real[:, None], res, 0.0)
        tl.store(o_ptrs, res.to(out_ptr.dtype.element_ty), mask=o_mask)

    @triton.jit
    def _fused_kv_write_kernel(
        k_ptr, v_ptr, stride_kt, stride_kh, stride_vt, stride_vh,
        kc_ptr, vc_ptr, stride_kcb, stride_kcs, stride_kch, stride_vcb, stride_vcs, stride_vch,
        slot_mapping_ptr, block_size, paged_src_ptr, num_paged,
        ring_k_ptr, ring_v_ptr, stride_rr, stride_rh, ring_src_ptr,
        qsl_ptr, seq_lens_ptr, slot_ptr, num_rows,
        SINK: tl.constexpr, RECENT: tl.constexpr, HEAD_DIM: tl.constexpr, DIM_PAD: tl.constexpr,
    ):
        t = tl.program_id(0).to(tl.int64)
        j = tl.program_id(1)
        d = tl.arange(0, DIM_PAD)
        d_ok = d < HEAD_DIM
        if j < num_paged:
            cache_slot = tl.load(slot_mapping_ptr + t).to(tl.int64)
            if cache_slot >= 0:
                src = tl.load(paged_src_ptr + j).to(tl.int64)
                load = d_ok & _vec(src >= 0, d)  # TP padding heads get zeros
                src = tl.maximum(src, 0)
                kk = tl.load(k_ptr + t * stride_kt + src * stride_kh + d, mask=load, other=0.0)
                vv = tl.load(v_ptr + t * stride_vt + src * stride_vh + d, mask=load, other=0.0)
                blk = cache_slot // block_size
                off = cache_slot % block_size
                tl.store(kc_ptr + blk * stride_kcb + off * stride_kcs + j * stride_kch + d,
                         kk.to(kc_ptr.dtype.element_ty), mask=d_ok)
                tl.store(vc_ptr + blk * stride_vcb + off * stride_vcs + j * stride_vch + d,
                         vv.to(vc_ptr.dtype.element_ty), mask=d_ok)
        else:
            ring_head = j - num_paged
            real, q_start, ctx_start, pos, seq_len, slot = _token_context(
                qsl_ptr, seq_lens_ptr, slot_ptr, t, num_rows)
            # only keys some later query reads: the sinks and the last `recent` positions
            keep = real & ((pos < SINK) | (pos >= seq_len - RECENT))
            if keep:
                src = tl.load(ring_src_ptr + ring_head).to(tl.int64)
                ring_pos = tl.where(pos < SINK, pos, SINK + (tl.maximum(pos - SINK, 0) % RECENT))
                row = slot * (SINK + RECENT) + ring_pos
                kk = tl.load(k_ptr + t * stride_kt + src * stride_kh + d, mask=d_ok, other=0.0)
                vv = tl.load(v_ptr + t * stride_vt + src * stride_vh + d, mask=d_ok, other=0.0)
                tl.store(ring_k_ptr + row * stride_rr + ring_head * stride_rh + d,
                         kk.to(ring_k_ptr.dtype.element_ty), mask=d_ok)
                tl.store(ring_v_ptr + row * stride_rr + ring_head * stride_rh + d,
                         vv.to(ring_v_ptr.dtype.element_ty), mask=d_ok)


def _check_ring(ring_k: torch.Tensor, ring_v: torch.Tensor) -> None:
    if ring_k.stride() != ring_v.stride() or ring_k.stride(-1) != 1:
        raise ValueError("ring_k and ring_v must share strides, with contiguous head_dim")


def ring_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    ring_k: torch.Tensor,
    ring_v: torch.Tensor,
    ring_src: torch.Tensor,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    slot_ids: torch.Tensor,
    sink: int,
    recent: int,
    scale: float,
    alpha: torch.Tensor | None = None,
) -> None:
    """Lambda-window attention of the streaming heads, written into ``out`` in place.

    q, out: [T, Hq, D] (any token/head strides, contiguous D); k, v: [T, Hkv, D];
    ring_k, ring_v: [(S + 1) * C, R, D]; ring_src: [R] int, the model KV head of each
    ring head (its query heads are kv_head * G .. kv_head * G + G - 1, G = Hq // Hkv).
    query_start_loc: [B + 1]; seq_lens: [B] (context length after this step);
    slot_ids: [>= B] ring slot of each batch row. alpha: [Hkv] float32 for gated mode,
    where ``out`` already holds the full-attention result and is mixed in place.
    Heads of ``out`` not named by ``ring_src`` are left untouched.
    """
    num_tokens, num_q_heads, head_dim = q.shape
    num_kv_heads = k.shape[1]
    group = num_q_heads // num_kv_heads
    num_ring = ring_src.shape[0]
    if num_tokens == 0 or num_ring == 0:
        return
    _check_ring(ring_k, ring_v)
    for name, x in (("q", q), ("k", k), ("v", v), ("out", out)):
        if x.stride(-1) != 1:
            raise ValueError(f"{name} needs a contiguous head_dim")
    gated = alpha is not None
    _ring_attention_kernel[(num_tokens, num_ring)](
        q, k, v, out, ring_k, ring_v, ring_src, alpha if gated else ring_src,
        query_start_loc, seq_lens, slot_ids, seq_lens.shape[0], scale,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        out.stride(0), out.stride(1), ring_k.stride(0), ring_k.stride(1),
        SINK=sink, RECENT=recent, GROUP=group, GROUP_PAD=max(16, _next_pow2(group)),
        HEAD_DIM=head_dim, DIM_PAD=max(16, _next_pow2(head_dim)), BLOCK_C=32, GATED=gated,
        DOT_F32=_interpreting(), num_warps=4,
    )


def fused_kv_write(
    k: torch.Tensor,
    v: torch.Tensor,
    key_cache: torch.Tensor | None,
    value_cache: torch.Tensor | None,
    slot_mapping: torch.Tensor | None,
    paged_src: torch.Tensor | None,
    ring_k: torch.Tensor | None,
    ring_v: torch.Tensor | None,
    ring_src: torch.Tensor | None,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    slot_ids: torch.Tensor,
    sink: int,
    recent: int,
) -> None:
    """Store one step's keys/values: full heads paged, streaming heads into the ring.

    k, v: [T, Hkv, D]; key_cache, value_cache: [num_blocks, block_size, P, D] views
    (any strides, contiguous D); slot_mapping: [>= T] int, -1 = skip;
    paged_src: [P] int, the model KV head stored in paged head j (-1: padding, zeros);
    ring_k, ring_v: [(S + 1) * C, R, D]; ring_src: [R] int.
    Either pool may be absent (None), e.g. a layer with no full head.
    """
    num_tokens, _, head_dim = k.shape
    num_paged = 0 if paged_src is None else paged_src.shape[0]
    num_ring = 0 if ring_src is None else ring_src.shape[0]
    if num_tokens == 0 or num_paged + num_ring == 0:
        return
    if num_paged:
        assert key_cache is not None and value_cache is not None and slot_mapping is not None
        kc, vc, sm, ps, bs = key_cache, value_cache, slot_mapping, paged_src, key_cache.shape[1]
    else:
        kc = vc = sm = ps = k  # placeholders, never dereferenced
        bs = 1
    if num_ring:
        assert ring_k is not None and ring_v is not None
        _check_ring(ring_k, ring_v)
        rk, rv, rs = ring_k, ring_v, ring_src
    else:
        rk = rv = rs = k
    _fused_kv_write_kernel[(num_tokens, num_paged + num_ring)](
        k, v, k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        kc, vc, kc.stride(0), kc.stride(1), kc.stride(2), vc.stride(0), vc.stride(1), vc.stride(2),
        sm, bs, ps, num_paged,
        rk, rv, rk.stride(0), rk.stride(1), rs,
        query_start_loc, seq_lens, slot_ids, seq_lens.shape[0],
        SINK=sink, RECENT=recent, HEAD_DIM=head_dim, DIM_PAD=max(16, _next_pow2(head_dim)),
        num_warps=1,
    )
