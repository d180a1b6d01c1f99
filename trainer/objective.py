"""The training objective: decoupled PPO on the gates plus RLKV's adaptive sparsity penalty.

Per step (TRAINER-NOTES.md, the reference's loss):

1. Raw rewards x in [0, 1] (one per sequence) map to (x + bias) * scale: 0/1 -> -5/+5.
2. Advantages: GAE with gamma = lambda = 1 and no value model gives every token its sequence's
   mapped reward; it is normalised over the whole batch with a token-weighted mean and std
   ("batch", the reference) or over each prompt's group ("group", GRPO).
3. Per token, three log-probs of the sampled token play three roles (decoupled PPO, AReaL):
   - ``sampler_logp``: the behaviour policy, the gates the rollout worker sampled with (vLLM's
     processed log-probs). Data, no gradient.
   - ``proximal_logp``: the policy PPO's trust region is centred on. By default the learner's
     own log-probs, detached: the learner recomputes them with the current gates, so the
     sampler's log-probs only enter through the off-policy weight below.
   - ``logp``: the learner's log-probs with gradients (the gates being trained).
   The trust-region ratio ``exp(logp - proximal_logp)`` is clipped to [1 - clip, 1 + clip]; the
   sampler-to-learner weight ``w = exp(proximal_logp - sampler_logp)`` multiplies each token's
   surrogate, and is either masked to 0 where it exceeds the threshold (the reference, 5, no
   lower cap) or truncated at a cap (verl's TIS, 2). Their product is exp(logp - sampler_logp),
   the sampler-to-learner ratio. With one optimiser step per batch (the default learner),
   the trust-region ratio is 1 and clipping never binds; it binds once the proximal policy is
   an older learner state than the one being trained.
4. The policy loss is the token mean over the micro-batch's response tokens.
5. Sparsity penalty: ``beta * mean|alpha| * (exp(r) - 1) * [r > tau]``, r the detached mean raw
   reward (each sequence counts once) of the micro-batch (the reference) or of the batch.
6. A micro-batch's loss (policy + penalty) is scaled by its share of the batch's response
   tokens, so the gradients summed over micro-batches are the full batch's gradient.

Tensors: ``[B]`` is per sequence; token tensors are any shape ``[*]`` (padded ``[B, T]`` or packed
``[N]``) with a bool ``mask`` of the same shape, True on the response tokens that count.
Computation runs in float32 (float64 if given float64), whatever the inputs' dtype.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Literal, Sequence

import torch

from .config import ObjectiveConfig

# added to the std before dividing (AReaL's NormConfig default)
ADV_EPS = 1e-5

__all__ = [
    "ADV_EPS", "map_rewards", "batch_advantages", "group_advantages", "sequence_advantages", "token_advantages",
    "policy_loss", "PolicyStats", "sparsity_penalty", "token_share", "LossStats", "merge_stats", "Objective",
]


def _float(t: torch.Tensor) -> torch.Tensor:
    """``t`` in the loss's compute dtype: float64 stays, everything else becomes float32."""
    return t.to(torch.float64 if t.dtype == torch.float64 else torch.float32)


# ---------------------------------------------------------------- rewards and advantages


def map_rewards(raw: torch.Tensor, scale: float = 10.0, bias: float = -0.5) -> torch.Tensor:
    """Raw rewards [B] (0/1 for correctness) -> ``(raw + bias) * scale`` [B]: -5 / +5 by default."""
    return (_float(raw) + bias) * scale


def batch_advantages(rewards: torch.Tensor, lengths: torch.Tensor, eps: float = ADV_EPS) -> torch.Tensor:
    """The reference's baseline: each sequence's reward standing for all its tokens, normalised by
    the mean and std over all the batch's response tokens (AReaL's adv_norm at batch level:
    token-weighted, std unbiased over the N tokens, eps added to the std).

    rewards: [B] mapped rewards; lengths: [B] response tokens per sequence (the weights).
    Returns [B]: ``(r_i - mean) / (std + eps)`` with ``mean = sum(len_i r_i) / N`` and
    ``std = sqrt(sum(len_i (r_i - mean)^2) / (N - 1))``; all zeros when every counted reward is equal.
    """
    r = _float(rewards)
    w = lengths.to(r.dtype)
    total = w.sum()
    counted = w > 0
    # exact test, no tolerance: equal rewards carry no signal (and a single token has no std)
    if total <= 1 or r[counted].max() == r[counted].min():
        return torch.zeros_like(r)
    mean = (w * r).sum() / total
    std = ((w * (r - mean) ** 2).sum() / (total - 1)).sqrt()
    return (r - mean) / (std + eps)


def group_advantages(rewards: torch.Tensor, group_ids: torch.Tensor, eps: float = ADV_EPS) -> torch.Tensor:
    """GRPO's baseline: within each prompt's group, ``(r_i - mean_g) / (std_g + eps)`` with the
    group's sequence mean and unbiased std (each sequence counts once, as verl and TRL).

    rewards: [B] mapped rewards; group_ids: [B] ints, equal for samples of the same prompt.
    Returns [B]; a group whose rewards are all equal (or of one sample) gets zeros.
    """
    r = _float(rewards)
    out = torch.zeros_like(r)
    for g in torch.unique(group_ids):
        idx = group_ids == g
        rg = r[idx]
        if rg.numel() < 2 or rg.max() == rg.min():
            continue
        out[idx] = (rg - rg.mean()) / (rg.std(unbiased=True) + eps)
    return out


def sequence_advantages(rewards: torch.Tensor, lengths: torch.Tensor, mode: Literal["batch", "group"] = "batch",
                        group_ids: torch.Tensor | None = None, eps: float = ADV_EPS) -> torch.Tensor:
    """Per-sequence advantages [B] from mapped rewards [B]: ``batch_advantages`` or ``group_advantages``
    (which needs ``group_ids`` [B])."""
    if mode == "batch":
        return batch_advantages(rewards, lengths, eps)
    if mode == "group":
        if group_ids is None:
            raise ValueError("group advantages need group_ids: one id per sequence, shared by a prompt's samples")
        return group_advantages(rewards, group_ids, eps)
    raise ValueError(f"advantage mode {mode!r}: must be 'batch' or 'group'")


def token_advantages(seq_advantages: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Broadcast [B] sequence advantages over padded [B, T] tokens (gamma = lambda = 1: every
    token carries its sequence's value); 0 where ``mask`` [B, T] is False."""
    return torch.where(mask.bool(), _float(seq_advantages)[:, None], 0.0)


# ---------------------------------------------------------------- policy loss


@dataclass(frozen=True)
class PolicyStats:
    """What ``policy_loss`` measured, over the micro-batch's response tokens.

    tokens: response tokens counted (the loss's denominator).
    masked_fraction: share whose sampler-to-learner weight exceeded the threshold ("mask").
    truncated_fraction: share whose weight was cut to the cap ("tis").
    clip_fraction: share where the clipped surrogate was the one taken.
    nonfinite_fraction: share dropped because a log-prob was -inf or nan (e.g. a sampled token outside
        the learner's top-k): they would turn the whole loss into nan.
    ratio_mean, ratio_max: the sampler-to-learner weight exp(proximal - sampler), before correction.
    logprob_diff_mean, logprob_diff_max: |learner - sampler| log-prob gap (verl's rollout-vs-train telemetry).
    The ratio and gap statistics are over the tokens with finite log-probs.
    """

    tokens: int
    masked_fraction: float
    truncated_fraction: float
    clip_fraction: float
    nonfinite_fraction: float
    ratio_mean: float
    ratio_max: float
    logprob_diff_mean: float
    logprob_diff_max: float


def policy_loss(
    logp: torch.Tensor, sampler_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, *,
    clip: float = 0.4, correction: Literal["mask", "tis"] = "mask", ratio_threshold: float = 5.0,
    tis_cap: float = 2.0, proximal_logp: torch.Tensor | None = None,
) -> tuple[torch.Tensor, PolicyStats]:
    """Decoupled-PPO clipped surrogate, token mean over ``mask``.

    logp: [*] learner log-probs of the sampled tokens, with gradients.
    sampler_logp: [*] the rollout engine's log-probs of the same tokens (behaviour policy).
    advantages: [*] per-token advantages (``token_advantages``).
    mask: [*] bool, True on response tokens.
    proximal_logp: [*] the trust region's centre (default: ``logp`` detached).
    Per token: ``max(-A * rho, -A * clamp(rho, 1 - clip, 1 + clip)) * w`` with
    ``rho = exp(logp - proximal)`` and ``w = exp(proximal - sampler)``; "mask" sets w = 0 where
    w > ratio_threshold (w equal to it is kept), "tis" uses min(w, tis_cap). Tokens with a non-finite
    log-prob contribute 0. Returns (scalar loss = sum over ``mask`` / its count, stats).
    """
    mask = mask.bool()
    lp = _float(logp)
    prox = lp.detach() if proximal_logp is None else _float(proximal_logp).detach()
    samp = _float(sampler_logp).detach()
    adv = _float(advantages).detach()
    count = int(mask.sum())
    # where(), never multiply: padding (and a rare real token) may hold -inf / nan, and 0 * nan is nan
    keep = mask & torch.isfinite(lp.detach()) & torch.isfinite(prox) & torch.isfinite(samp)

    rho = torch.exp(torch.where(keep, lp - prox, 0.0))
    surrogate = -adv * rho
    clipped_surrogate = -adv * torch.clamp(rho, 1.0 - clip, 1.0 + clip)
    per_token = torch.maximum(surrogate, clipped_surrogate)
    clipped = (clipped_surrogate > surrogate) & keep

    # compared in log space so a weight exactly at the threshold is kept whatever the dtype
    log_w = torch.where(keep, prox - samp, 0.0)
    if correction == "mask":
        masked = (log_w > math.log(ratio_threshold)) & keep
        truncated = torch.zeros_like(mask)
        weight = torch.where(masked, 0.0, torch.exp(log_w))
    elif correction == "tis":
        masked = torch.zeros_like(mask)
        truncated = (log_w > math.log(tis_cap)) & keep
        weight = torch.exp(torch.clamp(log_w, max=math.log(tis_cap)))
    else:
        raise ValueError(f"correction {correction!r}: must be 'mask' or 'tis'")

    loss = torch.where(keep, per_token * weight, 0.0).sum() / max(count, 1)

    with torch.no_grad():
        n = max(count, 1)
        w_kept = torch.exp(log_w[keep])
        gap = (lp.detach() - samp).abs()[keep]
        any_kept = bool(w_kept.numel())
        stats = PolicyStats(
            tokens=count,
            masked_fraction=int(masked.sum()) / n,
            truncated_fraction=int(truncated.sum()) / n,
            clip_fraction=int(clipped.sum()) / n,
            nonfinite_fraction=(count - int(keep.sum())) / n,
            ratio_mean=float(w_kept.mean()) if any_kept else 0.0,
            ratio_max=float(w_kept.max()) if any_kept else 0.0,
            logprob_diff_mean=float(gap.mean()) if any_kept else 0.0,
            logprob_diff_max=float(gap.max()) if any_kept else 0.0,
        )
    return loss, stats


# ---------------------------------------------------------------- penalty and scaling


def sparsity_penalty(alpha: torch.Tensor, reward_mean: float | torch.Tensor, *, beta: float,
                     tau: float) -> torch.Tensor:
    """RLKV's adaptive penalty ``beta * mean(|alpha|) * (exp(r) - 1) * [r > tau]``.

    alpha: [L, H_kv] gates (any shape; the mean is over all). reward_mean: r, the mean raw
    reward in [0, 1], taken as a constant (detached). Off (an exact 0 that still depends on
    alpha, so the graph stays the same) when r <= tau or beta = 0: the L1 pull stops while
    accuracy is low, so the sparse reward is not drowned.
    """
    r = float(reward_mean)
    factor = beta * math.expm1(r) if r > tau else 0.0
    return alpha.abs().mean() * factor


def token_share(micro_tokens: int, batch_tokens: int) -> float:
    """A micro-batch's share of the batch's response tokens: its loss is scaled by it, so the
    gradients summed over micro-batches equal the full batch's."""
    if batch_tokens <= 0:
        raise ValueError(f"batch_tokens = {batch_tokens}: a batch must hold response tokens")
    if not 0 <= micro_tokens <= batch_tokens:
        raise ValueError(f"micro_tokens = {micro_tokens} must be in [0, batch_tokens = {batch_tokens}]")
    return micro_tokens / batch_tokens


# ---------------------------------------------------------------- one micro-batch


@dataclass(frozen=True)
class LossStats(PolicyStats):
    """``PolicyStats`` plus the micro-batch's loss terms.

    loss: the scaled total (share x (pg_loss + penalty)); summed over micro-batches it is the batch loss.
    pg_loss: the policy loss (token mean, unscaled). penalty: the penalty (unscaled).
    penalty_reward: the r the penalty saw. penalty_on: 1.0 when r > tau (a fraction once merged).
    """

    loss: float = 0.0
    pg_loss: float = 0.0
    penalty: float = 0.0
    penalty_reward: float = 0.0
    penalty_on: float = 0.0


_MAX_KEYS = ("ratio_max", "logprob_diff_max")
_SUM_KEYS = ("tokens", "loss")


def merge_stats(parts: Sequence[LossStats]) -> LossStats:
    """One step's stats from its micro-batches': maxima of the ``*_max`` keys, sums of tokens and
    loss, token-weighted means of the rest."""
    if not parts:
        raise ValueError("merge_stats needs at least one micro-batch")
    total = sum(p.tokens for p in parts)
    merged: dict[str, float] = {}
    for f in fields(LossStats):
        values = [getattr(p, f.name) for p in parts]
        if f.name in _MAX_KEYS:
            merged[f.name] = max(values)
        elif f.name in _SUM_KEYS:
            merged[f.name] = sum(values)
        else:
            merged[f.name] = sum(v * p.tokens for v, p in zip(values, parts)) / total if total else 0.0
    merged["tokens"] = int(merged["tokens"])
    return LossStats(**merged)  # type: ignore[arg-type]


class Objective:
    """The loss with its settings (``train.objective``): advantages for a batch, then the scaled
    loss of each micro-batch."""

    def __init__(self, config: ObjectiveConfig) -> None:
        self.config = config

    def advantages(self, raw_rewards: torch.Tensor, lengths: torch.Tensor,
                   group_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Per-sequence advantages [B] of the WHOLE batch (compute before splitting into micro-batches).

        raw_rewards: [B] in [0, 1]; lengths: [B] response tokens; group_ids: [B], for "group".
        """
        c = self.config
        mapped = map_rewards(raw_rewards, c.reward_scale, c.reward_bias)
        return sequence_advantages(mapped, lengths, c.advantage, group_ids)

    def micro_batch_loss(
        self, logp: torch.Tensor, sampler_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
        alpha: torch.Tensor, raw_rewards: torch.Tensor, batch_tokens: int,
        batch_reward_mean: float | None = None, proximal_logp: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, LossStats]:
        """The scaled loss of one micro-batch; call ``backward`` on each and step once.

        logp, sampler_logp, advantages, mask, proximal_logp: as ``policy_loss`` (the micro-batch's tokens).
        alpha: the gates [L, H_kv] with gradients. raw_rewards: [b] the micro-batch's sequences'
        raw rewards. batch_tokens: response tokens of the whole batch. batch_reward_mean: the
        batch's mean raw reward, required with penalty_scope "batch".
        """
        c = self.config
        pg, ps = policy_loss(logp, sampler_logp, advantages, mask, clip=c.clip, correction=c.correction,
                             ratio_threshold=c.ratio_threshold, tis_cap=c.tis_cap, proximal_logp=proximal_logp)
        if c.penalty_scope == "batch":
            if batch_reward_mean is None:
                raise ValueError("penalty_scope 'batch' needs batch_reward_mean, the batch's mean raw reward")
            r = float(batch_reward_mean)
        else:
            r = float(_float(raw_rewards).mean()) if raw_rewards.numel() else 0.0
        reg = sparsity_penalty(alpha, r, beta=c.beta, tau=c.tau)
        share = token_share(ps.tokens, batch_tokens)
        loss = share * (pg + reg)
        stats = LossStats(**asdict(ps), loss=float(loss.detach()), pg_loss=float(pg.detach()),
                          penalty=float(reg.detach()), penalty_reward=r, penalty_on=float(r > c.tau and c.beta > 0))
        return loss, stats
