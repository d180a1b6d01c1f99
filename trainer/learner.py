"""The learner: one optimiser step on alpha per batch of rollouts.

Per step: alpha clamped to [0, 1]; per-sequence advantages over the whole batch (``objective``);
then token-budget micro-batches, each a forward of the gated policy over its sequences (prompt +
completion), the scaled loss and a backward; gradient clipping; one AdamW step. The stats carry the
sampler-learner gap on the step's tokens (measured before the update, with the gates the samples
were drawn with), the share of tokens the ratio threshold masked, and the penalty.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict
from typing import Any, Sequence as Seq

import torch

from .objective import LossStats, Objective, merge_stats
from .policy import GatedPolicy, Sequence
from .rollout import Sample
from .sampling import SamplingSpec


def micro_batches(samples: Seq[Sample], token_budget: int) -> list[list[int]]:
    """Indices of consecutive samples whose prompt + completion tokens fit the budget (a longer
    sequence alone); the order is kept, so a step's arithmetic does not depend on timing."""
    out: list[list[int]] = []
    current: list[int] = []
    used = 0
    for i, s in enumerate(samples):
        n = len(s.prompt) + len(s.completion)
        if current and used + n > token_budget:
            out.append(current)
            current, used = [], 0
        current.append(i)
        used += n
    if current:
        out.append(current)
    return out


class Learner:
    """Holds the policy and its optimiser (a Ray actor in a run, a plain object in tests).

    objective: the loss with its settings; optim: lr, weight_decay, betas, eps, grad_clip.
    """

    def __init__(self, policy: GatedPolicy, objective: Objective, *, spec: SamplingSpec, lr: float,
                 weight_decay: float, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 grad_clip: float | None = 1.0, micro_batch_tokens: int = 8192) -> None:
        self.policy = policy
        self.objective = objective
        self.spec = spec
        self.grad_clip = grad_clip
        self.micro_batch_tokens = micro_batch_tokens
        self.optimizer = torch.optim.AdamW([policy.alpha], lr=lr, weight_decay=weight_decay, betas=betas, eps=eps)

    def gates(self) -> list[list[float]]:
        """The clamped gates as nested floats (what the rollout workers get)."""
        return self.policy.gates().double().tolist()

    def step(self, samples: list[Sample], raw_rewards: list[float]) -> dict[str, Any]:
        """One update from a batch of rollouts and their raw rewards in [0, 1]."""
        t0 = time.perf_counter()
        if len(samples) != len(raw_rewards):
            raise ValueError(f"{len(samples)} samples but {len(raw_rewards)} rewards")
        self.policy.clamp_()
        dev = self.policy.device
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)
        raw = torch.tensor(raw_rewards, dtype=torch.float32)
        lengths = torch.tensor([len(s.completion) for s in samples], dtype=torch.float32)
        groups = torch.tensor([s.prompt_index for s in samples])
        adv = self.objective.advantages(raw, lengths, groups)
        batch_tokens = int(lengths.sum())
        self.optimizer.zero_grad(set_to_none=True)
        parts: list[LossStats] = []
        for idx in micro_batches(samples, self.micro_batch_tokens):
            idx = [i for i in idx if samples[i].completion]  # an empty completion has no token to score
            if not idx:
                continue
            logps = self.policy.completion_logprobs([Sequence(samples[i].prompt, samples[i].completion) for i in idx],
                                                    self.spec)
            logp = torch.cat(logps)
            sampler = torch.cat([torch.tensor(samples[i].logprobs, dtype=torch.float32) for i in idx]).to(dev)
            tok_adv = torch.cat([adv[i].expand(len(samples[i].completion)) for i in idx]).to(dev)
            mask = torch.ones_like(logp, dtype=torch.bool)
            loss, stats = self.objective.micro_batch_loss(
                logp, sampler, tok_adv, mask, self.policy.alpha, raw[idx].to(dev), batch_tokens,
                batch_reward_mean=float(raw.mean()))
            loss.backward()
            parts.append(stats)
        grad = self.policy.alpha.grad
        grad_norm = float(grad.norm()) if grad is not None else 0.0
        if self.grad_clip is not None and grad is not None:
            torch.nn.utils.clip_grad_norm_([self.policy.alpha], self.grad_clip)
        self.optimizer.step()
        merged = asdict(merge_stats(parts)) if parts else {}
        gates = self.policy.gates()
        return {**merged, "reward_mean": float(raw.mean()), "grad_norm": grad_norm,
                "alpha_mean": float(gates.mean()), "alpha_min": float(gates.min()),
                "response_tokens": batch_tokens, "learn_s": time.perf_counter() - t0,
                "peak_memory_gib": torch.cuda.max_memory_allocated(dev) / 2**30 if dev.type == "cuda" else 0.0,
                "finite": math.isfinite(grad_norm)}

    # ------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        return {"alpha": self.policy.alpha.detach().cpu().clone(), "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        with torch.no_grad():
            self.policy.alpha.copy_(state["alpha"].to(self.policy.device))
        self.optimizer.load_state_dict(state["optimizer"])
