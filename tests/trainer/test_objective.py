"""The objective, term by term, against numbers derived by hand (closed forms written out below).

The fixed batch: three sequences with 2, 3 and 1 response tokens, raw rewards 1, 0, 0, padded to
[3, 3]. Learner minus sampler log-prob per token (the sampler-to-learner weight w = e^that):
    row 0: w = 1, 1.5        row 1: w = 0.5, 6, 1        row 2: w = 3
"""

from __future__ import annotations

import math

import pytest
import torch

from rlkv_trainer.config import ObjectiveConfig
from rlkv_trainer.objective import (
    ADV_EPS, LossStats, Objective, batch_advantages, group_advantages, map_rewards, merge_stats, policy_loss,
    sequence_advantages, sparsity_penalty, token_advantages, token_share,
)

D = torch.float64
LN = math.log
MASK = torch.tensor([[True, True, False], [True, True, True], [True, False, False]])
LENGTHS = torch.tensor([2, 3, 1])
RAW = torch.tensor([1.0, 0.0, 0.0], dtype=D)

# mapped rewards +5, -5, -5 over 6 tokens: mean = (2*5 - 4*5) / 6 = -5/3;
# deviations 20/3 (2 tokens) and -10/3 (4 tokens): sum of squares 1200/9, unbiased var 1200/9/5 = 80/3
STD = math.sqrt(80 / 3)
A1 = (20 / 3) / (STD + ADV_EPS)   # sequence 0
A2 = (-10 / 3) / (STD + ADV_EPS)  # sequences 1 and 2


def _batch(requires_grad: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    learner = torch.tensor([[-1.0, -2.0, 0.0], [-0.5, -1.5, -3.0], [-0.2, 0.0, 0.0]], dtype=D)
    log_w = torch.tensor([[0.0, LN(1.5), 0.0], [LN(0.5), LN(6), 0.0], [LN(3), 0.0, 0.0]], dtype=D)
    sampler = learner - log_w
    learner = learner.masked_fill(~MASK, -math.inf)  # padding holds garbage; it must not leak
    return learner.requires_grad_(requires_grad), sampler


def _adv() -> torch.Tensor:
    return token_advantages(torch.tensor([A1, A2, A2], dtype=D), MASK)


# ---------------------------------------------------------------- rewards and advantages


def test_reward_mapping_is_the_references():
    assert map_rewards(torch.tensor([0.0, 1.0, 0.5])).tolist() == [-5.0, 5.0, 0.0]
    assert map_rewards(torch.tensor([0.0, 1.0]), scale=2.0, bias=0.0).tolist() == [0.0, 2.0]


def test_batch_advantages_token_weighted():
    adv = batch_advantages(map_rewards(RAW), LENGTHS)
    assert adv.tolist() == pytest.approx([A1, A2, A2], rel=1e-12)
    # the +-5 scale cancels (up to eps)
    assert batch_advantages(RAW, LENGTHS).tolist() == pytest.approx([A1, A2, A2], rel=1e-4)


def test_batch_advantages_weights_by_tokens_not_sequences():
    # same rewards, lengths 1, 1, 4: mean = (5 - 5 - 20) / 6 = -10/3; deviations 25/3 (1 token), -5/3 (5 tokens)
    # sum of squares 625/9 + 125/9 = 750/9, unbiased var 750/45 = 50/3
    adv = batch_advantages(map_rewards(RAW), torch.tensor([1, 1, 4]))
    std = math.sqrt(50 / 3)
    assert adv.tolist() == pytest.approx([(25 / 3) / (std + ADV_EPS), (-5 / 3) / (std + ADV_EPS),
                                          (-5 / 3) / (std + ADV_EPS)], rel=1e-12)


def test_group_advantages():
    # group 0: +5, -5: mean 0, unbiased std sqrt(50); group 1 has one sample: no baseline, 0
    adv = group_advantages(map_rewards(RAW), torch.tensor([0, 0, 1]))
    s = math.sqrt(50)
    assert adv.tolist() == pytest.approx([5 / (s + ADV_EPS), -5 / (s + ADV_EPS), 0.0], rel=1e-12)
    # 4 samples 1, 1, 1, 0 -> +5, +5, +5, -5: mean 2.5, unbiased var (3 * 6.25 + 56.25) / 3 = 25
    adv = group_advantages(map_rewards(torch.tensor([1.0, 1.0, 1.0, 0.0], dtype=D)), torch.zeros(4, dtype=torch.long))
    assert adv.tolist() == pytest.approx([2.5 / (5 + ADV_EPS)] * 3 + [-7.5 / (5 + ADV_EPS)], rel=1e-12)


@pytest.mark.parametrize("mode", ["batch", "group"])
@pytest.mark.parametrize("value", [0.0, 1.0, 0.3])
def test_equal_rewards_give_zero_advantages_and_zero_gradient(mode, value):
    raw = torch.full((4,), value, dtype=torch.float32)
    adv = sequence_advantages(map_rewards(raw), torch.tensor([3, 1, 2, 5]), mode, torch.tensor([0, 0, 1, 1]))
    assert torch.equal(adv, torch.zeros(4))
    learner = torch.randn(4, 5, dtype=D, requires_grad=True)
    mask = torch.ones(4, 5, dtype=torch.bool)
    loss, _ = policy_loss(learner, learner.detach() - 0.3, token_advantages(adv, mask), mask)
    loss.backward()
    assert loss.item() == 0.0
    assert torch.equal(learner.grad, torch.zeros_like(learner))


def test_group_mode_needs_group_ids():
    with pytest.raises(ValueError, match="group_ids"):
        sequence_advantages(RAW, LENGTHS, "group")


def test_token_advantages_broadcast():
    adv = token_advantages(torch.tensor([2.0, -1.0]), torch.tensor([[True, True, False], [True, False, False]]))
    assert adv.tolist() == [[2.0, 2.0, 0.0], [-1.0, 0.0, 0.0]]


# ---------------------------------------------------------------- policy loss


def test_policy_loss_mask_by_hand():
    learner, sampler = _batch()
    loss, st = policy_loss(learner, sampler, _adv(), MASK, clip=0.4, correction="mask", ratio_threshold=5.0)
    # proximal = learner (detached): rho = 1, per-token loss = -A * w, w = 6 masked to 0; mean over 6 tokens
    expected = (-(1 + 1.5) * A1 - (0.5 + 0 + 1) * A2 - 3 * A2) / 6
    assert loss.item() == pytest.approx(expected, rel=1e-12)
    loss.backward()
    # d/d logp of -A * w * rho = -A * w (rho = 1, rho' = rho), over 6 tokens; padding gets nothing
    grad = torch.tensor([[-A1 * 1, -A1 * 1.5, 0], [-A2 * 0.5, 0, -A2 * 1], [-A2 * 3, 0, 0]], dtype=D) / 6
    torch.testing.assert_close(learner.grad, grad, rtol=1e-12, atol=1e-15)
    assert st.tokens == 6
    assert st.masked_fraction == pytest.approx(1 / 6)
    assert st.truncated_fraction == 0.0
    assert st.clip_fraction == 0.0
    assert st.ratio_mean == pytest.approx((1 + 1.5 + 0.5 + 6 + 1 + 3) / 6, rel=1e-12)
    assert st.ratio_max == pytest.approx(6.0, rel=1e-12)
    # |log w|: 0, ln 1.5, ln 2, ln 6, 0, ln 3 -> mean ln(54) / 6
    assert st.logprob_diff_mean == pytest.approx(LN(54) / 6, rel=1e-12)
    assert st.logprob_diff_max == pytest.approx(LN(6), rel=1e-12)


def test_policy_loss_tis_by_hand():
    learner, sampler = _batch()
    loss, st = policy_loss(learner, sampler, _adv(), MASK, correction="tis", tis_cap=2.0)
    # weights truncated at 2: 6 -> 2 and 3 -> 2; nothing dropped
    expected = (-(1 + 1.5) * A1 - (0.5 + 2 + 1) * A2 - 2 * A2) / 6
    assert loss.item() == pytest.approx(expected, rel=1e-12)
    loss.backward()
    grad = torch.tensor([[-A1 * 1, -A1 * 1.5, 0], [-A2 * 0.5, -A2 * 2, -A2 * 1], [-A2 * 2, 0, 0]], dtype=D) / 6
    torch.testing.assert_close(learner.grad, grad, rtol=1e-12, atol=1e-15)
    assert st.masked_fraction == 0.0
    assert st.truncated_fraction == pytest.approx(2 / 6)
    assert st.ratio_max == pytest.approx(6.0, rel=1e-12)  # telemetry is before correction


def test_clipped_surrogate_by_hand():
    # proximal given, sampler = proximal (w = 1). rho = e^0.5 (above 1.4) or e^-1 (below 0.6)
    prox = torch.tensor([-1.0, -1.0, -1.0, -1.0], dtype=D)
    learner = (prox + torch.tensor([0.5, 0.5, -1.0, -1.0], dtype=D)).requires_grad_(True)
    adv = torch.tensor([1.0, -1.0, 1.0, -1.0], dtype=D)
    mask = torch.ones(4, dtype=torch.bool)
    loss, st = policy_loss(learner, prox, adv, mask, clip=0.4, proximal_logp=prox)
    e5, em1 = math.exp(0.5), math.exp(-1.0)
    # A>0, rho>1.4: max(-rho, -1.4) = -1.4 (clipped); A<0, rho>1.4: max(rho, 1.4) = rho;
    # A>0, rho<0.6: max(-rho, -0.6) = -rho; A<0, rho<0.6: max(rho, 0.6) = 0.6 (clipped)
    assert loss.item() == pytest.approx((-1.4 + e5 - em1 + 0.6) / 4, rel=1e-12)
    loss.backward()
    torch.testing.assert_close(learner.grad, torch.tensor([0.0, e5, -em1, 0.0], dtype=D) / 4, rtol=1e-12, atol=0)
    assert st.clip_fraction == 0.5


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_mask_threshold_is_exclusive(dtype):
    # sampler 0: log w = learner exactly. w = 5 is kept, just above 5 is masked; no lower cap
    learner = torch.tensor([LN(5), LN(5) + 1e-4, LN(1e-3)], dtype=dtype, requires_grad=True)
    sampler = torch.zeros(3, dtype=dtype)
    mask = torch.ones(3, dtype=torch.bool)
    loss, st = policy_loss(learner, sampler, torch.ones(3, dtype=dtype), mask, ratio_threshold=5.0)
    loss.backward()
    assert st.masked_fraction == pytest.approx(1 / 3)
    # -A * w / 3 per kept token
    assert learner.grad.tolist() == pytest.approx([-5 / 3, 0.0, -1e-3 / 3], rel=1e-5)
    assert loss.item() == pytest.approx(-(5 + 1e-3) / 3, rel=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_tis_cap_boundary(dtype):
    learner = torch.tensor([LN(2), LN(2) + 0.1, LN(0.01)], dtype=dtype, requires_grad=True)
    loss, st = policy_loss(learner, torch.zeros(3, dtype=dtype), torch.ones(3, dtype=dtype),
                           torch.ones(3, dtype=torch.bool), correction="tis", tis_cap=2.0)
    loss.backward()
    assert st.truncated_fraction == pytest.approx(1 / 3)
    assert learner.grad.tolist() == pytest.approx([-2 / 3, -2 / 3, -0.01 / 3], rel=1e-5)


def test_a_non_finite_log_prob_is_dropped_not_nan():
    # the last real token of row 1: the learner gives the sampled token probability 0 (outside its top-k)
    learner, sampler = _batch()
    learner = learner.detach().clone()
    learner[1, 2] = -math.inf
    learner.requires_grad_(True)
    loss, st = policy_loss(learner, sampler, _adv(), MASK)
    loss.backward()
    # as test_policy_loss_mask_by_hand without row 1's third token (w = 1); the denominator stays 6
    assert loss.item() == pytest.approx((-(1 + 1.5) * A1 - 0.5 * A2 - 3 * A2) / 6, rel=1e-12)
    assert torch.isfinite(learner.grad).all() and learner.grad[1, 2] == 0
    assert st.nonfinite_fraction == pytest.approx(1 / 6)
    assert st.ratio_mean == pytest.approx((1 + 1.5 + 0.5 + 6 + 3) / 5, rel=1e-12)


def test_policy_loss_low_precision_inputs_compute_in_float32():
    learner, sampler = _batch()
    loss16, _ = policy_loss(learner.detach().to(torch.bfloat16), sampler.to(torch.bfloat16),
                            _adv().to(torch.bfloat16), MASK)
    assert loss16.dtype == torch.float32


def test_empty_mask_gives_zero_loss():
    learner = torch.zeros(2, 3, requires_grad=True)
    loss, st = policy_loss(learner, learner.detach(), torch.ones(2, 3), torch.zeros(2, 3, dtype=torch.bool))
    assert loss.item() == 0.0 and st.tokens == 0 and st.ratio_max == 0.0


# ---------------------------------------------------------------- penalty


ALPHA = [[0.2, -0.4], [1.0, 0.6]]  # mean |alpha| = 2.2 / 4 = 0.55


def test_penalty_by_hand():
    alpha = torch.tensor(ALPHA, dtype=D, requires_grad=True)
    reg = sparsity_penalty(alpha, 0.75, beta=1e-3, tau=0.5)
    assert reg.item() == pytest.approx(1e-3 * 0.55 * (math.exp(0.75) - 1), rel=1e-12)
    reg.backward()
    # d mean|alpha| / d alpha = sign(alpha) / 4
    sign = torch.tensor([[1.0, -1.0], [1.0, 1.0]], dtype=D)
    torch.testing.assert_close(alpha.grad, 1e-3 * (math.exp(0.75) - 1) * sign / 4, rtol=1e-12, atol=0)


@pytest.mark.parametrize("r", [0.0, 0.3, 0.5])
def test_penalty_off_at_or_below_tau(r):
    alpha = torch.tensor(ALPHA, requires_grad=True)
    reg = sparsity_penalty(alpha, r, beta=1e-3, tau=0.5)
    reg.backward()
    assert reg.item() == 0.0
    assert torch.equal(alpha.grad, torch.zeros(2, 2))


def test_penalty_scales_with_exp_r_minus_1():
    alpha = torch.tensor(ALPHA, dtype=D)
    p6 = sparsity_penalty(alpha, 0.6, beta=2.5e-3, tau=0.5).item()
    p9 = sparsity_penalty(alpha, 0.9, beta=2.5e-3, tau=0.5).item()
    assert p9 / p6 == pytest.approx((math.exp(0.9) - 1) / (math.exp(0.6) - 1), rel=1e-12)
    assert sparsity_penalty(alpha, torch.tensor(0.9), beta=0.0, tau=0.5).item() == 0.0


# ---------------------------------------------------------------- scaling and the class


def test_token_share():
    assert token_share(3, 12) == 0.25
    with pytest.raises(ValueError):
        token_share(3, 0)
    with pytest.raises(ValueError):
        token_share(13, 12)


def _objective(**kw) -> Objective:
    return Objective(ObjectiveConfig(**kw))


def test_micro_batch_loss_by_hand():
    obj = _objective(beta=1e-3, tau=0.3, penalty_scope="micro_batch")
    adv_seq = obj.advantages(RAW, LENGTHS)
    assert adv_seq.tolist() == pytest.approx([A1, A2, A2], rel=1e-12)
    learner, sampler = _batch()
    alpha = torch.tensor(ALPHA, dtype=D, requires_grad=True)
    # this micro-batch holds all 6 tokens of a 24-token batch: share 1/4; r = mean(1, 0, 0) = 1/3 > 0.3
    loss, st = obj.micro_batch_loss(learner, sampler, token_advantages(adv_seq, MASK), MASK, alpha, RAW,
                                    batch_tokens=24)
    pg = (-(1 + 1.5) * A1 - (0.5 + 1) * A2 - 3 * A2) / 6
    reg = 1e-3 * 0.55 * (math.exp(1 / 3) - 1)
    assert loss.item() == pytest.approx((pg + reg) / 4, rel=1e-12)
    assert st.loss == pytest.approx((pg + reg) / 4, rel=1e-12)
    assert st.pg_loss == pytest.approx(pg, rel=1e-12)
    assert st.penalty == pytest.approx(reg, rel=1e-12)
    assert st.penalty_reward == pytest.approx(1 / 3) and st.penalty_on == 1.0
    assert st.masked_fraction == pytest.approx(1 / 6)


def test_batch_scope_needs_the_batch_reward():
    obj = _objective(penalty_scope="batch")
    learner, sampler = _batch()
    with pytest.raises(ValueError, match="batch_reward_mean"):
        obj.micro_batch_loss(learner, sampler, _adv(), MASK, torch.tensor(ALPHA), RAW, batch_tokens=6)


def _random_batch(seed: int = 0):
    """8 sequences, 4 prompts x 2 samples, lengths 1..7, log-probs a smooth function of the gates."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([3, 7, 1, 5, 2, 6, 4, 4])
    mask = torch.arange(7)[None, :] < lengths[:, None]
    weights = torch.randn(8, 7, 6, generator=g, dtype=D)  # per token, a linear map of the 6 gates
    sampler = -torch.rand(8, 7, generator=g, dtype=D) * 3
    raw = torch.tensor([1, 0, 1, 1, 0, 0, 1, 1], dtype=D)
    return lengths, mask, weights, sampler, raw


def _split_gradient(splits: list[list[int]], scope: str, seed: int = 0) -> tuple[torch.Tensor, float]:
    lengths, mask, weights, sampler, raw = _random_batch(seed)
    alpha = torch.full((2, 3), 0.7, dtype=D).requires_grad_(True)
    obj = _objective(beta=0.05, tau=0.2, penalty_scope=scope, correction="mask", ratio_threshold=1.5)
    adv = obj.advantages(raw, lengths, torch.arange(8) // 2)
    total_tokens = int(lengths.sum())
    total = 0.0
    for rows in splits:
        idx = torch.tensor(rows)
        # learner log-probs: -softplus of a linear function of alpha (differentiable, <= 0)
        logp = -torch.nn.functional.softplus(torch.einsum("btk,k->bt", weights[idx], alpha.flatten()))
        loss, _ = obj.micro_batch_loss(logp, sampler[idx], token_advantages(adv[idx], mask[idx]), mask[idx], alpha,
                                       raw[idx], total_tokens, batch_reward_mean=float(raw.mean()))
        loss.backward()
        total += loss.item()
    return alpha.grad.clone(), total


@pytest.mark.parametrize("splits", [[[0, 1, 2], [3, 4, 5, 6, 7]], [[0], [1], [2, 3], [4, 5, 6], [7]],
                                    [[7, 0], [3, 1, 5], [2, 4, 6]]])
def test_micro_batches_sum_to_the_full_batch_gradient(splits):
    full_grad, full_loss = _split_gradient([list(range(8))], "batch")
    grad, loss = _split_gradient(splits, "batch")
    torch.testing.assert_close(grad, full_grad, rtol=1e-12, atol=1e-15)
    assert loss == pytest.approx(full_loss, rel=1e-12)
    assert full_grad.abs().sum() > 0  # a real gradient, not the trivial zero


def test_micro_batch_scope_penalty_is_the_token_weighted_sum():
    """With r per micro-batch, the policy part still sums to the full gradient; the penalty part is
    sum_mb share_mb * beta * (e^r_mb - 1) [r_mb > tau] * sign(alpha) / numel."""
    splits = [[0, 1], [4, 5], [2, 3, 6, 7]]  # raw rewards (1, 0), (0, 0), (1, 1, 1, 1)
    grad, _ = _split_gradient(splits, "micro_batch")
    pg_only, _ = _split_gradient(splits, "batch")
    # remove the batch-scope penalty (r = 5/8 > 0.2 on every micro-batch; shares sum to 1)
    pg_only -= 0.05 * (math.exp(5 / 8) - 1) / 6
    # tokens: (3 + 7), (2 + 6), (1 + 5 + 4 + 4) of 32; r = 1/2, 0 (off: 0 <= 0.2), 1
    expected_penalty = 0.05 / 6 * (10 / 32 * (math.exp(0.5) - 1) + 14 / 32 * (math.exp(1.0) - 1))
    torch.testing.assert_close(grad, pg_only + expected_penalty, rtol=1e-10, atol=1e-13)


def test_merge_stats():
    a = LossStats(tokens=2, masked_fraction=0.5, truncated_fraction=0.0, clip_fraction=0.0, nonfinite_fraction=0.0,
                  ratio_mean=1.0,
                  ratio_max=3.0, logprob_diff_mean=0.1, logprob_diff_max=0.2, loss=0.25, pg_loss=1.0,
                  penalty=0.0, penalty_reward=0.0, penalty_on=0.0)
    b = LossStats(tokens=6, masked_fraction=0.0, truncated_fraction=0.0, clip_fraction=0.5, nonfinite_fraction=0.0,
                  ratio_mean=2.0,
                  ratio_max=2.0, logprob_diff_mean=0.3, logprob_diff_max=0.9, loss=0.5, pg_loss=-1.0,
                  penalty=0.4, penalty_reward=1.0, penalty_on=1.0)
    m = merge_stats([a, b])
    assert m.tokens == 8 and m.loss == 0.75
    assert m.ratio_max == 3.0 and m.logprob_diff_max == 0.9
    assert m.masked_fraction == pytest.approx(2 * 0.5 / 8)
    assert m.ratio_mean == pytest.approx((2 * 1 + 6 * 2) / 8)
    assert m.pg_loss == pytest.approx((2 - 6) / 8)
    assert m.penalty_on == pytest.approx(6 / 8)
