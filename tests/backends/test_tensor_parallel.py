"""Tensor parallelism: each rank holds a slice of the pattern; every rank reports the same
per-layer paged head count (padded to the max over ranks). Outputs still match the oracle."""

from __future__ import annotations

import pytest
import torch

from rlkv_vllm.core.hf_reference import greedy_generate, load_reference_model
from rlkv_vllm.core.patterns import select_full_heads, split_layers
from tests.backends.test_permute_heads import _permuted_layers
from tests.engine_utils import engine, first_mismatch, greedy, mixed_prompts, random_gates, write_pattern

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("permute", [False, True], ids=["gather", "permuted"])
def test_tp2_matches_oracle(permute, tiny_model, tmp_path, monkeypatch):
    """permuted: rlkv.permute_heads, each rank ordering its own shard (rank 0 layer 1 and rank 1
    layer 2 hold full head 1 only, not a prefix; rank 1 layer 2 also pads a paged slot)."""
    from rlkv_vllm.compat import is_cpu_platform

    if is_cpu_platform():
        monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "0|1")  # one core per CPU worker
    else:
        if torch.cuda.device_count() < 2:
            pytest.skip("needs 2 GPUs")
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "1")
    monkeypatch.setenv("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")  # collective_rpc of a test function
    gates = random_gates(4, 4, seed=11)
    gates[0] = [0.9, 0.95, 0.01, 0.02]  # layer 0: rank 0 holds both full heads, rank 1 pads
    pattern = write_pattern(str(tmp_path / "p.json"), gates)
    mask = select_full_heads(gates, 0.5, "global")
    r0, r1 = split_layers(mask, 2, 0), split_layers(mask, 2, 1)
    assert r0[0].n_full == 2 and r1[0].n_full == 0 and r1[0].paged_slots == 2

    prompts = mixed_prompts(6, seed=3, max_len=80)
    ref = load_reference_model(tiny_model, compute_dtype=torch.float64, full_mask=mask, sink=4, recent=8)
    want = [greedy_generate(ref, p, 40) for p in prompts]
    rlkv = {"heads": pattern, "sparsity": 0.5, "sink": 4, "recent": 8, "permute_heads": permute}
    assert r0[1].full == (1,) and r1[2].full == (1,) and r1[2].paged_slots == 2
    with engine(tiny_model, rlkv, tensor_parallel_size=2, distributed_executor_backend="mp") as llm:
        got = greedy(llm, prompts, 40)
        stats = llm.collective_rpc("rlkv_slot_stats")
        layers = llm.collective_rpc(_permuted_layers)
    assert [[p for _, p, _ in rank] for rank in layers] == [[permute] * 4] * 2
    for i, (g, w) in enumerate(zip(got, want)):
        assert first_mismatch(g, w) is None, f"prompt {i} differs at {first_mismatch(g, w)}"
    assert len(stats) == 2 and stats[0] == stats[1] and stats[0]["assigned"] == len(prompts)
