"""(f) Gated mode (the trainer's rollouts): every head keeps the full cache and the output
mixes full and streaming attention with alpha from a persistent buffer, updated in
place through collective_rpc without a restart."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rlkv_vllm.core.hf_reference import greedy_generate, load_reference_model
from tests.engine_utils import engine, first_mismatch, greedy, mixed_prompts, random_gates, write_pattern
from tests.runner_process import RUNNERS, on_runner, runner_of

pytestmark = pytest.mark.slow

SINK, RECENT, GEN = 4, 8, 80


KERNELS = ["torch"] + (["triton"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("runner", RUNNERS)
@pytest.mark.parametrize("kernel", KERNELS)
def test_gated_mode(kernel, runner, tiny_model, tmp_path):
    """On both model runners: the trainer's rollouts follow vLLM's runner choice."""
    on_runner(runner, check_gated_mode, kernel, runner, tiny_model, tmp_path)


def check_gated_mode(kernel, runner, tiny_model, tmp_path):
    prompts = mixed_prompts(10, seed=3, max_len=90)
    pattern = write_pattern(str(tmp_path / "p.json"), random_gates(4, 4, seed=1))
    with engine(tiny_model) as llm:
        assert runner_of(llm) == runner
        stock = greedy(llm, prompts, GEN)

    zeros = np.zeros((4, 4), dtype=np.float32)
    alpha = random_gates(4, 4, seed=21)
    ref_stream = load_reference_model(tiny_model, compute_dtype=torch.float64, full_mask=zeros.astype(bool), sink=SINK, recent=RECENT)
    want_stream = [greedy_generate(ref_stream, p, GEN) for p in prompts]
    ref_gated = load_reference_model(tiny_model, compute_dtype=torch.float64, alpha=torch.tensor(alpha), sink=SINK, recent=RECENT)
    want_gated = [greedy_generate(ref_gated, p, GEN) for p in prompts]

    rlkv = {"heads": pattern, "mode": "gated", "sink": SINK, "recent": RECENT, "kernel": kernel}
    with engine(tiny_model, rlkv) as llm:
        assert runner_of(llm) == runner
        # alpha starts as the pattern's gates
        assert llm.collective_rpc("rlkv_gates_checksum")[0] == pytest.approx(float(random_gates(4, 4, 1).sum()), rel=1e-6)

        assert llm.collective_rpc("rlkv_set_gates", args=(np.ones((4, 4)),))[0] == pytest.approx(16.0)
        ones_out = greedy(llm, prompts, GEN)

        assert llm.collective_rpc("rlkv_set_gates", args=(zeros,))[0] == 0.0
        zero_out = greedy(llm, prompts, GEN)

        checksum = llm.collective_rpc("rlkv_set_gates", args=(alpha,))[0]
        assert checksum == pytest.approx(float(alpha.astype(np.float64).sum()), rel=1e-6)
        gated_out = greedy(llm, prompts, GEN)
        read_back = np.array(llm.collective_rpc("rlkv_get_gates")[0])
        np.testing.assert_allclose(read_back, alpha, rtol=0, atol=1e-7)

        with pytest.raises(Exception, match="shape"):
            llm.collective_rpc("rlkv_set_gates", args=(np.ones((3, 4)),))

    for name, got, want in [("alpha=1 vs stock", ones_out, stock),
                            ("alpha=0 vs streaming oracle", zero_out, want_stream),
                            ("random alpha vs gated oracle", gated_out, want_gated)]:
        for i, (g, w) in enumerate(zip(got, want)):
            assert first_mismatch(g, w) is None, f"{name}: prompt {i} differs at token {first_mismatch(g, w)}"
    # the in-place update really changed what the running engine generates
    assert sum(a != b for a, b in zip(ones_out, gated_out)) >= 5
    assert sum(a != b for a, b in zip(ones_out, zero_out)) >= 5
