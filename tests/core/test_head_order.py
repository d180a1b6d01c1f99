"""core.head_order: permuted projections + the oracle + permuted o_proj == the unpermuted layer.

fp32 tensors; the permuted o_proj sums its columns in another order, so equal within 1e-6
(outputs O(1)), not bitwise."""

from __future__ import annotations

import pytest
import torch

from rlkv_vllm.core.head_order import (head_order, inverse_order, is_identity, o_col_order, qkv_row_order,
                                       query_order)
from rlkv_vllm.core.patterns import local_kv_heads
from rlkv_vllm.core.reference import oracle_attention

HIDDEN, D, T = 24, 8, 21
SINK, RECENT = 2, 5


def _patterns(h_kv: int) -> dict[str, list[bool]]:
    return {
        "none": [False] * h_kv,
        "all": [True] * h_kv,
        "last": [i == h_kv - 1 for i in range(h_kv)],
        "scattered": [i % 3 == 1 for i in range(h_kv)],
    }


def _layer(h_kv: int, group: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    hq = h_kv * group
    return dict(
        x=torch.randn(T, HIDDEN, generator=g),
        w_qkv=torch.randn((hq + 2 * h_kv) * D, HIDDEN, generator=g) / HIDDEN ** 0.5,
        b_qkv=torch.randn((hq + 2 * h_kv) * D, generator=g),
        w_o=torch.randn(HIDDEN, hq * D, generator=g) / (hq * D) ** 0.5,
    )


def _attention_layer(x, w_qkv, b_qkv, w_o, full: list[bool], h_kv: int, group: int) -> torch.Tensor:
    """x: [T, hidden] -> [T, hidden]: fused QKV, the oracle (full/streaming per KV head), o_proj."""
    hq = h_kv * group
    qkv = x @ w_qkv.T + b_qkv
    q, k, v = qkv.split([hq * D, h_kv * D, h_kv * D], dim=-1)
    attn = oracle_attention(q.view(T, hq, D), k.view(T, h_kv, D), v.view(T, h_kv, D), scale=D ** -0.5,
                            full_heads=torch.tensor(full), sink=SINK, recent=RECENT,
                            compute_dtype=torch.float64)
    return attn.reshape(T, hq * D) @ w_o.T


def test_head_order_and_inverse():
    assert head_order([False, True, False, True]) == [1, 3, 0, 2]
    assert head_order([True, True]) == [0, 1] and head_order([False, False]) == [0, 1]
    assert is_identity(head_order([True, True, False]))
    order = head_order([False, True, True, False, True])
    inv = inverse_order(order)
    assert [order[inv[h]] for h in range(5)] == list(range(5))
    assert query_order([1, 0], 3) == [3, 4, 5, 0, 1, 2]
    with pytest.raises(ValueError):
        inverse_order([0, 0])


@pytest.mark.parametrize("group", range(1, 8))
@pytest.mark.parametrize("pattern", ["none", "all", "last", "scattered"])
def test_permuted_layer_equals_unpermuted(group: int, pattern: str):
    h_kv = 4
    w = _layer(h_kv, group, seed=group)
    full = _patterns(h_kv)[pattern]
    ref = _attention_layer(w["x"], w["w_qkv"], w["b_qkv"], w["w_o"], full, h_kv, group)

    order = head_order(full)
    rows = torch.tensor(qkv_row_order(order, h_kv * group, h_kv, D))
    cols = torch.tensor(o_col_order(order, group, D))
    assert sorted(rows.tolist()) == list(range(rows.numel()))
    permuted_full = [full[h] for h in order]
    n_full = sum(full)
    assert permuted_full == [True] * n_full + [False] * (h_kv - n_full)  # a contiguous prefix
    got = _attention_layer(w["x"], w["w_qkv"][rows], w["b_qkv"][rows], w["w_o"][:, cols], permuted_full,
                           h_kv, group)
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("group", [1, 2, 3])
@pytest.mark.parametrize("tp", [2, 4])
def test_per_rank_order(group: int, tp: int):
    """Column-parallel QKV / row-parallel o_proj: each rank permutes its own shard."""
    h_kv = 8
    hq = h_kv * group
    w = _layer(h_kv, group, seed=10 + group)
    full = [h in (1, 2, 7) for h in range(h_kv)]
    ref = _attention_layer(w["x"], w["w_qkv"], w["b_qkv"], w["w_o"], full, h_kv, group)
    q_w, k_w, v_w = w["w_qkv"].split([hq * D, h_kv * D, h_kv * D])
    q_b, k_b, v_b = w["b_qkv"].split([hq * D, h_kv * D, h_kv * D])
    total = torch.zeros_like(ref)
    for rank in range(tp):
        mine = local_kv_heads(h_kv, tp, rank)
        n = len(mine)
        kv_rows = slice(mine[0] * D, (mine[-1] + 1) * D)
        q_rows = slice(mine[0] * group * D, (mine[-1] + 1) * group * D)
        w_shard = torch.cat([q_w[q_rows], k_w[kv_rows], v_w[kv_rows]])
        b_shard = torch.cat([q_b[q_rows], k_b[kv_rows], v_b[kv_rows]])
        o_shard = w["w_o"][:, q_rows]
        local_full = [full[h] for h in mine]
        order = head_order(local_full)
        assert sorted(order) == list(range(n))  # local indices: never crossing ranks
        rows = torch.tensor(qkv_row_order(order, n * group, n, D))
        cols = torch.tensor(o_col_order(order, group, D))
        total += _attention_layer(w["x"], w_shard[rows], b_shard[rows], o_shard[:, cols],
                                  [local_full[h] for h in order], n, group)
    torch.testing.assert_close(total, ref, rtol=1e-6, atol=1e-6)
