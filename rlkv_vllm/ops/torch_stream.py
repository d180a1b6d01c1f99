"""Streaming-head attention in plain PyTorch (the CPU path, and the GPU fallback).

A streaming head of query position p sees C = sink + recent candidate keys:
positions 0 .. sink-1 (valid if <= p) and p-recent+1 .. p (valid if >= sink).
In serve mode those keys live in a per-request ring of C slots
(position j -> j if j < sink else sink + (j - sink) % recent), except keys of the
current chunk, which are read from this step's key/value tensors and written to the
ring only after attention (a chunk longer than the window would otherwise overwrite
keys its own earlier queries still need).

All index work happens once per step in ``build_stream_plan`` and is shared by every
layer; it stays on the device with no host synchronisation.

FP8 rings (``--kv-cache-dtype fp8``): the ring holds ``clamp(x / scale)`` cast to fp8 with
the layer's k/v scale, as vLLM's ``reshape_and_cache`` stores the paged cache, and reads
dequantise (``fp8 -> float32 * scale``). This chunk's own keys are read from k/v unquantised.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..core.plan import ring_index

def quantize_kv(x: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """vLLM's scaled fp8 store: ``clamp(x / scale, -max, max)`` cast to ``dtype`` (round to
    nearest even; saturating, as vLLM's reshape_and_cache). x: any shape; scale: [] or [1]
    float32 (the layer's ``_k_scale`` / ``_v_scale``)."""
    fmax = float(torch.finfo(dtype).max)
    return (x.float() / scale.float()).clamp_(-fmax, fmax).to(dtype)


def dequantize_kv(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """An fp8 ring read: float32 ``x * scale`` (x: any shape, fp8)."""
    return x.float() * scale.float()


# Tokens per block when materialising gathered keys: bounds the temporary
# [block, C, heads, head_dim] tensors.
TOKEN_BLOCK = 256


@dataclass
class StreamPlan:
    """Per-step gather/scatter indices for streaming heads (shape [T, C] unless noted).

    cand_pos: candidate key positions; valid: whether each candidate is attended.
    from_ring: candidate is read from the ring (earlier steps) rather than this chunk.
    ring_idx: flat row in a ring viewed as [(num_slots + 1) * C, heads, head_dim].
    tok_idx: row in this step's key/value tensors.
    write_dst: [T] flat ring row each token is written to after attention (tokens
        that no later query reads go to the scratch slot).
    token_row: [T] batch row of each token; positions: [T] absolute positions.
    """

    sink: int
    recent: int
    num_tokens: int
    cand_pos: torch.Tensor
    valid: torch.Tensor
    from_ring: torch.Tensor
    ring_idx: torch.Tensor
    tok_idx: torch.Tensor
    write_dst: torch.Tensor
    token_row: torch.Tensor
    positions: torch.Tensor

    @property
    def window(self) -> int:
        return self.sink + self.recent


def token_rows_and_positions(
    query_start_loc: torch.Tensor, seq_lens: torch.Tensor, num_tokens: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For packed query tokens: (batch row [T], absolute position [T], chunk start [B]).

    query_start_loc: [B + 1] int; seq_lens: [B] int (context length after this step).
    Tokens past query_start_loc[B] (padding) are given the last row.
    """
    dev = query_start_loc.device
    qsl = query_start_loc.to(torch.int64)
    b = seq_lens.shape[0]
    t = torch.arange(num_tokens, device=dev, dtype=torch.int64)
    row = torch.searchsorted(qsl[1 : b + 1].contiguous(), t, right=True).clamp_(max=max(b - 1, 0))
    q_lens = qsl[1 : b + 1] - qsl[:b]
    ctx_start = seq_lens.to(torch.int64) - q_lens
    pos = ctx_start[row] + (t - qsl[row])
    return row, pos, ctx_start


def build_stream_plan(
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    slot_ids: torch.Tensor,
    num_tokens: int,
    sink: int,
    recent: int,
    scratch_slot: int,
) -> StreamPlan:
    """Indices for one step. slot_ids: [B] ring slot of each batch row."""
    dev = query_start_loc.device
    c = sink + recent
    row, pos, ctx_start = token_rows_and_positions(query_start_loc, seq_lens, num_tokens)
    qsl = query_start_loc.to(torch.int64)
    n_real = qsl[seq_lens.shape[0]] if seq_lens.shape[0] else torch.zeros((), dtype=torch.int64, device=dev)
    t = torch.arange(num_tokens, device=dev, dtype=torch.int64)
    real = t < n_real

    sinks = torch.arange(sink, device=dev, dtype=torch.int64).expand(num_tokens, sink)
    recents = pos[:, None] - recent + 1 + torch.arange(recent, device=dev, dtype=torch.int64)
    cand = torch.cat([sinks, recents], dim=1)
    valid = torch.cat([sinks <= pos[:, None], recents >= sink], dim=1) & real[:, None]
    # padding tokens attend to one dummy key so their softmax stays finite
    valid[:, c - 1] |= ~real

    start = ctx_start[row][:, None]
    from_ring = cand < start
    slot = slot_ids.to(torch.int64)[row]
    cand_safe = cand.clamp(min=0)
    ring_idx = slot[:, None] * c + ring_index(cand_safe, sink, recent)
    tok_idx = (qsl[row][:, None] + cand - start).clamp_(0, max(num_tokens - 1, 0))

    keep = (pos < sink) | (pos >= seq_lens.to(torch.int64)[row] - recent)
    keep &= real
    dst_real = slot * c + ring_index(pos, sink, recent)
    dst_scratch = scratch_slot * c + torch.remainder(pos, c)
    write_dst = torch.where(keep, dst_real, dst_scratch)
    return StreamPlan(
        sink=sink,
        recent=recent,
        num_tokens=num_tokens,
        cand_pos=cand,
        valid=valid,
        from_ring=from_ring,
        ring_idx=ring_idx,
        tok_idx=tok_idx,
        write_dst=write_dst,
        token_row=row,
        positions=pos,
    )


def gathered_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    valid: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Attention over per-token gathered keys, in float32.

    q: [T, H, G, D]; k, v: [T, C, H, D]; valid: [T, C]. Returns [T, H, G, D] float32.
    Invalid candidates may point at never-written memory: they are zeroed, so even
    NaN garbage there cannot leak into the output through a zero weight.
    """
    keep = valid[:, :, None, None]
    k = torch.where(keep, k, 0)
    v = torch.where(keep, v, 0)
    scores = torch.einsum("thgd,tchd->thgc", q.float(), k.float()) * scale
    scores.masked_fill_(~valid[:, None, None, :], float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    return torch.einsum("thgc,tchd->thgd", probs, v.float())


def ring_stream_attention(
    q: torch.Tensor,
    k_tok: torch.Tensor,
    v_tok: torch.Tensor,
    ring_k: torch.Tensor,
    ring_v: torch.Tensor,
    plan: StreamPlan,
    scale: float,
    out: torch.Tensor,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> None:
    """Serve mode: streaming heads read earlier keys from the ring, this chunk's from k_tok.

    q: [T, H, G, D] (streaming query heads grouped by KV head); k_tok, v_tok: [T, H, D];
    ring_k, ring_v: [(slots + 1) * C, H, D]; out: [T, H, G, D], written in place.
    k_scale, v_scale: [] or [1] float32, given for an fp8 ring (its reads are dequantised).
    Does not write the ring (see ``ring_write``).
    """
    n = plan.num_tokens
    for s in range(0, n, TOKEN_BLOCK):
        e = min(n, s + TOKEN_BLOCK)
        fr = plan.from_ring[s:e, :, None, None]
        rk, rv = ring_k[plan.ring_idx[s:e]], ring_v[plan.ring_idx[s:e]]
        if k_scale is not None:
            rk, rv = dequantize_kv(rk, k_scale), dequantize_kv(rv, v_scale)
        kk = torch.where(fr, rk, k_tok[plan.tok_idx[s:e]])
        vv = torch.where(fr, rv, v_tok[plan.tok_idx[s:e]])
        out[s:e] = gathered_attention(q[s:e], kk, vv, plan.valid[s:e], scale).to(out.dtype)


def ring_write(
    ring_k: torch.Tensor, ring_v: torch.Tensor, k_tok: torch.Tensor, v_tok: torch.Tensor, plan: StreamPlan,
    k_scale: torch.Tensor | None = None, v_scale: torch.Tensor | None = None,
) -> None:
    """Store this step's streaming keys/values in the ring (after attention read it).

    k_scale, v_scale: given for an fp8 ring, which stores ``quantize_kv(x, scale)``."""
    n = plan.num_tokens
    if k_scale is None:
        ring_k.index_copy_(0, plan.write_dst, k_tok[:n].to(ring_k.dtype))
        ring_v.index_copy_(0, plan.write_dst, v_tok[:n].to(ring_v.dtype))
        return
    # index_copy_ has no fp8 kernel (CPU): copy the bytes
    ring_k.view(torch.uint8).index_copy_(0, plan.write_dst, quantize_kv(k_tok[:n], k_scale, ring_k.dtype)
                                         .view(torch.uint8))
    ring_v.view(torch.uint8).index_copy_(0, plan.write_dst, quantize_kv(v_tok[:n], v_scale, ring_v.dtype)
                                         .view(torch.uint8))
