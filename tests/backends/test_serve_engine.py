"""Serve mode end to end on vLLM's CPU platform (tiny model, fp32, greedy).

(a) all heads full: token-identical to stock vLLM.
(b) sparsities 0.25/0.5/0.75 and a pattern with a zero-full and a zero-streaming
    layer, at a small window that wraps many times: token-identical to a plain
    transformers forward using the oracle attention, across chunked-prefill sizes and
    batch compositions.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rlkv_vllm.core.hf_reference import greedy_generate, load_reference_model
from rlkv_vllm.core.patterns import select_full_heads
from tests.engine_utils import (
    engine,
    first_mismatch,
    greedy,
    mixed_prompts,
    random_gates,
    write_pattern,
)
from tests.runner_process import RUNNERS, on_runner, runner_of

pytestmark = pytest.mark.slow

SINK, RECENT = 4, 8
GEN = 100


@pytest.fixture(scope="module")
def prompts():
    return mixed_prompts(16)


@pytest.mark.parametrize("runner", RUNNERS)
def test_all_full_equals_stock(runner, tiny_model, prompts, tmp_path):
    """(a) sparsity 0: the RLKV backend is token-identical to stock CPU attention on the same
    model runner (V1 and V2)."""
    on_runner(runner, check_all_full_equals_stock, runner, tiny_model, prompts, tmp_path)


def check_all_full_equals_stock(runner, tiny_model, prompts, tmp_path):
    pattern = write_pattern(str(tmp_path / "p.json"), random_gates(4, 4, seed=3))
    gen = 120  # past the default sink + recent (80)
    with engine(tiny_model) as llm:
        assert runner_of(llm) == runner
        stock = greedy(llm, prompts, gen)
    with engine(tiny_model, {"heads": pattern, "sparsity": 0.0}) as llm:
        assert runner_of(llm) == runner
        ours = greedy(llm, prompts, gen)
    for i, (a, b) in enumerate(zip(stock, ours)):
        assert first_mismatch(a, b) is None, f"prompt {i} (len {len(prompts[i])}) differs at {first_mismatch(a, b)}"


CASES = {
    "s0.25": (0.25, None),
    "s0.5": (0.5, None),
    "s0.75": (0.75, None),
    # layer 1: no full head; layer 3: no streaming head
    "zero-layers": (None, ["0:0", "0:2", "2:1", "2:3", "3:0", "3:1", "3:2", "3:3"]),
}


# every case on V1; on V2 (CPU: Triton's interpreter, ~3x slower) the case with a layer of no full
# head and one of no streaming head, which covers both pools
RUNNER_CASES = [(case, "v1") for case in sorted(CASES)] + [("zero-layers", "v2")]


@pytest.mark.parametrize("case,runner", RUNNER_CASES)
def test_matches_oracle_across_chunking_and_batching(case, runner, tiny_model, prompts, tmp_path):
    """(b) vLLM + RLKV == transformers + oracle, for 3 chunk sizes and 2 batch compositions."""
    on_runner(runner, check_matches_oracle, case, runner, tiny_model, prompts, tmp_path)


def check_matches_oracle(case, runner, tiny_model, prompts, tmp_path):
    sparsity, full_heads = CASES[case]
    gates = random_gates(4, 4, seed=11)
    pattern = write_pattern(str(tmp_path / "p.json"), gates)
    if full_heads is None:
        rlkv = {"heads": pattern, "sparsity": sparsity, "sink": SINK, "recent": RECENT}
        mask = select_full_heads(gates, sparsity, "global")
    else:
        rlkv = {"heads": pattern, "selection": "explicit", "full_heads": full_heads, "sink": SINK, "recent": RECENT}
        mask = np.zeros((4, 4), dtype=bool)
        for item in full_heads:
            layer, head = map(int, item.split(":"))
            mask[layer, head] = True
        assert mask[1].sum() == 0 and mask[3].all()
    assert 0 < mask.sum() < mask.size

    ref_model = load_reference_model(tiny_model, compute_dtype=torch.float64, full_mask=mask, sink=SINK, recent=RECENT)
    expected = [greedy_generate(ref_model, p, GEN) for p in prompts]

    runs = {}
    for chunk in (16, 48, 2048):
        with engine(tiny_model, rlkv, max_num_batched_tokens=chunk, enable_chunked_prefill=True) as llm:
            assert runner_of(llm) == runner
            runs[f"batched, chunk {chunk}"] = greedy(llm, prompts, GEN)
            if chunk == 48:
                runs["one by one, chunk 48"] = greedy(llm, prompts, GEN, one_by_one=True)
    for name, outs in runs.items():
        for i, (got, want) in enumerate(zip(outs, expected)):
            at = first_mismatch(got, want)
            assert at is None, f"{case} {name}: prompt {i} (len {len(prompts[i])}) differs from the oracle at token {at}"


def test_compression_changes_outputs(tiny_model, prompts, tmp_path):
    """The small window really changes generations (so the oracle match above is not vacuous)."""
    pattern = write_pattern(str(tmp_path / "p.json"), random_gates(4, 4, seed=11))
    with engine(tiny_model, {"heads": pattern, "sparsity": 0.5, "sink": SINK, "recent": RECENT}) as llm:
        ours = greedy(llm, prompts[:8], 60)
    with engine(tiny_model) as llm:
        stock = greedy(llm, prompts[:8], 60)
    assert sum(a != b for a, b in zip(ours, stock)) >= 6


SHAPES = {
    # (query heads, KV heads, head_dim, block size): GQA groups 1, 3 and 7; non-default blocks
    "G1-block32": (4, 4, 32, 32),
    "G7-block256": (14, 2, 32, 256),
    "G3-block64": (6, 2, 64, 64),
}


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_gqa_groups_and_block_sizes(shape, tmp_path):
    """Serve mode matches the oracle for GQA groups 1..7 and the platform's block sizes."""
    from rlkv_vllm.compat import is_cpu_platform
    from rlkv_vllm.tiny_model import TinyModelSpec
    from tests.engine_utils import tiny_model_dir

    hq, hk, d, block = SHAPES[shape]
    if not is_cpu_platform():
        block = 16 if block == 32 else block  # CUDA: multiples of 16
    model = tiny_model_dir(TinyModelSpec(num_layers=3, num_q_heads=hq, num_kv_heads=hk, head_dim=d, seed=1))
    gates = random_gates(3, hk, seed=4)
    pattern = write_pattern(str(tmp_path / "p.json"), gates)
    mask = select_full_heads(gates, 0.5, "global")
    prompts = mixed_prompts(8, seed=6, max_len=90)
    ref = load_reference_model(model, compute_dtype=torch.float64, full_mask=mask, sink=SINK, recent=RECENT)
    expected = [greedy_generate(ref, p, 60) for p in prompts]
    rlkv = {"heads": pattern, "sparsity": 0.5, "sink": SINK, "recent": RECENT}
    with engine(model, rlkv, block_size=block, max_num_batched_tokens=32, max_num_seqs=8) as llm:
        assert llm.llm_engine.vllm_config.cache_config.block_size == block
        got = greedy(llm, prompts, 60)
    for i, (g, w) in enumerate(zip(got, expected)):
        assert first_mismatch(g, w) is None, f"{shape}: prompt {i} differs at {first_mismatch(g, w)}"
