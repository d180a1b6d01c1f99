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
