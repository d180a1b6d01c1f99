"""(b) The sampler equals the learner: vLLM's gated-mode log-probs of the tokens it sampled (engine
core in its own process, tiny model, fp32, random alpha) and the learner's, for the same sequences,
agree within 1e-4, the max over every token; with top-k/top-p truncation too."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rlkv_trainer.policy import GatedPolicy, Sequence
from rlkv_trainer.rollout import RolloutEngine
from rlkv_trainer.sampling import SamplingSpec, processed_logprobs
from tests.engine_utils import KV_BYTES, mixed_prompts, random_gates

SINK, RECENT = 4, 8


def test_processed_logprobs_follow_vllm_order():
    """top-k, then top-p on what is left, ties kept, at least one token, renormalised."""
    logits = torch.tensor([[2.0, 1.0, 1.0, 0.0, -1.0]])
    lp = processed_logprobs(logits, SamplingSpec(temperature=1.0, top_k=3))
    assert torch.isinf(lp[0, 3:]).all() and torch.isfinite(lp[0, :3]).all()  # top 3 = 2.0 and the two 1.0s
    torch.testing.assert_close(lp[0, :3].exp().sum(), torch.tensor(1.0))
    lp = processed_logprobs(logits, SamplingSpec(temperature=0.5, top_p=0.5))
    assert torch.isfinite(lp[0, 0]) and torch.isinf(lp[0, 1:]).all()  # 2.0/0.5 dominates: p(top) > 0.5
    lp = processed_logprobs(logits, SamplingSpec(temperature=2.0))
    torch.testing.assert_close(lp, (logits / 2.0).log_softmax(-1))


@pytest.mark.slow
@pytest.mark.parametrize("spec", [SamplingSpec(temperature=1.0), SamplingSpec(temperature=0.7, top_k=20, top_p=0.9)],
                         ids=["t1", "topk-topp"])
def test_sampler_equals_learner(spec, tiny_model, tmp_path, monkeypatch):
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "1")  # the engine core in its own process
    alpha = random_gates(4, 4, seed=31)
    prompts = mixed_prompts(6, seed=5, max_len=40)
    engine = RolloutEngine(tiny_model, sink=SINK, recent=RECENT, work_dir=str(tmp_path), model_id="rlkv-tiny",
                           engine_kwargs=dict(dtype="float32", kv_cache_memory_bytes=KV_BYTES, max_num_seqs=16,
                                              max_model_len=512, enforce_eager=True, seed=0))
    try:
        engine.set_gates(alpha, version=1)
        samples = engine.generate(prompts, spec, n=2, max_tokens=48, seeds=list(range(len(prompts))))
    finally:
        engine.shutdown()
    assert len(samples) == 12 and all(s.gate_version == 1 for s in samples)
    assert sum(len(s.completion) for s in samples) > 200

    policy = GatedPolicy.from_pretrained(tiny_model, sink=SINK, recent=RECENT)
    with torch.no_grad():
        policy.alpha.copy_(torch.tensor(alpha))
        got = policy.completion_logprobs([Sequence(s.prompt, s.completion) for s in samples], spec)
    diff = max(float((g.double() - torch.tensor(s.logprobs, dtype=torch.float64)).abs().max())
               for g, s in zip(got, samples))
    print(f"sampler vs learner, {spec}: max |log-prob diff| {diff:.3g} over "
          f"{sum(len(s.completion) for s in samples)} tokens")
    assert diff < 1e-4, f"sampler vs learner log-prob diff {diff:.3g}"
    # the gates matter: the same sequences under alpha = 1 score differently
    with torch.no_grad():
        policy.alpha.fill_(1.0)
        dense = policy.completion_logprobs([Sequence(s.prompt, s.completion) for s in samples], spec)
    assert max(float((d - g).abs().max()) for d, g in zip(dense, got)) > 1e-2
    assert np.isfinite([lp for s in samples for lp in s.logprobs]).all()
