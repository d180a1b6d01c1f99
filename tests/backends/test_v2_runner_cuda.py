"""RLKV on both of vLLM's model runners on CUDA (GPU only; skipped without CUDA).

On each runner (V1 in this process, V2 in a spawned one: tests/runner_process.py), with CUDA
graphs captured: RLKV with every head full equals stock FLASH_ATTN on the same runner token for
token, and a compressed engine (sparsity 0.5, fewer ring slots than max_num_seqs) never holds
more slots than it has and frees them all. Its tokens are the same on V1 and V2 (the same
kernels over the same rows; V2 only orders the rows decode-first).
"""

from __future__ import annotations

import pytest

from tests.engine_utils import engine, first_mismatch, greedy, mixed_prompts, random_gates, write_pattern
from tests.runner_process import RUNNERS, on_runner, runner_of

pytestmark = [pytest.mark.slow, pytest.mark.gpu]

GEN = 80
SLOTS = 4


def _common() -> dict:
    return dict(dtype="bfloat16", max_num_batched_tokens=64, max_num_seqs=8, enforce_eager=False,
                compilation_config={"cudagraph_mode": "FULL_AND_PIECEWISE", "cudagraph_capture_sizes": [1, 2, 4, 8]})


def check_runner_vs_stock_flash_attn(runner, tiny_model, tmp_path):
    from rlkv_vllm.runtime import current_runtime

    prompts = mixed_prompts(12, seed=5, max_len=120)
    pattern = write_pattern(str(tmp_path / "p.json"), random_gates(4, 4, seed=11))
    with engine(tiny_model, attention_backend="FLASH_ATTN", **_common()) as llm:
        assert runner_of(llm) == runner
        stock = greedy(llm, prompts, GEN)
    with engine(tiny_model, {"heads": pattern, "sparsity": 0.0, "full_kernel": "flash_attn"}, **_common()) as llm:
        assert runner_of(llm) == runner
        full = greedy(llm, prompts, GEN)
    rlkv = {"heads": pattern, "sparsity": 0.5, "sink": 4, "recent": 8, "ring_slots": SLOTS, "full_kernel": "flash_attn"}
    with engine(tiny_model, rlkv, **_common()) as llm:
        assert runner_of(llm) == runner
        rt = current_runtime()
        half = greedy(llm, prompts, GEN)
        llm.llm_engine.step()  # workers hear of the last finished requests one step later
        peak, in_use = rt.slots.peak_in_use, rt.slots.in_use
    for i, (a, b) in enumerate(zip(stock, full)):
        assert first_mismatch(a, b) is None, f"{runner}: prompt {i} differs from stock FLASH_ATTN at {first_mismatch(a, b)}"
    assert peak == SLOTS and in_use == 0, (peak, in_use)
    return half


def test_rlkv_on_both_runners_vs_stock_flash_attn(tiny_model, tmp_path):
    halves = {}
    for runner in RUNNERS:
        (tmp_path / runner).mkdir()
        halves[runner] = on_runner(runner, check_runner_vs_stock_flash_attn, runner, tiny_model, tmp_path / runner)
    for i, (a, b) in enumerate(zip(halves["v1"], halves["v2"])):
        assert first_mismatch(a, b) is None, f"sparsity 0.5: prompt {i} differs between V1 and V2 at {first_mismatch(a, b)}"
