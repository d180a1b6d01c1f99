"""The distribution the sampler really sampled from, so the learner scores tokens under the same one.

vLLM's sampler (v1 ``Sampler`` with ``logprobs_mode="processed_logprobs"``, 0.26-0.33): float32
logits, divided by the temperature, then top-k (keep every logit >= the k-th largest; ties stay),
then top-p on what is left (sort ascending, mask tokens whose cumulative probability is <= 1 - p,
always keep the most likely), then log-softmax. ``processed_logprobs`` repeats those steps, so the
learner's log-probs and the sampler's differ only by the two forward passes' rounding. With
top_p = 1 and top_k = -1 it is the temperature-scaled log-softmax.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SamplingSpec:
    """temperature > 0; top_k: -1 (off) or >= 1; top_p in (0, 1] (1: off)."""

    temperature: float = 1.0
    top_k: int = -1
    top_p: float = 1.0

    def vllm_kwargs(self) -> dict[str, float | int]:
        """The ``SamplingParams`` fields that define the distribution."""
        return {"temperature": self.temperature, "top_k": self.top_k, "top_p": self.top_p}


def processed_logprobs(logits: torch.Tensor, spec: SamplingSpec) -> torch.Tensor:
    """logits: [N, V] -> [N, V] log-probs of the sampled distribution (-inf for truncated tokens),
    in float32 like vLLM's sampler (float64 for float64 logits). Differentiable in ``logits``."""
    x = logits.to(torch.promote_types(logits.dtype, torch.float32)) / spec.temperature
    vocab = x.shape[-1]
    if spec.top_k != -1 and spec.top_k < vocab:
        kth = x.topk(spec.top_k, dim=-1).values[..., -1:]
        x = x.masked_fill(x < kth, float("-inf"))
    if spec.top_p < 1.0:
        sorted_x, order = x.sort(dim=-1, descending=False)
        cum = sorted_x.softmax(dim=-1).cumsum(dim=-1)
        drop = cum <= 1.0 - spec.top_p
        drop[..., -1] = False  # at least one token
        x = x.masked_fill(torch.zeros_like(drop).scatter(-1, order, drop), float("-inf"))
    return x.log_softmax(dim=-1)


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, spec: SamplingSpec) -> torch.Tensor:
    """logits: [N, V]; tokens: [N] ids -> [N], each token's log-prob under ``spec``."""
    return processed_logprobs(logits, spec).gather(-1, tokens.long().unsqueeze(-1)).squeeze(-1)
