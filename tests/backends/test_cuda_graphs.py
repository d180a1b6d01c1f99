"""RLKV's Triton path under CUDA graphs (GPU only).

The kernels index from persistent buffers, so the builder declares the stock Triton
backend's support and vLLM captures FULL graphs. With graphs on (no enforce_eager),
serve and gated mode must still equal the oracle token for token, and gated alpha
updated in place must reach the captured graphs.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rlkv_vllm.core.hf_reference import greedy_generate, load_reference_model
from rlkv_vllm.core.patterns import select_full_heads
from tests.engine_utils import engine, first_mismatch, greedy, mixed_prompts, random_gates, write_pattern

pytestmark = [pytest.mark.slow, pytest.mark.gpu]

SINK, RECENT, GEN = 4, 8, 80
CAPTURE = [1, 2, 4, 8, 16]


def graphs(mode: str) -> dict:
    return dict(enforce_eager=False,
                compilation_config={"cudagraph_mode": mode, "cudagraph_capture_sizes": CAPTURE})


def assert_same(name: str, got: list[list[int]], want: list[list[int]]) -> None:
    for i, (g, w) in enumerate(zip(got, want)):
        at = first_mismatch(g, w)
        assert at is None, f"{name}: prompt {i} differs at token {at}"


@pytest.mark.parametrize("mode,decode_kernel", [("FULL_AND_PIECEWISE", "triton"), ("FULL", "triton"),
                                                ("FULL_AND_PIECEWISE", "cuda")])
def test_serve_under_cuda_graphs_matches_oracle(mode, decode_kernel, tiny_model, tmp_path):
    """Decode batches replay captured graphs holding decode_step (Triton or CUDA); mixed
    batches run the split kernels (piecewise) or their own FULL graphs."""
    prompts = mixed_prompts(12, seed=5, max_len=120)
    gates = random_gates(4, 4, seed=11)
    pattern = write_pattern(str(tmp_path / "p.json"), gates)
    rlkv = {"heads": pattern, "sparsity": 0.5, "sink": SINK, "recent": RECENT, "decode_kernel": decode_kernel}
    ref = load_reference_model(tiny_model, compute_dtype=torch.float64, full_mask=select_full_heads(gates, 0.5, "global"),
                               sink=SINK, recent=RECENT)
    want = [greedy_generate(ref, p, GEN) for p in prompts]
    with engine(tiny_model, rlkv, max_num_batched_tokens=64, **graphs(mode)) as llm:
        from vllm.config import CUDAGraphMode

        from rlkv_vllm.runtime import current_runtime

        cg = llm.llm_engine.vllm_config.compilation_config.cudagraph_mode
        assert cg != CUDAGraphMode.NONE and cg.has_full_cudagraphs(), f"graphs not captured: {cg}"
        assert current_runtime().decode_kernel == decode_kernel
        batched = greedy(llm, prompts, GEN)
        alone = greedy(llm, prompts[:4], GEN, one_by_one=True)
    assert_same(f"{mode} batched", batched, want)
    assert_same(f"{mode} one by one", alone, want[:4])


def test_triton_and_torch_paths_agree(tiny_model, tmp_path):
    """Same engine settings, both streaming-pool implementations: identical tokens."""
    prompts = mixed_prompts(16, seed=9)
    pattern = write_pattern(str(tmp_path / "p.json"), random_gates(4, 4, seed=4))
    outs = {}
    for kernel in ("triton", "torch"):
        rlkv = {"heads": pattern, "sparsity": 0.5, "sink": SINK, "recent": RECENT, "kernel": kernel}
        with engine(tiny_model, rlkv, max_num_batched_tokens=48) as llm:
            outs[kernel] = greedy(llm, prompts, GEN)
    assert_same("triton vs torch", outs["triton"], outs["torch"])


def test_gated_under_cuda_graphs(tiny_model, tmp_path):
    prompts = mixed_prompts(8, seed=3, max_len=90)
    pattern = write_pattern(str(tmp_path / "p.json"), random_gates(4, 4, seed=1))
    alpha = random_gates(4, 4, seed=21)
    ref = load_reference_model(tiny_model, compute_dtype=torch.float64, alpha=torch.tensor(alpha), sink=SINK, recent=RECENT)
    want = [greedy_generate(ref, p, GEN) for p in prompts]
    zeros = np.zeros((4, 4), dtype=np.float32)
    ref0 = load_reference_model(tiny_model, compute_dtype=torch.float64, full_mask=zeros.astype(bool), sink=SINK, recent=RECENT)
    want0 = [greedy_generate(ref0, p, GEN) for p in prompts]
    rlkv = {"heads": pattern, "mode": "gated", "sink": SINK, "recent": RECENT}
    with engine(tiny_model, rlkv, **graphs("FULL_AND_PIECEWISE")) as llm:
        llm.collective_rpc("rlkv_set_gates", args=(alpha,))
        gated = greedy(llm, prompts, GEN)
        llm.collective_rpc("rlkv_set_gates", args=(zeros,))
        stream = greedy(llm, prompts, GEN)
    assert_same("gated alpha under graphs", gated, want)
    assert_same("alpha=0 after an in-place update under graphs", stream, want0)
