"""Triton kernels for RLKV's split pools (the GPU path; checked on CPU with TRITON_INTERPRET=1).

Every kernel is graph-capturable: every index is computed on the device from vLLM's
persistent per-step buffers (query_start_loc, seq_lens, slot_mapping) and our persistent
ring-slot buffer, so a captured CUDA graph replays them correctly.

- ``ring_attention``: streaming heads of every query token attend over the Lambda
  window (``sink`` first positions plus the ``recent`` last ones, causal). Keys of
  earlier steps come from the request's ring slot; keys of this step's chunk come from
  the step's key/value tensors. Optionally mixes the result into ``out`` with a
  per-KV-head alpha (gated mode: out = alpha * out + (1 - alpha) * stream).
- ``fused_kv_write``: one launch that stores full heads into the paged cache
  (through ``slot_mapping``), optionally gathers their query heads for the stock
  kernel, and stores streaming heads into their ring rows. It runs after
  ``ring_attention``: a chunk longer than the window would otherwise overwrite ring
  keys its own earlier queries still read.
- ``decode_step``: both of the above in one launch, for batches with one query token
  per row (decode), where a token's ring write can follow its own reads. Two variants
  (``DECODE_STEP_VARIANT``): "v2" (the default, ``_slot_decode_step_kernel``) runs a 1-D
  grid of T x ceil(R / H) programs, a token's programs adjacent; each takes H ring heads of
  one token (``slot_config``: H = 1) and a share of its paged heads. It loads the paged
  heads' key/value/query first and stores them last; it reads the window in storage order
  (the slot's rows 0 .. C - 1, one [H * 16, D] block at a time, 80 rows in 5 blocks with no
  padding, all 5 in flight through a shared-memory pipeline), the token's own key/value from
  k/v (it starts the online softmax), with the query rows of H heads' GROUP queries (at least
  16) in one tensor-core dot per block (block-diagonal masking across heads). "v1"
  (``_decode_step_kernel``, kept for comparison) runs grid (T, P + R), one program per token
  and paged or ring head, the window in three dependent 32-row blocks (96 rows), GROUP
  padded to 16 rows (~190 registers a thread at sm90: two programs an SM).

Tokens past ``query_start_loc[num_rows]`` are padding (CUDA-graph batches): they write
nothing and get a zero output. Rows with ``seq_len == 0`` are padding rows.

Ring layout per layer: ``[(num_slots + 1) * C, ring_heads, head_dim]`` with
C = sink + recent; position j of a request in slot s lives at row
``s * C + (j if j < sink else sink + (j - sink) % recent)``.

FP8 (``--kv-cache-dtype fp8``): the ring and the paged views are typed fp8 (e4m3fn or
e5m2); stores write ``clamp(x / scale)`` rounded to nearest even (vLLM's
``reshape_and_cache`` with the layer's ``_k_scale`` / ``_v_scale``), ring reads give
``fp8 * scale``. The rounding is done in float32 bits before the cast (``_quantize``), so
the cast is exact: Triton's interpreter drops the mantissa carry of fp32 -> fp8 casts.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

import torch

from ..core.plan import is_fp8
from .views import LayerPools, StepRows

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


_LOG2E = 1.4426950408889634  # v2 takes its scale in base 2 (exp2)


# fp8 storage formats a kernel takes as its RING_FP8 / PAGED_FP8 constexpr (0: no fp8)
FP8_FORMATS = {torch.float8_e4m3fn: 1, torch.float8_e5m2: 2}


def _fp8_format(x: torch.Tensor | None) -> int:
    return 0 if x is None else FP8_FORMATS.get(x.dtype, 0)


if HAVE_TRITON:

    @triton.jit
    def _vec(cond, like):
        """A scalar condition broadcast to ``like``'s shape (Triton's interpreter cannot
        combine a scalar mask with a block one)."""
        return (like * 0 + cond.to(tl.int32)) != 0

    @triton.jit
    def _round_fp8(y, MANT: tl.constexpr, TINY: tl.constexpr, MAGIC: tl.constexpr, FMAX: tl.constexpr):
        """float32 ``y`` saturated to +-FMAX and rounded to nearest even on the grid of an fp8
        format with MANT mantissa bits whose smallest normal is TINY (MAGIC = 1.5 * 2**23 *
        the subnormal step): the result is exactly representable, so its cast is exact."""
        y = tl.minimum(tl.maximum(y, -FMAX), FMAX)
        SHIFT: tl.constexpr = 23 - MANT
        bits = y.to(tl.int32, bitcast=True)
        sign = (bits >> 31) << 31
        # round the fp32 mantissa to MANT bits; a carry moves into the exponent, as it must
        normal = ((bits + ((1 << (SHIFT - 1)) - 1) + ((bits >> SHIFT) & 1)) & (-(1 << SHIFT)))
        # below TINY the fp8 step is fixed: adding MAGIC rounds |y| to a multiple of it (the
        # sign put back by bits, so a tiny negative rounds to -0 as in a real cast)
        sub = ((tl.abs(y) + MAGIC) - MAGIC).to(tl.int32, bitcast=True) | sign
        r = tl.where(tl.abs(y) < TINY, sub, normal)
        return r.to(tl.float32, bitcast=True)

    @triton.jit
    def _quantize(x, scale, FMT: tl.constexpr):
        """vLLM's scaled fp8 store of ``x``: clamp(x / scale) rounded to format FMT (1: e4m3fn,
        2: e5m2), as float32 values the format holds exactly."""
        y = x.to(tl.float32) / scale
        if FMT == 1:
            r = _round_fp8(y, 3, 0.015625, 24576.0, 448.0)
        else:
            r = _round_fp8(y, 2, 6.103515625e-05, 192.0, 57344.0)
        return r

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
    def _window_attention(
        q_ptr, k_ptr, v_ptr, ring_k_ptr, ring_v_ptr, t, q_heads, g_real, kv_head, ring_head,
        real, q_start, ctx_start, pos, slot, scale, k_scale, v_scale,
        stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_rr, stride_rh,
        SINK: tl.constexpr, RECENT: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr,
        DIM_PAD: tl.constexpr, BLOCK_C: tl.constexpr, DOT_F32: tl.constexpr, RING_FP8: tl.constexpr,
    ):
        """Lambda-window attention of one token's query heads of one KV head: [GROUP_PAD, DIM_PAD]
        float32. Keys before ``ctx_start`` come from the ring slot, the others from this step's k/v;
        an fp8 ring (RING_FP8) is read back as ``fp8 * k_scale`` / ``* v_scale``."""
        C: tl.constexpr = SINK + RECENT
        d = tl.arange(0, DIM_PAD)
        d_ok = d < HEAD_DIM
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
            v = tl.load(ring_v_ptr + ring_row[:, None] * stride_rr + ring_head * stride_rh + d[None, :],
                        mask=from_ring[:, None] & kd, other=0.0)
            if RING_FP8:
                k = (k.to(tl.float32) * k_scale).to(k_ptr.dtype.element_ty)
                v = (v.to(tl.float32) * v_scale).to(v_ptr.dtype.element_ty)
            k += tl.load(k_ptr + tok_row[:, None] * stride_kt + kv_head * stride_kh + d[None, :],
                         mask=from_tok[:, None] & kd, other=0.0)
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
        return acc / tl.where(l_i > 0, l_i, 1.0)[:, None]

    @triton.jit
    def _ring_attention_kernel(
        q_ptr, k_ptr, v_ptr, out_ptr, ring_k_ptr, ring_v_ptr, ring_src_ptr, alpha_ptr,
        qsl_ptr, seq_lens_ptr, slot_ptr, num_rows, scale, k_scale_ptr, v_scale_ptr,
        stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
        stride_ot, stride_oh, stride_rr, stride_rh,
        SINK: tl.constexpr, RECENT: tl.constexpr, GROUP: tl.constexpr, GROUP_PAD: tl.constexpr,
        HEAD_DIM: tl.constexpr, DIM_PAD: tl.constexpr, BLOCK_C: tl.constexpr, GATED: tl.constexpr,
        DOT_F32: tl.constexpr, RING_FP8: tl.constexpr,
    ):
        t = tl.program_id(0).to(tl.int64)
        ring_head = tl.program_id(1)
        k_scale = 1.0
        v_scale = 1.0
        if RING_FP8:
            k_scale = tl.load(k_scale_ptr).to(tl.float32)
            v_scale = tl.load(v_scale_ptr).to(tl.float32)
        real, q_start, ctx_start, pos, seq_len, slot = _token_context(
            qsl_ptr, seq_lens_ptr, slot_ptr, t, num_rows)
        kv_head = tl.load(ring_src_ptr + ring_head).to(tl.int64)
        g = tl.arange(0, GROUP_PAD)
        d = tl.arange(0, DIM_PAD)
        g_ok = g < GROUP
        d_ok = d < HEAD_DIM
        q_heads = kv_head * GROUP + g
        g_real = g_ok & _vec(real, g)
        res = _window_attention(
            q_ptr, k_ptr, v_ptr, ring_k_ptr, ring_v_ptr, t, q_heads, g_real, kv_head, ring_head,
            real, q_start, ctx_start, pos, slot, scale, k_scale, v_scale,
            stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_rr, stride_rh,
            SINK, RECENT, GROUP_PAD, HEAD_DIM, DIM_PAD, BLOCK_C, DOT_F32, RING_FP8)
        o_ptrs = out_ptr + t * stride_ot + q_heads[:, None] * stride_oh + d[None, :]
        o_mask = g_ok[:, None] & d_ok[None, :]
        if GATED:
            alpha = tl.load(alpha_ptr + kv_head).to(tl.float32)
            full = tl.load(o_ptrs, mask=g_real[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
            res = alpha * full + (1.0 - alpha) * res
        res = tl.where(g_real[:, None], res, 0.0)
        tl.store(o_ptrs, res.to(out_ptr.dtype.element_ty), mask=o_mask)

    @triton.jit
    def _paged_write_and_gather(
        t, j, k_ptr, v_ptr, stride_kt, stride_kh, stride_vt, stride_vh,
        kc_ptr, vc_ptr, stride_kcb, stride_kcs, stride_kch, stride_vcb, stride_vcs, stride_vch,
        slot_mapping_ptr, block_size, paged_src_ptr,
        q_ptr, stride_qt, stride_qh, qf_ptr, stride_qft, stride_qfh, k_scale, v_scale,
        GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, DIM_PAD: tl.constexpr,
        GATHER_Q: tl.constexpr, PAGED_FP8: tl.constexpr,
    ):
        """Paged head j of token t: store its key/value at slot_mapping[t] (an fp8 cache:
        quantised with k_scale / v_scale); with GATHER_Q also copy its query heads into
        qf[t, j * GROUP : (j + 1) * GROUP] (zeros for a padding head)."""
        d = tl.arange(0, DIM_PAD)
        d_ok = d < HEAD_DIM
        src = tl.load(paged_src_ptr + j).to(tl.int64)
        has_src = src >= 0
        load = d_ok & _vec(has_src, d)  # TP padding heads get zeros
        src = tl.maximum(src, 0)
        cache_slot = tl.load(slot_mapping_ptr + t).to(tl.int64)
        if cache_slot >= 0:
            kk = tl.load(k_ptr + t * stride_kt + src * stride_kh + d, mask=load, other=0.0)
            vv = tl.load(v_ptr + t * stride_vt + src * stride_vh + d, mask=load, other=0.0)
            if PAGED_FP8:
                kk = _quantize(kk, k_scale, PAGED_FP8)
                vv = _quantize(vv, v_scale, PAGED_FP8)
            blk = cache_slot // block_size
            off = cache_slot % block_size
            tl.store(kc_ptr + blk * stride_kcb + off * stride_kcs + j * stride_kch + d,
                     kk.to(kc_ptr.dtype.element_ty), mask=d_ok)
            tl.store(vc_ptr + blk * stride_vcb + off * stride_vcs + j * stride_vch + d,
                     vv.to(vc_ptr.dtype.element_ty), mask=d_ok)
        if GATHER_Q:
            g = tl.arange(0, GROUP_PAD)
            g_ok = g < GROUP
            m = g_ok[:, None] & d_ok[None, :]
            qq = tl.load(q_ptr + t * stride_qt + (src * GROUP + g)[:, None] * stride_qh + d[None, :],
                         mask=m & _vec(has_src, g)[:, None], other=0.0)
            tl.store(qf_ptr + t * stride_qft + (j * GROUP + g)[:, None] * stride_qfh + d[None, :],
                     qq.to(qf_ptr.dtype.element_ty), mask=m)

    @triton.jit
    def _ring_write(
        t, ring_head, k_ptr, v_ptr, stride_kt, stride_kh, stride_vt, stride_vh,
        ring_k_ptr, ring_v_ptr, stride_rr, stride_rh, ring_src_ptr, real, pos, seq_len, slot, k_scale, v_scale,
        SINK: tl.constexpr, RECENT: tl.constexpr, HEAD_DIM: tl.constexpr, DIM_PAD: tl.constexpr,
        RING_FP8: tl.constexpr,
    ):
        """Store token t's key/value of one streaming head in its ring row, if a later query reads it
        (an fp8 ring: quantised with k_scale / v_scale)."""
        d = tl.arange(0, DIM_PAD)
        d_ok = d < HEAD_DIM
        # only keys some later query reads: the sinks and the last `recent` positions
        keep = real & ((pos < SINK) | (pos >= seq_len - RECENT))
        if keep:
            src = tl.load(ring_src_ptr + ring_head).to(tl.int64)
            ring_pos = tl.where(pos < SINK, pos, SINK + (tl.maximum(pos - SINK, 0) % RECENT))
            row = slot * (SINK + RECENT) + ring_pos
            kk = tl.load(k_ptr + t * stride_kt + src * stride_kh + d, mask=d_ok, other=0.0)
            vv = tl.load(v_ptr + t * stride_vt + src * stride_vh + d, mask=d_ok, other=0.0)
            if RING_FP8:
                kk = _quantize(kk, k_scale, RING_FP8)
                vv = _quantize(vv, v_scale, RING_FP8)
            tl.store(ring_k_ptr + row * stride_rr + ring_head * stride_rh + d,
                     kk.to(ring_k_ptr.dtype.element_ty), mask=d_ok)
            tl.store(ring_v_ptr + row * stride_rr + ring_head * stride_rh + d,
                     vv.to(ring_v_ptr.dtype.element_ty), mask=d_ok)

    @triton.jit
    def _fused_kv_write_kernel(
        k_ptr, v_ptr, stride_kt, stride_kh, stride_vt, stride_vh,
        kc_ptr, vc_ptr, stride_kcb, stride_kcs, stride_kch, stride_vcb, stride_vcs, stride_vch,
        slot_mapping_ptr, block_size, paged_src_ptr, num_paged,
        q_ptr, stride_qt, stride_qh, qf_ptr, stride_qft, stride_qfh,
        ring_k_ptr, ring_v_ptr, stride_rr, stride_rh, ring_src_ptr,
        qsl_ptr, seq_lens_ptr, slot_ptr, num_rows, k_scale_ptr, v_scale_ptr,
        SINK: tl.constexpr, RECENT: tl.constexpr, GROUP: tl.constexpr, GROUP_PAD: tl.constexpr,
        HEAD_DIM: tl.constexpr, DIM_PAD: tl.constexpr, GATHER_Q: tl.constexpr,
        PAGED_FP8: tl.constexpr, RING_FP8: tl.constexpr,
    ):
        t = tl.program_id(0).to(tl.int64)
        j = tl.program_id(1)
        k_scale = 1.0
        v_scale = 1.0
        if PAGED_FP8 or RING_FP8:
            k_scale = tl.load(k_scale_ptr).to(tl.float32)
            v_scale = tl.load(v_scale_ptr).to(tl.float32)
        if j < num_paged:
            _paged_write_and_gather(
                t, j, k_ptr, v_ptr, stride_kt, stride_kh, stride_vt, stride_vh,
                kc_ptr, vc_ptr, stride_kcb, stride_kcs, stride_kch, stride_vcb, stride_vcs, stride_vch,
                slot_mapping_ptr, block_size, paged_src_ptr, q_ptr, stride_qt, stride_qh,
                qf_ptr, stride_qft, stride_qfh, k_scale, v_scale, GROUP, GROUP_PAD, HEAD_DIM, DIM_PAD, GATHER_Q,
                PAGED_FP8)
        else:
            real, q_start, ctx_start, pos, seq_len, slot = _token_context(
                qsl_ptr, seq_lens_ptr, slot_ptr, t, num_rows)
            _ring_write(t, j - num_paged, k_ptr, v_ptr, stride_kt, stride_kh, stride_vt, stride_vh,
                        ring_k_ptr, ring_v_ptr, stride_rr, stride_rh, ring_src_ptr, real, pos, seq_len,
                        slot, k_scale, v_scale, SINK, RECENT, HEAD_DIM, DIM_PAD, RING_FP8)

    @triton.jit
    def _decode_step_kernel(
        q_ptr, k_ptr, v_ptr, out_ptr, stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
        stride_ot, stride_oh,
        kc_ptr, vc_ptr, stride_kcb, stride_kcs, stride_kch, stride_vcb, stride_vcs, stride_vch,
        slot_mapping_ptr, block_size, paged_src_ptr, num_paged, qf_ptr, stride_qft, stride_qfh,
        ring_k_ptr, ring_v_ptr, stride_rr, stride_rh, ring_src_ptr,
        qsl_ptr, seq_lens_ptr, slot_ptr, num_rows, scale, k_scale_ptr, v_scale_ptr,
        SINK: tl.constexpr, RECENT: tl.constexpr, GROUP: tl.constexpr, GROUP_PAD: tl.constexpr,
        HEAD_DIM: tl.constexpr, DIM_PAD: tl.constexpr, BLOCK_C: tl.constexpr, GATHER_Q: tl.constexpr,
        DOT_F32: tl.constexpr, PAGED_FP8: tl.constexpr, RING_FP8: tl.constexpr,
    ):
        t = tl.program_id(0).to(tl.int64)
        j = tl.program_id(1)
        k_scale = 1.0
        v_scale = 1.0
        if PAGED_FP8 or RING_FP8:
            k_scale = tl.load(k_scale_ptr).to(tl.float32)
            v_scale = tl.load(v_scale_ptr).to(tl.float32)
        if j < num_paged:
            _paged_write_and_gather(
                t, j, k_ptr, v_ptr, stride_kt, stride_kh, stride_vt, stride_vh,
                kc_ptr, vc_ptr, stride_kcb, stride_kcs, stride_kch, stride_vcb, stride_vcs, stride_vch,
                slot_mapping_ptr, block_size, paged_src_ptr, q_ptr, stride_qt, stride_qh,
                qf_ptr, stride_qft, stride_qfh, k_scale, v_scale, GROUP, GROUP_PAD, HEAD_DIM, DIM_PAD, GATHER_Q,
                PAGED_FP8)
        else:
            ring_head = j - num_paged
            # one query token per row: token t is row t (no search); rows past the real
            # ones (CUDA-graph padding) have seq_len 0 or an empty query span
            row = tl.maximum(tl.minimum(t, num_rows - 1), 0)
            seq_len = tl.load(seq_lens_ptr + row).to(tl.int64)
            q_len = tl.load(qsl_ptr + row + 1) - tl.load(qsl_ptr + row)
            slot = tl.load(slot_ptr + row).to(tl.int64)
            real = (t < num_rows) & (q_len > 0) & (seq_len > 0)
            pos = seq_len - 1
            kv_head = tl.load(ring_src_ptr + ring_head).to(tl.int64)
            g = tl.arange(0, GROUP_PAD)
            d = tl.arange(0, DIM_PAD)
            g_ok = g < GROUP
            q_heads = kv_head * GROUP + g
            g_real = g_ok & _vec(real, g)
            res = _window_attention(
                q_ptr, k_ptr, v_ptr, ring_k_ptr, ring_v_ptr, t, q_heads, g_real, kv_head, ring_head,
                real, t, pos, pos, slot, scale, k_scale, v_scale,
                stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_rr, stride_rh,
                SINK, RECENT, GROUP_PAD, HEAD_DIM, DIM_PAD, BLOCK_C, DOT_F32, RING_FP8)
            res = tl.where(g_real[:, None], res, 0.0)
            o_mask = g_ok[:, None] & (d < HEAD_DIM)[None, :]
            tl.store(out_ptr + t * stride_ot + q_heads[:, None] * stride_oh + d[None, :],
                     res.to(out_ptr.dtype.element_ty), mask=o_mask)
            # the ring row of position pos held pos - recent, outside this query's window,
            # and each row's one token is its only reader: writing after the reads is safe
            _ring_write(t, ring_head, k_ptr, v_ptr, stride_kt, stride_kh, stride_vt, stride_vh,
                        ring_k_ptr, ring_v_ptr, stride_rr, stride_rh, ring_src_ptr, real, pos, seq_len,
                        slot, k_scale, v_scale, SINK, RECENT, HEAD_DIM, DIM_PAD, RING_FP8)

    @triton.jit
    def _slot_paged_load(
        t, hg, k_ptr, v_ptr, stride_kt, stride_kh, stride_vt, stride_vh, slot_mapping_ptr, paged_src_ptr,
        num_paged, paged_per, q_ptr, stride_qt, stride_qh, k_scale, v_scale,
        GROUP: tl.constexpr, GROUP_P2: tl.constexpr, HEAD_DIM: tl.constexpr, DIM_PAD: tl.constexpr,
        PAGED_BLK: tl.constexpr, GATHER_Q: tl.constexpr, PAGED_FP8: tl.constexpr,
    ):
        """The loads of ``_paged_write_and_gather`` for paged heads hg * paged_per .. + paged_per - 1
        of token t at once: (keys, values [PAGED_BLK, D], as the cache stores them; their store
        mask, false where slot_mapping[t] < 0; their query heads [PAGED_BLK * GROUP_P2, D], zeros
        for a TP padding head). Issued first, stored last (``_slot_paged_store``), so that their
        round trip overlaps the ring's."""
        d = tl.arange(0, DIM_PAD)
        d_ok = d < HEAD_DIM
        i = tl.arange(0, PAGED_BLK)
        j = hg * paged_per + i
        j_ok = (i < paged_per) & (j < num_paged)
        src = tl.load(paged_src_ptr + j, mask=j_ok, other=-1).to(tl.int64)
        cache_slot = tl.load(slot_mapping_ptr + t).to(tl.int64)
        st = (j_ok & _vec(cache_slot >= 0, i))[:, None] & d_ok[None, :]
        load = st & (src >= 0)[:, None]  # TP padding heads get zeros
        src = tl.maximum(src, 0)
        kk = tl.load(k_ptr + t * stride_kt + src[:, None] * stride_kh + d[None, :], mask=load, other=0.0)
        vv = tl.load(v_ptr + t * stride_vt + src[:, None] * stride_vh + d[None, :], mask=load, other=0.0)
        if PAGED_FP8:
            kk = _quantize(kk, k_scale, PAGED_FP8)
            vv = _quantize(vv, v_scale, PAGED_FP8)
        qq = kk
        if GATHER_Q:
            n = tl.arange(0, PAGED_BLK * GROUP_P2)
            jn = hg * paged_per + n // GROUP_P2
            g = n % GROUP_P2
            n_ok = (n // GROUP_P2 < paged_per) & (jn < num_paged) & (g < GROUP)
            src_n = tl.load(paged_src_ptr + jn, mask=n_ok, other=-1).to(tl.int64)
            qq = tl.load(q_ptr + t * stride_qt + (tl.maximum(src_n, 0) * GROUP + g)[:, None] * stride_qh + d[None, :],
                         mask=(n_ok & (src_n >= 0))[:, None] & d_ok[None, :], other=0.0)
        return kk, vv, st, qq, cache_slot

    @triton.jit
    def _slot_paged_store(
        t, hg, kk, vv, st, qq, cache_slot, kc_ptr, vc_ptr, stride_kcb, stride_kcs, stride_kch,
        stride_vcb, stride_vcs, stride_vch, block_size, num_paged, paged_per, qf_ptr, stride_qft, stride_qfh,
        GROUP: tl.constexpr, GROUP_P2: tl.constexpr, HEAD_DIM: tl.constexpr, DIM_PAD: tl.constexpr,
        PAGED_BLK: tl.constexpr, GATHER_Q: tl.constexpr,
    ):
        """The stores of ``_slot_paged_load``'s heads: keys/values at slot_mapping[t] (skipped where
        it is < 0), their query heads into qf[t, j * GROUP : (j + 1) * GROUP]."""
        d = tl.arange(0, DIM_PAD)
        d_ok = d < HEAD_DIM
        j = hg * paged_per + tl.arange(0, PAGED_BLK)
        blk = tl.maximum(cache_slot, 0) // block_size
        off = tl.maximum(cache_slot, 0) % block_size
        tl.store(kc_ptr + blk * stride_kcb + off * stride_kcs + j[:, None] * stride_kch + d[None, :],
                 kk.to(kc_ptr.dtype.element_ty), mask=st)
        tl.store(vc_ptr + blk * stride_vcb + off * stride_vcs + j[:, None] * stride_vch + d[None, :],
                 vv.to(vc_ptr.dtype.element_ty), mask=st)
        if GATHER_Q:
            n = tl.arange(0, PAGED_BLK * GROUP_P2)
            jn = hg * paged_per + n // GROUP_P2
            g = n % GROUP_P2
            n_ok = (n // GROUP_P2 < paged_per) & (jn < num_paged) & (g < GROUP)
            tl.store(qf_ptr + t * stride_qft + (jn * GROUP + g)[:, None] * stride_qfh + d[None, :],
                     qq.to(qf_ptr.dtype.element_ty), mask=n_ok[:, None] & d_ok[None, :])

    @triton.jit
    def _slot_ring_block(
        ring_k_ptr, ring_v_ptr, stride_rr, stride_rh, slot, h0, num_ring, real, pos, c0,
        q, hr, scale_log2, k_scale, v_scale, like_ptr,
        BLK: tl.constexpr, HEADS: tl.constexpr, SINK: tl.constexpr, RECENT: tl.constexpr,
        HEAD_DIM: tl.constexpr, DIM_PAD: tl.constexpr, DOT_F32: tl.constexpr, RING_FP8: tl.constexpr,
    ):
        """Storage rows c0 .. c0 + BLK - 1 of a slot's ring, ring heads h0 .. h0 + HEADS - 1, as one
        [HEADS * BLK, D] block (column n: head n // BLK, row c0 + n % BLK; contiguous in memory
        when HEADS is every ring head), with the query rows' base-2 scores against it:
        (scores [M, HEADS * BLK], -inf where masked; the values). A query row sees the valid
        columns of its own head only. A row is valid if it holds an earlier position of the
        window: a sink row c < SINK holds c (valid if c < pos); a recent row c = SINK + i holds
        pos - dist, dist = ((pos - SINK) - i) mod RECENT, valid for 0 < dist and pos - dist >=
        SINK (dist 0 is the row pos itself overwrites, which holds pos - RECENT). Invalid rows
        are not read. An fp8 ring reads back as ``fp8 * scale`` in k/v's dtype."""
        n = tl.arange(0, HEADS * BLK)
        hn = n // BLK
        c = c0 + n % BLK
        dist = (tl.maximum(pos - SINK, 0) % RECENT - (c - SINK) + RECENT) % RECENT
        ok = tl.where(c < SINK, c < pos, (dist > 0) & (pos - dist >= SINK))
        ok = ok & (c < SINK + RECENT) & (h0 + hn < num_ring) & _vec(real, n)
        d = tl.arange(0, DIM_PAD)
        m = ok[:, None] & (d < HEAD_DIM)[None, :]
        off = (slot * (SINK + RECENT) + c)[:, None] * stride_rr + (h0 + hn)[:, None] * stride_rh + d[None, :]
        k = tl.load(ring_k_ptr + off, mask=m, other=0.0)
        v = tl.load(ring_v_ptr + off, mask=m, other=0.0)
        if RING_FP8:
            k = (k.to(tl.float32) * k_scale).to(like_ptr.dtype.element_ty)
            v = (v.to(tl.float32) * v_scale).to(like_ptr.dtype.element_ty)
        if DOT_F32:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        s = tl.dot(q, tl.trans(k)).to(tl.float32) * scale_log2
        s = tl.where(ok[None, :] & (hn[None, :] == hr[:, None]), s, float("-inf"))
        return s, v

    @triton.jit
    def _slot_decode_step_kernel(
        q_ptr, k_ptr, v_ptr, out_ptr, stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
        stride_ot, stride_oh,
        kc_ptr, vc_ptr, stride_kcb, stride_kcs, stride_kch, stride_vcb, stride_vcs, stride_vch,
        slot_mapping_ptr, block_size, paged_src_ptr, num_paged, paged_per, qf_ptr, stride_qft, stride_qfh,
        ring_k_ptr, ring_v_ptr, stride_rr, stride_rh, ring_src_ptr, num_ring, progs,
        qsl_ptr, seq_lens_ptr, slot_ptr, num_rows, scale_log2, k_scale_ptr, v_scale_ptr, q_scale_ptr,
        SINK: tl.constexpr, RECENT: tl.constexpr, GROUP: tl.constexpr, GROUP_P2: tl.constexpr,
        HEAD_DIM: tl.constexpr, DIM_PAD: tl.constexpr, HEADS: tl.constexpr, ROWS: tl.constexpr,
        BLK: tl.constexpr, NUM_STAGES: tl.constexpr, PAGED_BLK: tl.constexpr,
        HAS_PAGED: tl.constexpr, HAS_RING: tl.constexpr, GATHER_Q: tl.constexpr,
        DOT_F32: tl.constexpr, PAGED_FP8: tl.constexpr, RING_FP8: tl.constexpr,
        Q_FP8: tl.constexpr, Q_SCALE_PER_HEAD: tl.constexpr,
    ):
        # program pid: token pid // progs, head group pid % progs (a token's programs are
        # neighbours, so the reads of one ring slot are issued together)
        pid = tl.program_id(0)
        t = (pid // progs).to(tl.int64)
        hg = pid % progs
        k_scale = 1.0
        v_scale = 1.0
        if PAGED_FP8 or RING_FP8:
            k_scale = tl.load(k_scale_ptr).to(tl.float32)
            v_scale = tl.load(v_scale_ptr).to(tl.float32)
        if HAS_PAGED:
            pk, pv, p_st, pq, cache_slot = _slot_paged_load(
                t, hg, k_ptr, v_ptr, stride_kt, stride_kh, stride_vt, stride_vh, slot_mapping_ptr, paged_src_ptr,
                num_paged, paged_per, q_ptr, stride_qt, stride_qh, k_scale, v_scale,
                GROUP, GROUP_P2, HEAD_DIM, DIM_PAD, PAGED_BLK, GATHER_Q, PAGED_FP8)
        if HAS_RING:
            # one query token per row: token t is row t; rows past the real ones (CUDA-graph
            # padding) have seq_len 0 or an empty query span
            row = tl.maximum(tl.minimum(t, num_rows - 1), 0)
            seq_len = tl.load(seq_lens_ptr + row).to(tl.int64)
            q_len = tl.load(qsl_ptr + row + 1) - tl.load(qsl_ptr + row)
            slot = tl.load(slot_ptr + row).to(tl.int64)
            real = (t < num_rows) & (q_len > 0) & (seq_len > 0)
            pos = seq_len - 1
            h0 = hg * HEADS
            d = tl.arange(0, DIM_PAD)
            d_ok = d < HEAD_DIM
            # query row r: ring head h0 + r // GROUP_P2, query head g = r % GROUP_P2 of its group
            r = tl.arange(0, ROWS)
            hr = r // GROUP_P2
            r_ok = (hr < HEADS) & (r % GROUP_P2 < GROUP) & (h0 + hr < num_ring)
            r_real = r_ok & _vec(real, r)
            kv_r = tl.load(ring_src_ptr + h0 + hr, mask=r_ok, other=0).to(tl.int64)
            q_rows = kv_r * GROUP + r % GROUP_P2
            rm = r_real[:, None] & d_ok[None, :]
            q = tl.load(q_ptr + t * stride_qt + q_rows[:, None] * stride_qh + d[None, :], mask=rm, other=0.0)
            if Q_FP8:
                # vLLM's fp8 queries (FA3 reads them for the paged heads): the ring heads' own in the
                # model dtype, q * _q_scale rounded once, the values dequantize_query gives
                if Q_SCALE_PER_HEAD:
                    q_s = tl.load(q_scale_ptr + kv_r, mask=r_ok, other=1.0).to(tl.float32)[:, None]
                else:
                    q_s = tl.load(q_scale_ptr).to(tl.float32)
                q = (q.to(tl.float32) * q_s).to(out_ptr.dtype.element_ty)
            # position pos itself: this step's key/value, gathered per query row
            k_self = tl.load(k_ptr + t * stride_kt + kv_r[:, None] * stride_kh + d[None, :], mask=rm, other=0.0)
            v_self = tl.load(v_ptr + t * stride_vt + kv_r[:, None] * stride_vh + d[None, :], mask=rm, other=0.0)
            # the token's own key (from k) starts the softmax: every row's max is finite from
            # the first block on
            m_i = tl.sum(q.to(tl.float32) * k_self.to(tl.float32), axis=1) * scale_log2
            l_i = tl.full([ROWS], 1.0, tl.float32)
            acc = v_self.to(tl.float32)
            if DOT_F32:
                q = q.to(tl.float32)
            # the window's storage rows in BLK-row blocks, loads pipelined NUM_STAGES deep
            # (through shared memory: the whole 80-row window in flight at 5 stages)
            for b in tl.range(0, (SINK + RECENT + BLK - 1) // BLK, num_stages=NUM_STAGES):
                s_b, v_b = _slot_ring_block(
                    ring_k_ptr, ring_v_ptr, stride_rr, stride_rh, slot, h0, num_ring, real, pos, b * BLK,
                    q, hr, scale_log2, k_scale, v_scale, k_ptr, BLK, HEADS, SINK, RECENT, HEAD_DIM, DIM_PAD,
                    DOT_F32, RING_FP8)
                m_new = tl.maximum(m_i, tl.max(s_b, axis=1))
                corr = tl.exp2(m_i - m_new)
                p = tl.exp2(s_b - m_new[:, None])
                l_i = l_i * corr + tl.sum(p, axis=1)
                acc = acc * corr[:, None] + tl.dot(p.to(v_b.dtype), v_b).to(tl.float32)
                m_i = m_new
            res = tl.where(r_real[:, None], acc / l_i[:, None], 0.0)
            tl.store(out_ptr + t * stride_ot + q_rows[:, None] * stride_oh + d[None, :],
                     res.to(out_ptr.dtype.element_ty), mask=r_ok[:, None] & d_ok[None, :])
            # the token's key/value into its ring row (which held pos - recent, read by no one;
            # each slot's one token is its only reader): after the reads, as in _ring_write
            keep = real & ((pos < SINK) | (pos >= seq_len - RECENT))
            if keep:
                hw = tl.arange(0, HEADS)
                w_ok = h0 + hw < num_ring
                src = tl.load(ring_src_ptr + h0 + hw, mask=w_ok, other=0).to(tl.int64)
                wm = w_ok[:, None] & d_ok[None, :]
                kk = tl.load(k_ptr + t * stride_kt + src[:, None] * stride_kh + d[None, :], mask=wm, other=0.0)
                vv = tl.load(v_ptr + t * stride_vt + src[:, None] * stride_vh + d[None, :], mask=wm, other=0.0)
                if RING_FP8:
                    kk = _quantize(kk, k_scale, RING_FP8)
                    vv = _quantize(vv, v_scale, RING_FP8)
                ring_pos = tl.where(pos < SINK, pos, SINK + (tl.maximum(pos - SINK, 0) % RECENT))
                w_off = (slot * (SINK + RECENT) + ring_pos) * stride_rr + (h0 + hw)[:, None] * stride_rh + d[None, :]
                tl.store(ring_k_ptr + w_off, kk.to(ring_k_ptr.dtype.element_ty), mask=wm)
                tl.store(ring_v_ptr + w_off, vv.to(ring_v_ptr.dtype.element_ty), mask=wm)
        if HAS_PAGED:
            _slot_paged_store(
                t, hg, pk, pv, p_st, pq, cache_slot, kc_ptr, vc_ptr, stride_kcb, stride_kcs, stride_kch,
                stride_vcb, stride_vcs, stride_vch, block_size, num_paged, paged_per, qf_ptr, stride_qft, stride_qfh,
                GROUP, GROUP_P2, HEAD_DIM, DIM_PAD, PAGED_BLK, GATHER_Q)


def _check_ring(ring_k: torch.Tensor, ring_v: torch.Tensor) -> None:
    if ring_k.stride() != ring_v.stride() or ring_k.stride(-1) != 1:
        raise ValueError("ring_k and ring_v must share strides, with contiguous head_dim")


def ring_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    rows: StepRows,
    pools: LayerPools,
    scale: float,
    alpha: torch.Tensor | None = None,
) -> None:
    """Lambda-window attention of the ring heads, written into ``out`` in place.

    q, out: [T, Hq, D] (any token/head strides, contiguous D); k, v: [T, Hkv, D]; the ring
    views and ``ring_src`` come from ``pools`` (a ring head's query heads are
    kv_head * G .. kv_head * G + G - 1, G = Hq // Hkv); ``rows`` as in ``views.StepRows``.
    alpha: [Hkv] float32 for gated mode, where ``out`` already holds the full-attention
    result and is mixed in place. Heads of ``out`` not named by ``ring_src`` are left untouched.
    """
    num_tokens, num_q_heads, head_dim = q.shape
    group = num_q_heads // k.shape[1]
    if num_tokens == 0 or pools.num_ring == 0:
        return
    rk, rv, rs, num_ring = _ring_args(k, pools)
    for name, x in (("q", q), ("k", k), ("v", v), ("out", out)):
        if x.stride(-1) != 1:
            raise ValueError(f"{name} needs a contiguous head_dim")
    gated = alpha is not None
    ks, vs, _, ring_fp8 = _fp8_args(k, pools, paged=False, ring=True)
    _ring_attention_kernel[(num_tokens, num_ring)](
        q, k, v, out, rk, rv, rs, alpha if gated else rs,
        rows.query_start_loc, rows.seq_lens, rows.slot_ids, rows.num_rows, scale, ks, vs,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        out.stride(0), out.stride(1), rk.stride(0), rk.stride(1),
        SINK=pools.sink, RECENT=pools.recent, GROUP=group, GROUP_PAD=max(16, _next_pow2(group)),
        HEAD_DIM=head_dim, DIM_PAD=max(16, _next_pow2(head_dim)), BLOCK_C=32, GATED=gated,
        DOT_F32=_interpreting(), RING_FP8=ring_fp8, num_warps=4,
    )


def _fp8_args(k: torch.Tensor, pools: LayerPools, paged: bool, ring: bool) -> tuple:
    """(k_scale, v_scale, paged format, ring format) for a kernel: the fp8 formats (0: none)
    of the pools it touches, and the layer's scales (placeholders where neither is fp8)."""
    paged_fmt = _fp8_format(pools.key_cache) if paged else 0
    ring_fmt = _fp8_format(pools.ring_k) if ring else 0
    if not (paged_fmt or ring_fmt):
        return k, k, 0, 0
    if pools.k_scale is None or pools.v_scale is None:
        raise ValueError("an fp8 KV pool needs the layer's k_scale and v_scale")
    return pools.k_scale, pools.v_scale, paged_fmt, ring_fmt


def _paged_args(k: torch.Tensor, rows: StepRows, pools: LayerPools) -> tuple:
    """(key_cache, value_cache, slot_mapping, paged_src, block_size, num_paged) for a kernel;
    placeholders (never dereferenced) where the layer pages no head."""
    num_paged = pools.num_paged
    if not num_paged:
        return k, k, k, k, 1, 0
    assert pools.key_cache is not None and pools.value_cache is not None and rows.slot_mapping is not None
    return (pools.key_cache, pools.value_cache, rows.slot_mapping, pools.paged_src, pools.key_cache.shape[1],
            num_paged)


def _ring_args(k: torch.Tensor, pools: LayerPools) -> tuple:
    """(ring_k, ring_v, ring_src, num_ring), placeholders where the layer has no ring head."""
    num_ring = pools.num_ring
    if not num_ring:
        return k, k, k, 0
    assert pools.ring_k is not None and pools.ring_v is not None
    _check_ring(pools.ring_k, pools.ring_v)
    return pools.ring_k, pools.ring_v, pools.ring_src, num_ring


def _gather_args(k: torch.Tensor, q: torch.Tensor | None, q_full: torch.Tensor | None) -> tuple:
    """(q, q_full, group, gather) for the optional query gather of the paged heads."""
    if q_full is None:
        return k, k, 1, False
    assert q is not None and q_full.stride(-1) == 1 and q.stride(-1) == 1
    return q, q_full, q.shape[1] // k.shape[1], True


def fused_kv_write(
    k: torch.Tensor,
    v: torch.Tensor,
    rows: StepRows,
    pools: LayerPools,
    q: torch.Tensor | None = None,
    q_full: torch.Tensor | None = None,
) -> None:
    """Store one step's keys/values: paged heads at ``rows.slot_mapping``, ring heads in the ring.

    k, v: [T, Hkv, D]; ``pools`` gives the paged views (padding heads, ``paged_src`` -1,
    store zeros; slot -1 is skipped) and the ring. q: [T, Hq, D] and q_full: [T, P * G, D]:
    if given, the query heads of each paged head are gathered into q_full too (the full
    heads' input of the stock kernel), G = Hq // Hkv. Either pool may be absent.
    """
    num_tokens, _, head_dim = k.shape
    kc, vc, sm, ps, bs, num_paged = _paged_args(k, rows, pools)
    rk, rv, rs, num_ring = _ring_args(k, pools)
    qq, qf, group, gather = _gather_args(k, q, q_full)
    if num_tokens == 0 or num_paged + num_ring == 0:
        return
    ks, vs, paged_fp8, ring_fp8 = _fp8_args(k, pools, paged=num_paged > 0, ring=num_ring > 0)
    _fused_kv_write_kernel[(num_tokens, num_paged + num_ring)](
        k, v, k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        kc, vc, kc.stride(0), kc.stride(1), kc.stride(2), vc.stride(0), vc.stride(1), vc.stride(2),
        sm, bs, ps, num_paged,
        qq, qq.stride(0), qq.stride(1), qf, qf.stride(0), qf.stride(1),
        rk, rv, rk.stride(0), rk.stride(1), rs,
        rows.query_start_loc, rows.seq_lens, rows.slot_ids, rows.num_rows, ks, vs,
        SINK=pools.sink, RECENT=pools.recent, GROUP=group, GROUP_PAD=max(2, _next_pow2(group)),
        HEAD_DIM=head_dim, DIM_PAD=max(16, _next_pow2(head_dim)), GATHER_Q=gather,
        PAGED_FP8=paged_fp8, RING_FP8=ring_fp8, num_warps=1,
    )


# decode_step implementations: "v2" (default) runs _slot_decode_step_kernel, one program per
# token and group of ring heads; "v1" the earlier _decode_step_kernel, one program per token
# and head (kept so a benchmark can compare both in one run; RLKV_DECODE_STEP_VARIANT=v1 picks
# it for an engine run)
DECODE_STEP_VARIANTS = ("v2", "v1")
DECODE_STEP_VARIANT = os.environ.get("RLKV_DECODE_STEP_VARIANT", "v2")


def decode_step(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    q_full: torch.Tensor | None,
    rows: StepRows,
    pools: LayerPools,
    scale: float,
    *,
    variant: str | None = None,
    q_scale: torch.Tensor | None = None,
) -> None:
    """One launch for a batch with at most one query token per row (decode; max_query_len 1).

    Does what ``fused_kv_write`` (with the query gather) and ``ring_attention`` do, in one
    launch: paged heads store their key/value and gather their query heads into ``q_full``;
    ring heads attend over the window, write their output into ``out`` and store the
    token's key/value in the ring. Shapes as in those two functions.
    Only valid when every row has at most one query token: the caller checks
    ``max_query_len == 1`` on the host (a CUDA graph captured that way is replayed only for
    such batches). ``variant``: one of ``DECODE_STEP_VARIANTS`` (None: ``DECODE_STEP_VARIANT``).
    fp8 queries with their ``q_scale``: v2 only (``takes_fp8_queries``), as in ``decode_step_v2``.
    """
    variant = variant or DECODE_STEP_VARIANT
    if variant == "v2":
        decode_step_v2(q, k, v, out, q_full, rows, pools, scale, q_scale=q_scale)
    elif variant == "v1":
        if is_fp8(q.dtype):
            raise ValueError("decode_step v1 takes model-dtype queries: dequantize fp8 ones first")
        _decode_step_v1(q, k, v, out, q_full, rows, pools, scale)
    else:
        raise ValueError(f"decode_step variant {variant!r}: expected one of {DECODE_STEP_VARIANTS}")


def takes_fp8_queries(variant: str | None = None) -> bool:
    """Whether ``decode_step`` (at this variant; None: ``DECODE_STEP_VARIANT``) dequantizes fp8
    queries itself."""
    return (variant or DECODE_STEP_VARIANT) == "v2"


def _check_decode_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor) -> None:
    for name, x in (("q", q), ("k", k), ("v", v), ("out", out)):
        if x.stride(-1) != 1:
            raise ValueError(f"{name} needs a contiguous head_dim")


@dataclass(frozen=True)
class SlotConfig:
    """Launch settings of ``decode_step_v2``: ring heads per program (a power of two), the rows of
    a window block (a power of two, at least 16 // heads), the loop's pipeline depth (loads
    in flight, through shared memory) and num_warps."""

    heads: int = 1
    block: int = 16
    num_stages: int = 5
    num_warps: int = 4


def slot_config(group: int, num_ring: int, head_dim: int, sink: int, recent: int) -> SlotConfig:
    """``decode_step_v2``'s default settings: one ring head a program (the most programs; at the
    serving window 16 + 64 and head_dim 128 its 16-row blocks stage 8 KB of K + V in bf16), the
    whole window in flight (up to 5 blocks of 16 rows), 4 warps. ``scripts/gpu/decode_bench.py``
    times the alternatives."""
    blocks = -(-(sink + recent) // 16)
    return SlotConfig(heads=1, block=16, num_stages=max(1, min(5, blocks)), num_warps=4)


def decode_step_v2(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    q_full: torch.Tensor | None,
    rows: StepRows,
    pools: LayerPools,
    scale: float,
    config: SlotConfig | None = None,
    q_scale: torch.Tensor | None = None,
    **settings: int,
) -> None:
    """``decode_step`` with ``_slot_decode_step_kernel``: a 1-D grid of T x N programs, N =
    ceil(R / heads), a token's programs adjacent; program (t, n) attends ring heads n * heads ..
    of token t and stores its share of the token's paged heads (ceil(P / N) of them). The window
    is read in storage order, ``block`` rows at a time, ``num_stages`` blocks in flight; the
    token's own key comes from ``k``. config / settings (SlotConfig fields): tuning knobs
    (default: ``slot_config``).

    fp8 queries (q in float8, as vLLM hands them to an FA3 fp8 layer): q_scale, float32 [] or
    [Hkv], is vLLM's static query scale; the ring heads attend with ``q * q_scale`` in out's dtype
    (``dequantize_query``'s values, in registers), and ``q_full``, if given, receives the paged
    heads' fp8 queries as they are."""
    num_tokens, num_q_heads, head_dim = q.shape
    kc, vc, sm, ps, bs, num_paged = _paged_args(k, rows, pools)
    rk, rv, rs, num_ring = _ring_args(k, pools)
    _, qf, _, gather = _gather_args(k, q, q_full)
    group = num_q_heads // k.shape[1]
    if num_tokens == 0 or num_paged + num_ring == 0:
        return
    _check_decode_inputs(q, k, v, out)
    ks, vs, paged_fp8, ring_fp8 = _fp8_args(k, pools, paged=num_paged > 0, ring=num_ring > 0)
    cfg = config or slot_config(group, num_ring, head_dim, pools.sink, pools.recent)
    if settings:
        cfg = dataclasses.replace(cfg, **settings)
    heads, blk = cfg.heads, cfg.block
    if heads & (heads - 1) or blk & (blk - 1) or heads * blk < 16:
        raise ValueError(f"decode_step_v2: heads and block must be powers of two, heads * block >= 16: {cfg}")
    group_p2 = _next_pow2(group)
    q_fp8, q_per_head = _query_scale_args(q, k, q_scale)
    progs = -(-num_ring // heads) if num_ring else 1
    paged_per = -(-num_paged // progs) if num_paged else 0
    _slot_decode_step_kernel[(num_tokens * progs,)](
        q, k, v, out, q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        out.stride(0), out.stride(1),
        kc, vc, kc.stride(0), kc.stride(1), kc.stride(2), vc.stride(0), vc.stride(1), vc.stride(2),
        sm, bs, ps, num_paged, paged_per, qf, qf.stride(0), qf.stride(1),
        rk, rv, rk.stride(0), rk.stride(1), rs, num_ring, progs,
        rows.query_start_loc, rows.seq_lens, rows.slot_ids, rows.num_rows, scale * _LOG2E, ks, vs,
        q_scale if q_fp8 else ks,
        SINK=pools.sink, RECENT=pools.recent, GROUP=group, GROUP_P2=group_p2,
        HEAD_DIM=head_dim, DIM_PAD=max(16, _next_pow2(head_dim)), HEADS=heads, ROWS=max(16, heads * group_p2),
        BLK=blk, NUM_STAGES=cfg.num_stages, PAGED_BLK=_next_pow2(max(paged_per, 1)),
        HAS_PAGED=num_paged > 0, HAS_RING=num_ring > 0, GATHER_Q=gather,
        DOT_F32=_interpreting(), PAGED_FP8=paged_fp8, RING_FP8=ring_fp8, Q_FP8=q_fp8, Q_SCALE_PER_HEAD=q_per_head,
        num_warps=cfg.num_warps,
    )


def _query_scale_args(q: torch.Tensor, k: torch.Tensor, q_scale: torch.Tensor | None) -> tuple[bool, bool]:
    """(fp8 queries, a scale per KV head) for ``decode_step_v2``; raises ValueError for fp8 queries
    without a usable scale."""
    if not is_fp8(q.dtype):
        return False, False
    if q_scale is None or q_scale.numel() not in (1, k.shape[1]) or q_scale.device != q.device:
        got = None if q_scale is None else f"{tuple(q_scale.shape)} on {q_scale.device}"
        raise ValueError(f"fp8 queries need q_scale: [] or [{k.shape[1]}] on {q.device}, got {got}")
    return True, q_scale.numel() > 1


def _decode_step_v1(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    q_full: torch.Tensor | None,
    rows: StepRows,
    pools: LayerPools,
    scale: float,
) -> None:
    """``decode_step`` with the earlier ``_decode_step_kernel``: grid (T, P + R), one program per
    token and paged head or ring head (the ring attention in three 32-row blocks)."""
    num_tokens, num_q_heads, head_dim = q.shape
    kc, vc, sm, ps, bs, num_paged = _paged_args(k, rows, pools)
    rk, rv, rs, num_ring = _ring_args(k, pools)
    _, qf, _, gather = _gather_args(k, q, q_full)
    group = num_q_heads // k.shape[1]
    if num_tokens == 0 or num_paged + num_ring == 0:
        return
    _check_decode_inputs(q, k, v, out)
    ks, vs, paged_fp8, ring_fp8 = _fp8_args(k, pools, paged=num_paged > 0, ring=num_ring > 0)
    _decode_step_kernel[(num_tokens, num_paged + num_ring)](
        q, k, v, out, q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        out.stride(0), out.stride(1),
        kc, vc, kc.stride(0), kc.stride(1), kc.stride(2), vc.stride(0), vc.stride(1), vc.stride(2),
        sm, bs, ps, num_paged, qf, qf.stride(0), qf.stride(1),
        rk, rv, rk.stride(0), rk.stride(1), rs,
        rows.query_start_loc, rows.seq_lens, rows.slot_ids, rows.num_rows, scale, ks, vs,
        SINK=pools.sink, RECENT=pools.recent, GROUP=group, GROUP_PAD=max(16, _next_pow2(group)),
        HEAD_DIM=head_dim, DIM_PAD=max(16, _next_pow2(head_dim)), BLOCK_C=32, GATHER_Q=gather,
        DOT_F32=_interpreting(), PAGED_FP8=paged_fp8, RING_FP8=ring_fp8, num_warps=4,
    )
