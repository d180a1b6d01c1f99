"""Batched, padding-aware gated attention: the oracle's semantics for a padded batch.

``reference.oracle_attention`` defines the semantics one sequence at a time. This is the
same function for a whole padded batch in one pass, with gradients (alpha may be a
trainable parameter): what the trainer's learner calls, and what ``hf_reference`` plugs
into a transformers model.

Positions are counted among a row's real tokens: with left padding, right padding or no
padding, key ``j`` of row ``b`` has position ``(number of real keys of row b up to j) - 1``,
exactly the position it has in the oracle run on the unpadded row. So the Lambda window
(``sink`` first positions plus the ``recent`` last) is the oracle's for every row, and
padding never shifts it. Queries are the last ``Tq`` of the ``Tk`` key slots (prefill
when ``Tq == Tk``, decode with a cache when ``Tq < Tk``), as in transformers.
"""

from __future__ import annotations

import torch

# query tokens per block of the score tensor: bounds its [B, Hq, block, Tk] memory
Q_BLOCK = 512


def key_padding(
    batch: int, num_keys: int, device: torch.device,
    attention_mask: torch.Tensor | None = None, seq_lens: torch.Tensor | None = None,
) -> torch.Tensor:
    """bool [B, Tk], True where the key slot holds a real token.

    attention_mask: [B, Tk], nonzero = real (any padding side); seq_lens: [B] real tokens
    per row, right-padded. Neither: every slot is real.
    """
    if attention_mask is not None and seq_lens is not None:
        raise ValueError("give attention_mask or seq_lens, not both")
    if attention_mask is not None:
        if tuple(attention_mask.shape) != (batch, num_keys):
            raise ValueError(f"attention_mask must be [B, Tk] = [{batch}, {num_keys}], got "
                             f"{list(attention_mask.shape)}")
        return attention_mask.to(device=device) != 0
    if seq_lens is not None:
        if tuple(seq_lens.shape) != (batch,):
            raise ValueError(f"seq_lens must be [B] = [{batch}], got {list(seq_lens.shape)}")
        return torch.arange(num_keys, device=device)[None, :] < seq_lens.to(device)[:, None]
    return torch.ones(batch, num_keys, dtype=torch.bool, device=device)


def check_qkv(b: int, hq: int, hk: int, tq: int, tk: int, d: int, k: torch.Tensor, v: torch.Tensor,
              layout: str) -> None:
    """Refuse inconsistent attention inputs (``layout`` names k/v's layout in the message): k and v of one
    shape matching q's batch and head size, query heads a multiple of KV heads, no more queries than keys."""
    if k.shape[0] != b or v.shape[:3] != k.shape[:3] or k.shape[3] != d:
        raise ValueError(f"k and v must be {layout} with B = {b}, D = {d}; got {list(k.shape)}, {list(v.shape)}")
    if hq % hk:
        raise ValueError(f"query heads {hq} not a multiple of KV heads {hk}")
    if tq > tk:
        raise ValueError(f"more queries ({tq}) than keys ({tk})")


def _softmax_rows(scores: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """softmax over the last dim where allowed; rows with nothing allowed (padding queries)
    get a dummy key and are zeroed by the caller, so no NaN reaches values or gradients."""
    allowed = allowed | ~allowed.any(-1, keepdim=True)
    return torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1)


def gated_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float,
    sink: int,
    recent: int,
    alpha: torch.Tensor | None = None,
    full_heads: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    seq_lens: torch.Tensor | None = None,
    compute_dtype: torch.dtype | None = None,
    q_block: int = Q_BLOCK,
) -> torch.Tensor:
    """Full, streaming or gated attention of a padded batch.

    q: [B, Tq, Hq, D]; k, v: [B, Tk, Hk, D] (RoPE applied), Tq <= Tk; query i sits in key
        slot ``Tk - Tq + i``. Hq must be a multiple of Hk (GQA: a KV head's query heads
        share its gate).
    alpha: [Hk] gates: every head is ``alpha * full + (1 - alpha) * streaming``.
    full_heads: bool [Hk], True = full causal attention, False = the Lambda window;
        ignored when alpha is given. Neither: every head full.
    attention_mask / seq_lens: which key slots are real (see ``key_padding``).
    compute_dtype: default float32 (float64 for float64 inputs).
    Returns [B, Tq, Hq, D] in q's dtype; outputs of padding queries are zero.
    """
    b, tq, hq, d = q.shape
    tk, hk = k.shape[1], k.shape[2]
    check_qkv(b, hq, hk, tq, tk, d, k, v, "[B, Tk, Hk, D]")
    g = hq // hk
    dev = q.device
    cdt = compute_dtype or (torch.float64 if q.dtype == torch.float64 else torch.float32)

    real_k = key_padding(b, tk, dev, attention_mask, seq_lens)  # [B, Tk]
    pos_k = real_k.long().cumsum(1) - 1  # position among the row's real tokens
    slot_k = torch.arange(tk, device=dev)
    slot_q = slot_k[tk - tq:]
    real_q, pos_q = real_k[:, tk - tq:], pos_k[:, tk - tq:]
    sink_k = (pos_k < sink)[:, None, :]  # [B, 1, Tk]

    gated = alpha is not None
    if gated:
        mix = alpha.to(device=dev, dtype=cdt).reshape(1, hk, 1, 1, 1)
        need_full = need_stream = True
    else:
        full = None if full_heads is None else full_heads.to(device=dev, dtype=torch.bool).reshape(hk)
        need_full = full is None or bool(full.any())
        need_stream = full is not None and not bool(full.all())

    qc = q.to(cdt).reshape(b, tq, hk, g, d)
    # padding slots may hold anything (NaN included): a zero weight times NaN is still NaN
    keep = real_k[:, :, None, None]
    kc = torch.where(keep, k.to(cdt), 0.0)
    vc = torch.where(keep, v.to(cdt), 0.0)
    outs = []
    for s in range(0, tq, q_block):
        e = min(tq, s + q_block)
        scores = torch.einsum("bqhgd,bkhd->bhgqk", qc[:, s:e], kc) * scale  # [B, Hk, G, q, Tk]
        causal = (slot_k[None, None, :] <= slot_q[None, s:e, None]) & real_k[:, None, :]  # [B, q, Tk]
        causal = causal & real_q[:, s:e, None]
        probs = None
        if need_full:
            probs = _softmax_rows(scores, causal[:, None, None])
        if need_stream:
            window = causal & (sink_k | (pos_k[:, None, :] > pos_q[:, s:e, None] - recent))
            p_stream = _softmax_rows(scores, window[:, None, None])
            if probs is None:
                probs = p_stream
            elif gated:
                # attention is linear in its weights: mixing them equals mixing the outputs
                probs = mix * probs + (1.0 - mix) * p_stream
            else:
                probs = torch.where(full.reshape(1, hk, 1, 1, 1), probs, p_stream)
        out = torch.einsum("bhgqk,bkhd->bqhgd", probs, vc)
        outs.append(out * real_q[:, s:e, None, None, None])
    return torch.cat(outs, dim=1).reshape(b, tq, hq, d).to(q.dtype)
