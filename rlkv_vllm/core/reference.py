"""The oracle: PyTorch reference attention for full, streaming and gated heads.

Every other path (the vLLM backend on CPU and GPU, the Triton kernels, the
trainer's learner) is tested against these functions.

- full head: causal attention over all previous tokens.
- streaming head: attention over sink keys (position < sink) and the recent
  window (position > p - recent) of query position p. Prompt tokens get the same
  rule (a Lambda-shaped mask), so results do not depend on chunking or batching.
- gated: ``alpha * full + (1 - alpha) * streaming`` per KV head (its query heads share it).
"""

from __future__ import annotations

import torch


def lambda_mask(q_pos: torch.Tensor, k_pos: torch.Tensor, sink: int, recent: int) -> torch.Tensor:
    """Keys a streaming query may see.

    q_pos: [Tq] absolute positions; k_pos: [Tk]. Returns bool [Tq, Tk].
    """
    q = q_pos[:, None]
    k = k_pos[None, :]
    return (k <= q) & ((k < sink) | (k > q - recent))


def causal_mask(q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
    """bool [Tq, Tk]: key at or before the query."""
    return k_pos[None, :] <= q_pos[:, None]


def _masked_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor, scale: float
) -> torch.Tensor:
    """q: [Tq, Hk, G, D]; k, v: [Tk, Hk, D]; allowed: [Tq, Tk]. Returns [Tq, Hk, G, D]."""
    scores = torch.einsum("qhgd,khd->hgqk", q, k) * scale
    scores = scores.masked_fill(~allowed[None, None], float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    return torch.einsum("hgqk,khd->qhgd", probs, v)


def oracle_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float,
    full_heads: torch.Tensor | None = None,
    alpha: torch.Tensor | None = None,
    sink: int = 16,
    recent: int = 64,
    q_start: int | None = None,
    compute_dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """Reference attention of one sequence.

    q: [Tq, Hq, D], queries at positions q_start .. q_start + Tq - 1
       (default q_start = Tk - Tq: the last Tq tokens).
    k, v: [Tk, Hk, D], keys at positions 0 .. Tk - 1 (RoPE already applied).
    full_heads: bool [Hk], True = full cache; default all full. Ignored if alpha is given.
    alpha: [Hk] gate values; when given, every head is gated:
       alpha * full + (1 - alpha) * streaming.
    Returns [Tq, Hq, D] in q's dtype.
    """
    tq, hq, d = q.shape
    tk, hk, _ = k.shape
    if hq % hk:
        raise ValueError(f"query heads {hq} not a multiple of KV heads {hk}")
    g = hq // hk
    if q_start is None:
        q_start = tk - tq
    dev = q.device
    q_pos = torch.arange(q_start, q_start + tq, device=dev)
    k_pos = torch.arange(tk, device=dev)
    qc = q.to(compute_dtype).view(tq, hk, g, d)
    kc, vc = k.to(compute_dtype), v.to(compute_dtype)

    full_out = _masked_attention(qc, kc, vc, causal_mask(q_pos, k_pos), scale)
    need_stream = alpha is not None or (full_heads is not None and not bool(full_heads.all()))
    if not need_stream:
        return full_out.reshape(tq, hq, d).to(q.dtype)
    stream_out = _masked_attention(qc, kc, vc, lambda_mask(q_pos, k_pos, sink, recent), scale)
    if alpha is not None:
        a = alpha.to(device=dev, dtype=compute_dtype).view(1, hk, 1, 1)
        out = a * full_out + (1 - a) * stream_out
    else:
        keep = full_heads.to(device=dev).view(1, hk, 1, 1)
        out = torch.where(keep, full_out, stream_out)
    return out.reshape(tq, hq, d).to(q.dtype)


def oracle_varlen(
    q: torch.Tensor,
    k_seqs: list[torch.Tensor],
    v_seqs: list[torch.Tensor],
    query_start_loc: list[int],
    **kwargs,
) -> torch.Tensor:
    """Reference for a ragged batch, one row at a time.

    q: [T, Hq, D], rows packed by query_start_loc (len B + 1).
    k_seqs[i], v_seqs[i]: [seq_len_i, Hk, D], the whole context of row i; its
    queries are its last (query_start_loc[i+1] - query_start_loc[i]) positions.
    """
    outs = []
    for i in range(len(k_seqs)):
        s, e = query_start_loc[i], query_start_loc[i + 1]
        outs.append(oracle_attention(q[s:e], k_seqs[i], v_seqs[i], **kwargs))
    return torch.cat(outs, dim=0)
