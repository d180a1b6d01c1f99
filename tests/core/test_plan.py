"""The pure plan: ring geometry, per-layer head split, bytes per token, ring bytes over TP ranks,
ring slots sized by the KV budget."""

from dataclasses import replace

import numpy as np
import pytest
import torch

from rlkv_vllm.core.plan import budget_ring_slots, build_plan, ring_bytes, ring_index, ring_slot_bytes
from rlkv_vllm.core.settings import ModelShape, RLKVConfigError, RLKVSettings


def test_ring_index_layout():
    pos = torch.arange(0, 40)
    idx = ring_index(pos, 4, 8)
    assert idx[:4].tolist() == [0, 1, 2, 3]
    assert idx[4:12].tolist() == list(range(4, 12))
    assert idx[12].item() == 4 and idx[39].item() == 4 + (39 - 4) % 8


def _plan(mask, mode="serve", tp_size=1, tp_rank=0, max_num_seqs=8, dtype=torch.float16):
    shape = ModelShape(num_layers=mask.shape[0], num_kv_heads=mask.shape[1], num_q_heads=2 * mask.shape[1],
                       head_size=64)
    settings = RLKVSettings(selection="explicit", mode=mode, sink=4, recent=12,
                            full_heads=tuple((int(l), int(h)) for l, h in zip(*np.nonzero(mask))))
    return build_plan(settings, shape, max_num_seqs=max_num_seqs, dtype=dtype, tp_size=tp_size, tp_rank=tp_rank)


def test_serve_plan_bytes():
    mask = np.array([[1, 1, 0, 0], [0, 0, 0, 0], [1, 1, 1, 1]], dtype=bool)
    plan = _plan(mask)
    assert [l.n_full for l in plan.layers] == [2, 0, 4]
    assert plan.ring_heads() == [2, 4, 0]
    # fp16: 2 bytes; the all-streaming layer reports one slot of head size 1 (2 elements)
    assert plan.paged_bytes_per_token() == (6 * 2 * 64 + 2) * 2
    assert plan.ideal_bytes_per_token() == 6 * 2 * 64 * 2
    assert plan.stock_bytes_per_token() == 12 * 2 * 64 * 2
    assert plan.ring_nbytes == ring_bytes([2, 4, 0], 8, 16, 64, torch.float16) == 9 * 16 * 6 * 2 * 64 * 2
    assert plan.sparsity_actual == pytest.approx(0.5)


def test_gated_plan_rings_every_head():
    mask = np.array([[1, 0], [0, 1]], dtype=bool)
    plan = _plan(mask, mode="gated")
    assert plan.ring_heads() == [2, 2]
    assert plan.paged_heads() == [2, 2]


def test_tp_ranks_reserve_the_max_ring_and_pad_paged_slots():
    # rank 0 holds heads 0-1, rank 1 heads 2-3: layer 0 has 2 full on rank 0 and 0 on rank 1
    mask = np.array([[1, 1, 0, 0], [1, 0, 1, 0]], dtype=bool)
    r0, r1 = _plan(mask, tp_size=2, tp_rank=0), _plan(mask, tp_size=2, tp_rank=1)
    assert [l.paged_slots for l in r0.layers] == [l.paged_slots for l in r1.layers] == [2, 1]
    assert r0.ring_nbytes == r1.ring_nbytes == ring_bytes([2, 1], 8, 16, 64, torch.float16)


def test_query_heads_must_group():
    shape = ModelShape(num_layers=1, num_kv_heads=3, num_q_heads=4, head_size=64, model_id="odd")
    settings = RLKVSettings(selection="explicit", full_heads=((0, 0),))
    with pytest.raises(RLKVConfigError, match="not a multiple"):
        build_plan(settings, shape, max_num_seqs=4, dtype=torch.float32)


def _pattern_plan(tmp_path, gates, model_id, served_model_id, sparsity=0.5):
    from rlkv_vllm.core.patterns import HeadPattern

    path = str(tmp_path / "p.json")
    HeadPattern(np.asarray(gates, dtype=np.float32), {"model_id": model_id}).save(path)
    L, H = np.asarray(gates).shape
    shape = ModelShape(num_layers=L, num_kv_heads=H, num_q_heads=2 * H, head_size=64, model_id=served_model_id)
    return build_plan(RLKVSettings(heads=path, sparsity=sparsity), shape, max_num_seqs=4, dtype=torch.float32)


def test_plan_warns_of_a_pattern_for_another_model(tmp_path):
    gates = np.random.default_rng(3).uniform(size=(2, 4))
    plan = _pattern_plan(tmp_path, gates, "DeepSeek-R1-Distill-Llama-8B", "/models/Qwen3-4B-Thinking-2507")
    assert len(plan.warnings) == 1 and "DeepSeek-R1-Distill-Llama-8B" in plan.warnings[0]
    assert _pattern_plan(tmp_path, gates, "Qwen3-4B-Thinking-2507", "/models/qwen3-4b-thinking-2507/").warnings == []
    # a plan built by hand has none
    assert _plan(np.array([[1, 0]], dtype=bool)).warnings == []


def test_plan_counts_layers_without_full_head(tmp_path):
    gates = [[0.1, 0.2, 0.3, 0.4], [0.1, 0.2, 0.3, 0.4], [0.5, 0.6, 0.7, 0.8], [0.1, 0.2, 0.3, 0.9]]
    plan = _pattern_plan(tmp_path, gates, "m", "m", sparsity=0.99)
    assert plan.settings.sparsity == 0.99 and plan.sparsity_actual == 0.9375
    assert plan.layers_without_full_head == 3


def test_budget_ring_slots_hand_computed():
    # B = (slots + 1) * r + slots * L * p  ->  slots = floor((B - r) / (r + L * p))
    r, p = 1000, 10
    assert budget_ring_slots(budget=1000 + 4 * (1000 + 100 * 10), slot_bytes=r, bytes_per_token=p,
                             request_tokens=100, max_num_seqs=64) == 4
    # one byte short of the fourth request: three
    assert budget_ring_slots(1000 + 4 * 2000 - 1, r, p, 100, 64) == 3
    # the budget holds more than max_num_seqs: max_num_seqs; less than one: still one
    assert budget_ring_slots(10**9, r, p, 100, 64) == 64
    assert budget_ring_slots(500, r, p, 100, 64) == 1
    # no ring (no streaming head): slots cost nothing
    assert budget_ring_slots(10_000, 0, p, 100, 64) == 64
    # the docstring's H200 figures: Llama-8B s=0.5, 1,677,536 paged tokens + 1,025 slots, L = 8704 / 4
    h200 = 1_677_536 * 65_536 + 1_025 * 5_242_880
    assert budget_ring_slots(h200, 5_242_880, 65_536, 2_176, 1_024) == 779


def test_plan_ring_slots_setting_and_with_slots():
    mask = np.array([[1, 1, 0, 0], [0, 0, 0, 0], [1, 1, 1, 1]], dtype=bool)
    plan = _plan(mask)
    slot = ring_slot_bytes([2, 4, 0], 16, 64, torch.float16)
    assert (plan.num_slots, plan.ring_slot_nbytes, plan.ring_nbytes) == (8, slot, 9 * slot)
    small = plan.with_slots(3, "budget")
    assert (small.num_slots, small.ring_nbytes, small.settings.ring_slots, small.slots_by) == (3, 4 * slot, 3, "budget")
    assert plan.num_slots == 8  # unchanged
    with pytest.raises(ValueError):
        plan.with_slots(9, "too many")
    shape = ModelShape(num_layers=3, num_kv_heads=4, num_q_heads=8, head_size=64)
    fixed = build_plan(replace(plan.settings, ring_slots=5), shape, max_num_seqs=8, dtype=torch.float16)
    assert (fixed.num_slots, fixed.ring_nbytes, fixed.slots_by) == (5, 6 * slot, "rlkv.ring_slots")
    with pytest.raises(RLKVConfigError, match=r"^rlkv\.ring_slots = 9 is not allowed: must be at most "
                                              r"max_num_seqs = 8"):
        build_plan(replace(plan.settings, ring_slots=9), shape, max_num_seqs=8, dtype=torch.float16)


@pytest.mark.parametrize("name,kv", [("fp8", torch.float8_e4m3fn), ("fp8_e4m3", torch.float8_e4m3fn),
                                     ("fp8_e5m2", torch.float8_e5m2)])
def test_fp8_plan_bytes(name, kv):
    """An fp8 KV cache: one byte per element in the paged cache, the ring and every count built
    on them, so RLKV's fp8 capacity over stock fp8's is the same ratio as at the model dtype."""
    from rlkv_vllm.core.plan import kv_storage_dtype

    assert kv_storage_dtype(name, torch.bfloat16) == kv
    assert kv_storage_dtype("auto", torch.bfloat16) == torch.bfloat16
    with pytest.raises(ValueError):
        kv_storage_dtype("fp8_inc", torch.bfloat16)
    mask = np.array([[1, 1, 0, 0], [0, 0, 0, 0], [1, 1, 1, 1]], dtype=bool)
    shape = ModelShape(num_layers=3, num_kv_heads=4, num_q_heads=8, head_size=64)
    settings = RLKVSettings(selection="explicit", sink=4, recent=12,
                            full_heads=tuple((int(l), int(h)) for l, h in zip(*np.nonzero(mask))))
    wide = build_plan(settings, shape, max_num_seqs=8, dtype=torch.bfloat16)
    fp8 = build_plan(settings, shape, max_num_seqs=8, dtype=torch.bfloat16, kv_dtype=kv)
    assert fp8.dtype == torch.bfloat16 and fp8.cache_dtype == kv and wide.cache_dtype == torch.bfloat16
    assert fp8.paged_bytes_per_token() == (6 * 2 * 64 + 2) * 1 == wide.paged_bytes_per_token() // 2
    assert fp8.ideal_bytes_per_token() * 2 == wide.ideal_bytes_per_token()
    assert fp8.stock_bytes_per_token() == 12 * 2 * 64
    assert fp8.ring_slot_nbytes * 2 == wide.ring_slot_nbytes
    assert fp8.ring_nbytes == ring_bytes([2, 4, 0], 8, 16, 64, kv) == 9 * 16 * 6 * 2 * 64
    # the capacity a budget gives (paged tokens after the ring), against stock at the same KV dtype
    budget = 64 << 20

    def ratio(plan):
        return ((budget - plan.ring_nbytes) // plan.paged_bytes_per_token()) / (budget // plan.stock_bytes_per_token())

    # equal up to the ring's share of the budget, which halves with it (so fp8's is no lower)
    assert ratio(wide) <= ratio(fp8) <= ratio(wide) * 1.01
    # the budget split: the same number of slots (every byte halves)
    tokens = 512
    assert budget_ring_slots(budget // 2, fp8.ring_slot_nbytes, fp8.paged_bytes_per_token(), tokens, 1000) == \
        budget_ring_slots(budget, wide.ring_slot_nbytes, wide.paged_bytes_per_token(), tokens, 1000)
