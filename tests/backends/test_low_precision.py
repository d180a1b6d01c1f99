"""bf16 / fp16 serving: token-exact comparison is meaningless at these precisions, so compare
teacher-forced prompt log-probs with the oracle in float64 instead.

The yardstick is stock vLLM at the same precision against the full-attention oracle: RLKV
against the streaming oracle must be about as close, and clearly farther from full attention
(so the check discriminates)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rlkv_vllm.core.hf_reference import load_reference_model
from rlkv_vllm.core.patterns import select_full_heads
from tests.engine_utils import engine, mixed_prompts, random_gates, write_pattern

pytestmark = pytest.mark.slow

SINK, RECENT = 4, 8


def oracle_logprobs(model, prompt: list[int]) -> np.ndarray:
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([prompt])).logits[0].double()
    lp = torch.log_softmax(logits, -1)
    return np.array([lp[i, prompt[i + 1]].item() for i in range(len(prompt) - 1)])


def vllm_logprobs(llm, prompts: list[list[int]]) -> list[np.ndarray]:
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    sp = SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=0.0)
    outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], sp, use_tqdm=False)
    res = []
    for o, p in zip(outs, prompts):
        res.append(np.array([d[p[i + 1]].logprob for i, d in enumerate(o.prompt_logprobs[1:])]))
    return res


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_low_precision_tracks_oracle(dtype, tiny_model, tmp_path):
    gates = random_gates(4, 4, seed=11)
    pattern = write_pattern(str(tmp_path / "p.json"), gates)
    mask = select_full_heads(gates, 0.5, "global")
    prompts = [p for p in mixed_prompts(16, seed=8, max_len=150) if len(p) >= 40][:6]
    rlkv = {"heads": pattern, "sparsity": 0.5, "sink": SINK, "recent": RECENT}
    with engine(tiny_model, rlkv, dtype=dtype, max_num_batched_tokens=64) as llm:
        got = vllm_logprobs(llm, prompts)
    with engine(tiny_model, dtype=dtype, max_num_batched_tokens=64) as llm:
        stock = vllm_logprobs(llm, prompts)
    streaming = load_reference_model(tiny_model, compute_dtype=torch.float64, full_mask=mask, sink=SINK, recent=RECENT)
    full = load_reference_model(tiny_model, compute_dtype=torch.float64)

    def mean_err(a, model):
        return float(np.mean([np.abs(x - oracle_logprobs(model, p)).mean() for x, p in zip(a, prompts)]))

    err_stock = mean_err(stock, full)  # what this precision costs stock vLLM
    err_stream = mean_err(got, streaming)
    err_full = mean_err(got, full)
    assert err_stream <= 1.5 * err_stock + 0.02, (err_stream, err_stock)
    assert err_full > 5 * err_stream, (err_stream, err_full)
