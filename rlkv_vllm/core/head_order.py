"""Head permutation at weight load: a layer's full KV heads first, as a contiguous prefix.

With ``rlkv.permute_heads`` the plugin reorders, once after the weights are loaded, each
serve-mode layer's KV heads (each with its GQA query heads) so its full heads come first:
the rows of the fused QKV projection and the input columns of o_proj are permuted, so the
layer's output is unchanged, and the full part of q / k / v / out is a contiguous slice
(no per-step gather or scatter). Gates, patterns, metrics and logs keep the model's own
numbering; ``order`` maps the new (physical) head position to the model's head.

All functions here are pure (lists of ints); apply them with ``weight[rows]`` /
``weight[:, cols]`` (``torch.index_select``). Per tensor-parallel rank the order is over
the rank's own contiguous shard of KV heads (local indices): heads never cross ranks.
"""

from __future__ import annotations

from typing import Sequence


def head_order(full_mask_row: Sequence[bool]) -> list[int]:
    """The KV-head order of one layer (one rank): full heads first, then streaming, each
    kept in the model's order (stable).

    full_mask_row: [H_kv] bools (True = full cache). Returns [H_kv]: position p of the
    permuted layer holds model KV head order[p].
    """
    row = [bool(x) for x in full_mask_row]
    return [h for h, f in enumerate(row) if f] + [h for h, f in enumerate(row) if not f]


def inverse_order(order: Sequence[int]) -> list[int]:
    """inv with inv[order[p]] = p: the position of each model head. [H] -> [H]."""
    inv = [-1] * len(order)
    for p, h in enumerate(order):
        if not 0 <= h < len(order) or inv[h] != -1:
            raise ValueError(f"not a permutation: {list(order)}")
        inv[h] = p
    return inv


def is_identity(order: Sequence[int]) -> bool:
    """True when the order changes nothing (e.g. the full heads already form a prefix)."""
    return all(p == h for p, h in enumerate(order))


def query_order(order: Sequence[int], group: int) -> list[int]:
    """The query-head order that follows a KV-head order: [H_kv] -> [H_kv * group].

    Query head kv * group + i belongs to KV head kv (vLLM's GQA layout); each KV head's
    query heads follow it, in their own order.
    """
    return [h * group + i for h in order for i in range(group)]


def _rows(heads: Sequence[int], head_dim: int, offset: int = 0) -> list[int]:
    return [offset + h * head_dim + d for h in heads for d in range(head_dim)]


def qkv_row_order(order: Sequence[int], num_q_heads: int, num_kv_heads: int, head_dim: int) -> list[int]:
    """Row permutation of a fused [q; k; v] projection weight [(Hq + 2 Hkv) * D, hidden] or
    bias [(Hq + 2 Hkv) * D]: new = old[rows], rows of length (Hq + 2 Hkv) * D.

    order: [Hkv] KV-head order (``head_order``); Hq = Hkv * group.
    """
    if len(order) != num_kv_heads or num_q_heads % num_kv_heads:
        raise ValueError(f"order of {len(order)} heads for {num_q_heads} query / {num_kv_heads} KV heads")
    group = num_q_heads // num_kv_heads
    q_size, kv_size = num_q_heads * head_dim, num_kv_heads * head_dim
    return (_rows(query_order(order, group), head_dim)
            + _rows(order, head_dim, q_size)
            + _rows(order, head_dim, q_size + kv_size))


def o_col_order(order: Sequence[int], group: int, head_dim: int) -> list[int]:
    """Input-column permutation of o_proj's weight [hidden, Hq * D]: new = old[:, cols],
    cols of length Hq * D (Hq = len(order) * group)."""
    return _rows(query_order(order, group), head_dim)
