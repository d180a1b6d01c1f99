"""Fused gated attention: ``batched.gated_attention``'s semantics without a [Tq, Tk] tensor.

``batched.gated_attention`` mixes the two branches' probabilities, ``mix * probs + (1 - mix) *
p_stream``, over the whole [B, Hq, q_block, Tk] score block: on a GPU learner (an 8B model,
~8K-token micro-batches) those tensors exhaust the memory. Attention is linear in its weights,
so mixing the normalised probabilities equals mixing the two outputs, per query head h of KV
head h // G:

    out = alpha[h // G] * full_attention + (1 - alpha[h // G]) * streaming_attention

and each branch is a fused kernel that never holds the scores:

- streaming: ``torch.nn.attention.flex_attention`` with a ``BlockMask`` whose ``mask_mod`` is
  key real & query real & pos_k <= pos_q & (pos_k < sink | pos_q - pos_k < recent);
- full: flex_attention with the causal + padding mask, or ``scaled_dot_product_attention``
  with ``is_causal`` (FlashAttention on CUDA in bf16) where the padding allows it: every query is
  a key (Tq == Tk) and each row's padding is on the right only (so no real query sees a padding
  key; padding queries are zeroed afterwards). The learner's batches are right-padded.

Positions are counted among a row's real tokens exactly as in ``batched`` (left padding
included): key slot j of row b has position (real keys of row b up to j) - 1, and the queries
are the last Tq of the Tk key slots. Padding queries give zeros; padding key and value slots may
hold anything (NaN included), they are zeroed before the kernels. Gradients flow to alpha and
through q, k and v.

A ``PaddingMasks`` holds one batch's padding and builds each ``BlockMask`` once (from the
padding alone, in query chunks, never a [Tq, Tk] tensor of the whole batch); every layer of a
forward shares it (``hf_reference`` builds it in the mask interface, which transformers calls
once per forward), gradient checkpointing's recomputation included.

Devices: on CUDA flex_attention runs compiled (``torch.compile``, once per process, lazily).
On the CPU it runs eagerly (torch's unfused reference implementation, which materialises the
scores: tests only), and torch refuses flex_attention's backward on the CPU, so a CPU forward
must not need q/k/v gradients (alpha's gradient is fine: it flows through the mix alone).
"""

from __future__ import annotations

import warnings
from typing import Any, Callable

import torch

from .batched import check_qkv, key_padding

# flex_attention's sparse block (tokens per side of a BlockMask tile)
BLOCK = 128
# bound on the bool elements of one chunk of the dense mask evaluated to build a BlockMask
_MASK_CHUNK_ELEMS = 1 << 22

# the full branch's window: no position reaches it, so the Lambda mask is plain causal
_NO_WINDOW = 2**62
# torch.compile's graphs per function before it falls back to eager flex_attention (which would
# materialise the scores): batch sizes and lengths of 1 block get graphs of their own
_RECOMPILE_LIMIT = 64

_compiled_flex: Callable[..., torch.Tensor] | None = None


def _flex(device: torch.device) -> Callable[..., torch.Tensor]:
    """flex_attention: compiled on CUDA (built on first use; raises torch._dynamo's recompile limit
    to ``_RECOMPILE_LIMIT``, process-wide), eager elsewhere."""
    global _compiled_flex
    from torch.nn.attention.flex_attention import flex_attention

    if device.type != "cuda":
        return _eager_flex
    if _compiled_flex is None:
        import torch._dynamo

        cfg = torch._dynamo.config
        for name in ("recompile_limit", "cache_size_limit"):  # the name changed across torch versions
            if isinstance(getattr(cfg, name, None), int) and getattr(cfg, name) < _RECOMPILE_LIMIT:
                setattr(cfg, name, _RECOMPILE_LIMIT)
        # automatic dynamic shapes: the inputs' batch and length dims are marked dynamic
        # (``_dynamic``), so micro-batches of new shapes reuse the graphs
        _compiled_flex = torch.compile(flex_attention)
    return _compiled_flex


def _dynamic(t: torch.Tensor, *dims: int) -> torch.Tensor:
    """Tell torch.compile these dims change from call to call (no error if it specialises them)."""
    import torch._dynamo

    for d in dims:
        torch._dynamo.maybe_mark_dynamic(t, d)
    return t


def _eager_flex(*args: Any, **kwargs: Any) -> torch.Tensor:
    from torch.nn.attention.flex_attention import flex_attention

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
        return flex_attention(*args, **kwargs)


def _mask_mod(real_k: torch.Tensor, pos_k: torch.Tensor, real_q: torch.Tensor, pos_q: torch.Tensor,
              sink: torch.Tensor, recent: torch.Tensor) -> Callable[..., torch.Tensor]:
    """flex_attention mask_mod(b, h, q_idx, kv_idx) -> bool: key real & query real & causal by
    position & (pos_k < sink | pos_q - pos_k < recent). real_k, pos_k: [B, Tk'] and real_q, pos_q:
    [B, Tq'] (padded to whole blocks); sink, recent: int64 0-dim tensors (the full causal branch
    passes values no position reaches). One code object and tensor-held windows: a compiled
    flex_attention sees the same function for both branches and every batch, so it does not
    recompile per branch or per window (it guards on the code and on Python ints' values).
    Also evaluated on broadcast index tensors to build the blocks."""
    def lambda_mask(b: Any, h: Any, q_idx: Any, kv_idx: Any) -> Any:
        pk, pq = pos_k[b, kv_idx], pos_q[b, q_idx]
        return real_k[b, kv_idx] & real_q[b, q_idx] & (pk <= pq) & ((pk < sink) | (pq - pk < recent))
    return lambda_mask


def _ordered(dense: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """bool [B, nq, nk] block map -> (int32 [B, 1, nq] counts, int32 [B, 1, nq, nk] indices, the
    listed blocks first), BlockMask's layout."""
    d = dense.to(torch.int32)
    num = d.sum(-1).to(torch.int32)
    idx = torch.argsort(d, dim=-1, descending=True, stable=True).to(torch.int32)
    return num[:, None].contiguous(), idx[:, None].contiguous()


class PaddingMasks:
    """One padded batch's keys, and its BlockMasks built once and reused by every layer.

    real_k: bool [B, Tk], True where the key slot holds a real token (None: every slot real).
    ``padded`` (any padding) and ``right_padded`` (every row's padding on its right, none
    included) are read once here (one host sync per batch).
    """

    def __init__(self, real_k: torch.Tensor | None, batch: int, num_keys: int, device: torch.device) -> None:
        if real_k is None:
            real_k = torch.ones(batch, num_keys, dtype=torch.bool, device=device)
        if tuple(real_k.shape) != (batch, num_keys):
            raise ValueError(f"padding mask must be [B, Tk] = [{batch}, {num_keys}], got {list(real_k.shape)}")
        self.real_k = real_k.to(device=device, dtype=torch.bool)
        self.batch, self.num_keys, self.device = batch, num_keys, self.real_k.device
        self.pos_k = self.real_k.long().cumsum(1) - 1  # [B, Tk] position among the row's real tokens
        counts = self.real_k.sum(1, keepdim=True)
        prefix = torch.arange(num_keys, device=self.device)[None, :] < counts
        flags = torch.stack([~self.real_k.all(), (self.real_k == prefix).all()]).cpu()
        self.padded, self.right_padded = bool(flags[0]), bool(flags[1])
        self._blocks: dict[tuple[Any, ...], Any] = {}
        self._moved: dict[torch.device, PaddingMasks] = {}

    def on(self, device: torch.device) -> "PaddingMasks":
        """These masks on ``device``: self, or one copy per device (built once, so the layers that
        ask for it still share its BlockMasks)."""
        device = torch.device(device)
        if device == self.device or (device.type == self.device.type and device.index is None):
            return self
        if device not in self._moved:
            self._moved[device] = PaddingMasks(self.real_k.to(device), self.batch, self.num_keys, device)
        return self._moved[device]

    @classmethod
    def of(cls, attention_mask: Any, batch: int, num_keys: int, device: torch.device,
           seq_lens: torch.Tensor | None = None) -> "PaddingMasks":
        """From a PaddingMasks (itself, on ``device``), a [B, Tk] mask (nonzero = real), seq_lens or None."""
        if isinstance(attention_mask, PaddingMasks):
            if seq_lens is not None:
                raise ValueError("give attention_mask or seq_lens, not both")
            if (attention_mask.batch, attention_mask.num_keys) != (batch, num_keys):
                raise ValueError(f"padding masks of [{attention_mask.batch}, {attention_mask.num_keys}] for "
                                 f"[{batch}, {num_keys}] keys")
            return attention_mask.on(device)
        return cls(key_padding(batch, num_keys, device, attention_mask, seq_lens), batch, num_keys, device)

    def block_mask(self, num_queries: int, window: tuple[int, int] | None) -> Any:
        """The BlockMask [B, 1, Tq, Tk] of the full causal branch (window None) or of the streaming
        branch (window = (sink, recent)); queries are the last ``num_queries`` key slots."""
        key = (num_queries, window)
        if key not in self._blocks:
            self._blocks[key] = self._build(num_queries, window)
        return self._blocks[key]

    def _build(self, tq: int, window: tuple[int, int] | None) -> Any:
        from torch.nn.attention.flex_attention import BlockMask

        b, tk, dev = self.batch, self.num_keys, self.device
        nq, nk = -(-tq // BLOCK), -(-tk // BLOCK)

        def pad(x: torch.Tensor, n: int, fill: Any) -> torch.Tensor:
            return torch.nn.functional.pad(x, (0, n * BLOCK - x.shape[1]), value=fill).contiguous()

        # padded to whole blocks, so the kernels' block-wide index loads stay in bounds
        real_k, pos_k = pad(self.real_k, nk, False), pad(self.pos_k, nk, 0)
        real_q, pos_q = pad(self.real_k[:, tk - tq:], nq, False), pad(self.pos_k[:, tk - tq:], nq, 0)
        sink, recent = window if window is not None else (_NO_WINDOW, _NO_WINDOW)
        mod = _mask_mod(real_k, pos_k, real_q, pos_q, torch.tensor(sink, device=dev), torch.tensor(recent, device=dev))
        any_ = torch.empty(b, nq, nk, dtype=torch.bool, device=dev)
        all_ = torch.empty_like(any_)
        rows = max(1, _MASK_CHUNK_ELEMS // max(1, b * nk * BLOCK * BLOCK))  # query blocks per chunk
        bi = torch.arange(b, device=dev)[:, None, None]
        ki = torch.arange(nk * BLOCK, device=dev)[None, None, :]
        for s in range(0, nq, rows):
            e = min(nq, s + rows)
            qi = torch.arange(s * BLOCK, e * BLOCK, device=dev)[None, :, None]
            m = mod(bi, 0, qi, ki).view(b, e - s, BLOCK, nk, BLOCK)  # [B, q blocks, BLOCK, nk, BLOCK]
            any_[:, s:e] = m.any(4).any(2)
            all_[:, s:e] = m.all(4).all(2)
        kv_num, kv_idx = _ordered(any_ & ~all_)
        full_num, full_idx = _ordered(all_)
        bm = BlockMask.from_kv_blocks(kv_num, kv_idx, full_num, full_idx, BLOCK_SIZE=BLOCK, mask_mod=mod,
                                      seq_lengths=(tq, tk))
        # batch and block counts change from batch to batch (the head dim, 1, does not)
        for t in (real_k, pos_k, real_q, pos_q):
            _dynamic(t, 0, 1)
        for t in (bm.kv_num_blocks, bm.kv_indices, bm.full_kv_num_blocks, bm.full_kv_indices, bm.q_num_blocks,
                  bm.q_indices, bm.full_q_num_blocks, bm.full_q_indices):
            if t is not None:
                _dynamic(t, 0, *range(2, t.dim()))
        return bm


class _Mix(torch.autograd.Function):
    """out = mix[h] * full + (1 - mix[h]) * stream, in mix's dtype, returned in full's dtype.

    full, stream: [B, H, T, D]; mix: [H] (float32 or float64). Saves only the two branch
    outputs (their kernels keep them for their own backward anyway), no float32 copies."""

    @staticmethod
    def forward(ctx: Any, full: torch.Tensor, stream: torch.Tensor, mix: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(full, stream, mix)
        w = mix.reshape(1, -1, 1, 1)
        return torch.lerp(stream.to(mix.dtype), full.to(mix.dtype), w).to(full.dtype)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        full, stream, mix = ctx.saved_tensors
        g = grad.to(mix.dtype)
        w = mix.reshape(1, -1, 1, 1)
        d_full = (g * w).to(full.dtype) if ctx.needs_input_grad[0] else None
        d_stream = (g * (1 - w)).to(stream.dtype) if ctx.needs_input_grad[1] else None
        d_mix = None
        if ctx.needs_input_grad[2]:
            d_mix = (g * (full.to(mix.dtype) - stream.to(mix.dtype))).sum(dim=(0, 2, 3))
        return d_full, d_stream, d_mix


def _branch_plan(alpha: torch.Tensor | None, full_heads: torch.Tensor | None, hk: int,
                 device: torch.device) -> tuple[bool, bool]:
    """(need_full, need_stream). A gate needing its gradient keeps both branches: d out / d alpha is
    full - streaming even at alpha = 1."""
    if alpha is not None:
        if torch.is_grad_enabled() and alpha.requires_grad:
            return True, True
        a = alpha.detach().reshape(hk)
        flags = torch.stack([(a == 1).all(), (a == 0).all()]).cpu()
        return not bool(flags[1]), not bool(flags[0])
    if full_heads is None:
        return True, False
    f = full_heads.to(device=device, dtype=torch.bool).reshape(hk)
    flags = torch.stack([f.any(), f.all()]).cpu()
    return bool(flags[0]), not bool(flags[1])


def fused_attention_bhtd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    masks: PaddingMasks,
    *,
    scale: float,
    sink: int,
    recent: int,
    alpha: torch.Tensor | None = None,
    full_heads: torch.Tensor | None = None,
    compute_dtype: torch.dtype | None = None,
    full_branch: str = "auto",
) -> torch.Tensor:
    """``fused_gated_attention`` in the kernels' layout.

    q: [B, Hq, Tq, D]; k, v: [B, Hk, Tk, D]; masks: the batch's ``PaddingMasks`` (B, Tk).
    Returns [B, Hq, Tq, D] in q's dtype.
    """
    b, hq, tq, d = q.shape
    hk, tk = k.shape[1], k.shape[2]
    check_qkv(b, hq, hk, tq, tk, d, k, v, "[B, Hk, Tk, D]")
    if full_branch not in ("auto", "flex", "sdpa"):
        raise ValueError(f"full_branch must be 'auto', 'flex' or 'sdpa', got {full_branch!r}")
    g = hq // hk
    dev = q.device
    out_dtype = q.dtype
    mix_dtype = torch.float64 if q.dtype == torch.float64 or compute_dtype == torch.float64 else torch.float32
    if compute_dtype is not None:
        q, k, v = q.to(compute_dtype), k.to(compute_dtype), v.to(compute_dtype)
    need_full, need_stream = _branch_plan(alpha, full_heads, hk, dev)

    if masks.padded:
        # padding slots may hold anything (NaN included): a zero weight times NaN is still NaN,
        # in the outputs and in the kernels' backward (dK sums dS * q over every query)
        keep = masks.real_k[:, None, :, None]
        k = torch.where(keep, k, 0.0)
        v = torch.where(keep, v, 0.0)
        q = torch.where(keep[:, :, tk - tq:], q, 0.0)
    flex = _flex(dev)

    q, k, v = (_dynamic(x, 0, 2) for x in (q, k, v))  # batch and length change between micro-batches

    def flex_branch(window: tuple[int, int] | None) -> torch.Tensor:
        return flex(q, k, v, block_mask=masks.block_mask(tq, window), scale=scale, enable_gqa=g > 1)

    out_full = out_stream = None
    if need_full:
        sdpa_ok = tq == tk and masks.right_padded
        if full_branch == "sdpa" and not sdpa_ok:
            raise ValueError("full_branch 'sdpa' needs Tq == Tk and right padding only")
        if full_branch != "flex" and sdpa_ok:
            # right padding: a real query's causal keys are all real; padding queries are zeroed
            kr, vr = (x.repeat_interleave(g, dim=1) if g > 1 else x for x in (k, v))
            out_full = torch.nn.functional.scaled_dot_product_attention(q, kr, vr, is_causal=True, scale=scale)
            if masks.padded:
                out_full = torch.where(masks.real_k[:, None, :, None], out_full, 0.0)
        else:
            out_full = flex_branch(None)
    if need_stream:
        out_stream = flex_branch((sink, recent))

    if out_stream is None:
        out = out_full
    elif out_full is None:
        out = out_stream
    elif alpha is not None:
        mix = alpha.to(device=dev, dtype=mix_dtype).reshape(hk).repeat_interleave(g)
        out = _Mix.apply(out_full, out_stream, mix)
    else:
        full = full_heads.to(device=dev, dtype=torch.bool).reshape(hk).repeat_interleave(g).reshape(1, hq, 1, 1)
        out = torch.where(full, out_full, out_stream)
    return out.to(out_dtype)


def fused_gated_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float,
    sink: int,
    recent: int,
    alpha: torch.Tensor | None = None,
    full_heads: torch.Tensor | None = None,
    attention_mask: Any = None,
    seq_lens: torch.Tensor | None = None,
    compute_dtype: torch.dtype | None = None,
    full_branch: str = "auto",
) -> torch.Tensor:
    """Full, streaming or gated attention of a padded batch: ``batched.gated_attention``, fused.

    q: [B, Tq, Hq, D]; k, v: [B, Tk, Hk, D] (RoPE applied), Tq <= Tk; query i sits in key slot
        ``Tk - Tq + i``. Hq a multiple of Hk (a KV head's query heads share its gate).
    alpha: [Hk] gates: every head is ``alpha * full + (1 - alpha) * streaming``.
    full_heads: bool [Hk], True = full causal, False = the Lambda window; ignored when alpha is
        given. Neither: every head full.
    attention_mask: [B, Tk] (nonzero = real, any padding side) or a ``PaddingMasks`` (reuses its
        BlockMasks); seq_lens: [B] real tokens per row, right-padded. Neither: no padding.
    compute_dtype: the kernels' input dtype (default q's: bf16 runs bf16 kernels, which
        accumulate in float32); the gates mix in float32 (float64 for float64).
    full_branch: "auto" (SDPA where the padding allows, else flex), "flex" or "sdpa".
    Returns [B, Tq, Hq, D] in q's dtype; outputs of padding queries are zero.
    """
    b, tk = k.shape[0], k.shape[1]
    masks = PaddingMasks.of(attention_mask, b, tk, q.device, seq_lens)
    out = fused_attention_bhtd(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), masks, scale=scale,
                               sink=sink, recent=recent, alpha=alpha, full_heads=full_heads,
                               compute_dtype=compute_dtype, full_branch=full_branch)
    return out.transpose(1, 2)
