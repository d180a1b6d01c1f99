"""(c) KV capacity: vLLM's own count is >= 0.97 x the ideal, and the ring stays inside the budget."""

from __future__ import annotations

import pytest

from rlkv_vllm.runtime import current_runtime
from tests.engine_utils import KV_BYTES, engine, kv_capacity_tokens, random_gates, write_pattern

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def stock_capacity(tiny_model):
    with engine(tiny_model) as llm:
        return kv_capacity_tokens(llm)


@pytest.mark.parametrize("sparsity", [0.25, 0.5, 0.8])
def test_capacity_vs_ideal(sparsity, tiny_model, stock_capacity, tmp_path):
    pattern = write_pattern(str(tmp_path / "p.json"), random_gates(4, 4, seed=5))
    with engine(tiny_model, {"heads": pattern, "sparsity": sparsity}) as llm:
        tokens = kv_capacity_tokens(llm)
        plan = current_runtime().plan
        block = llm.llm_engine.vllm_config.cache_config.block_size
    ideal = (KV_BYTES - plan.ring_nbytes) / plan.ideal_bytes_per_token()
    assert tokens >= 0.97 * ideal, (tokens, ideal)
    # paged pages + rings never exceed the budget the user set
    assert tokens * plan.paged_bytes_per_token() + plan.ring_nbytes <= KV_BYTES
    assert tokens > stock_capacity
    assert tokens % block == 0


def test_fp8_capacity_ratio(tiny_model, tmp_path):
    """An fp8 KV cache: every paged and ring byte counts one byte per element, so RLKV's capacity
    over stock fp8's is at least RLKV's ratio at the model dtype (more where max_num_seqs caps the
    ring slots: the ring then takes a smaller share of the budget), each within this file's 3 % of
    its ideal."""
    from tests.backends.test_fp8 import fp8_unavailable, model_dtype

    reason = fp8_unavailable()
    if reason is not None:
        pytest.skip(f"no fp8 KV cache here: {reason}")
    pattern = write_pattern(str(tmp_path / "p.json"), random_gates(4, 4, seed=5))
    caps = {}
    for kv in ("auto", "fp8"):
        with engine(tiny_model, dtype=model_dtype(), kv_cache_dtype=kv) as llm:
            stock = kv_capacity_tokens(llm)
        with engine(tiny_model, {"heads": pattern, "sparsity": 0.5}, dtype=model_dtype(), kv_cache_dtype=kv) as llm:
            tokens = kv_capacity_tokens(llm)
            plan = current_runtime().plan
        caps[kv] = (stock, tokens, plan)
    (stock_auto, rlkv_auto, plan_auto), (stock_fp8, rlkv_fp8, plan_fp8) = caps["auto"], caps["fp8"]
    elem = plan_auto.stock_bytes_per_token() // plan_fp8.stock_bytes_per_token()  # 4 (fp32) or 2 (bf16)
    assert stock_fp8 == pytest.approx(elem * stock_auto, rel=0.03), (stock_fp8, stock_auto)
    assert plan_fp8.ring_slot_nbytes * elem == plan_auto.ring_slot_nbytes
    for kv, (stock, tokens, plan) in caps.items():  # each within 3 % of its own ideal
        ideal = (KV_BYTES - plan.ring_nbytes) / plan.ideal_bytes_per_token()
        assert tokens >= 0.97 * ideal, (kv, tokens, ideal)
    # the same ring slots at a quarter / half the bytes: the ring takes less of the budget at fp8, so the
    # ratio is at least the model dtype's, and equal where the slots grow with the budget's requests
    auto_ratio, fp8_ratio = rlkv_auto / stock_auto, rlkv_fp8 / stock_fp8
    assert fp8_ratio >= 0.97 * auto_ratio, caps
    if plan_fp8.num_slots == elem * plan_auto.num_slots:
        assert fp8_ratio == pytest.approx(auto_ratio, rel=0.03), caps
    assert rlkv_fp8 * plan_fp8.paged_bytes_per_token() + plan_fp8.ring_nbytes <= KV_BYTES
