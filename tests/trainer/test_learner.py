"""(a) The learner's differentiable path: alpha's gradient through the gated policy equals finite
differences; micro-batches do not change the update; the batched attention in bf16 tracks the
oracle as closely as stock attention's own bf16 error."""

from __future__ import annotations

import random

import pytest
import torch

from rlkv_trainer.config import ObjectiveConfig
from rlkv_trainer.learner import Learner, micro_batches
from rlkv_trainer.objective import Objective
from rlkv_trainer.policy import GatedPolicy, Sequence
from rlkv_trainer.rollout import Sample
from rlkv_trainer.sampling import SamplingSpec
from rlkv_vllm.core.batched import gated_attention
from rlkv_vllm.core.reference import oracle_attention

SPEC = SamplingSpec(temperature=0.8, top_k=50, top_p=0.95)


def _policy(tiny_model, **kwargs) -> GatedPolicy:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float64)
    return GatedPolicy(model, sink=2, recent=3, **kwargs)


def _samples(seed: int, n: int = 6) -> list[Sample]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        prompt = [rng.randrange(7, 500) for _ in range(rng.randint(2, 9))]
        completion = [rng.randrange(7, 500) for _ in range(rng.randint(1, 8))]
        out.append(Sample(i // 2, prompt, completion, [-rng.uniform(0.5, 4.0) for _ in completion], "length", 0))
    return out


def _rms_norm_in_input_dtype(self, hidden_states):  # noqa: ANN001 - transformers' RMSNorm, without the float32
    variance = hidden_states.pow(2).mean(-1, keepdim=True)
    return self.weight * (hidden_states * torch.rsqrt(variance + self.variance_epsilon))


def test_alpha_gradient_matches_finite_differences(tiny_model, monkeypatch):
    from transformers.models.llama import modeling_llama

    # transformers' RMSNorm computes in float32 even in a float64 model; its rounding (~1e-7
    # relative, and it depends on alpha) would swamp a difference quotient: make the model all float64
    monkeypatch.setattr(modeling_llama.LlamaRMSNorm, "forward", _rms_norm_in_input_dtype)
    policy = _policy(tiny_model)
    # float64 gates for the finite differences (the trainer keeps them float32)
    policy.alpha.data = torch.rand(policy.alpha.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    seqs = [Sequence(s.prompt, s.completion) for s in _samples(1)]
    weights = [torch.randn(len(s.completion), dtype=torch.float64, generator=torch.Generator().manual_seed(i))
               for i, s in enumerate(seqs)]

    def f() -> torch.Tensor:
        lps = policy.completion_logprobs(seqs, SamplingSpec(temperature=0.8))
        return sum((w * lp.double()).sum() for w, lp in zip(weights, lps))

    policy.alpha.grad = None
    f().backward()
    grad = policy.alpha.grad.clone()
    assert grad.abs().max() > 1e-3
    h = 1e-5
    for layer, head in [(0, 0), (1, 3), (2, 1), (3, 2)]:
        with torch.no_grad():
            base = float(policy.alpha[layer, head])
            policy.alpha[layer, head] = base + h
            up = float(f())
            policy.alpha[layer, head] = base - h
            down = float(f())
            policy.alpha[layer, head] = base
        fd = (up - down) / (2 * h)
        assert abs(fd - float(grad[layer, head])) < 1e-6 * max(1.0, abs(fd)), (layer, head, fd, grad[layer, head])


def test_micro_batches_do_not_change_the_update(tiny_model):
    samples = _samples(2, n=8)
    rewards = [1.0, 0.0, 1.0, 1.0, 0.0, 0.0, 1.0, 0.0]
    after = []
    for budget in (10_000, 13):
        assert len(micro_batches(samples, budget)) == (1 if budget > 1000 else len(micro_batches(samples, 13)))
        policy = _policy(tiny_model)
        learner = Learner(policy, Objective(ObjectiveConfig(beta=1e-2, tau=0.1)), spec=SPEC, lr=1e-2,
                          weight_decay=0.017, micro_batch_tokens=budget)
        stats = learner.step(samples, rewards)
        assert stats["finite"] and stats["response_tokens"] == sum(len(s.completion) for s in samples)
        after.append(policy.alpha.detach().clone())
    assert len(micro_batches(samples, 13)) > 3
    torch.testing.assert_close(after[0], after[1], rtol=0, atol=1e-10)
    assert (after[0] != 1.0).any()  # the step moved the gates


def test_gradient_checkpointing_recomputes_layers_and_keeps_the_gradient(tiny_model):
    """transformers checkpoints a layer only in training mode; the policy is in eval mode (no dropout), so it
    flags the decoder layers alone: each layer's attention runs twice per backward (forward + recompute),
    dropout stays off, and alpha's gradient is the one without checkpointing."""
    from transformers import AutoModelForCausalLM

    seqs = [Sequence(s.prompt, s.completion) for s in _samples(5)]
    grads, calls = [], []
    for checkpointing in (False, True):
        model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float64)
        policy = GatedPolicy(model, sink=2, recent=3, gradient_checkpointing=checkpointing)
        policy.alpha.data = torch.rand(policy.alpha.shape, generator=torch.Generator().manual_seed(7))
        attn = model.model.layers[1].self_attn
        assert not attn.training and not model.training
        n = [0]
        hook = attn.register_forward_hook(lambda *_: n.__setitem__(0, n[0] + 1))
        lps = policy.completion_logprobs(seqs, SPEC)
        sum(lp.sum() for lp in lps).backward()
        hook.remove()
        calls.append(n[0])
        grads.append(policy.alpha.grad.clone())
    assert calls == [1, 2]
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-12, atol=1e-12)


def test_state_dict_round_trip(tiny_model):
    samples, rewards = _samples(4), [1.0, 0.0, 0.0, 1.0, 1.0, 0.0]
    a = Learner(_policy(tiny_model), Objective(ObjectiveConfig()), spec=SPEC, lr=1e-2, weight_decay=0.017)
    a.step(samples, rewards)
    b = Learner(_policy(tiny_model), Objective(ObjectiveConfig()), spec=SPEC, lr=1e-2, weight_decay=0.017)
    b.load_state_dict(a.state_dict())
    a.step(samples, rewards), b.step(samples, rewards)
    torch.testing.assert_close(a.policy.alpha, b.policy.alpha, rtol=0, atol=0)


@pytest.mark.parametrize("group", [1, 4, 7])
def test_batched_attention_in_bf16_tracks_the_oracle(group):
    """bf16 inputs: our error against the float64 oracle is at most stock attention's own bf16 error
    (torch SDPA in bf16 on the same inputs, causal, every head full) times a small factor."""
    gen = torch.Generator().manual_seed(group)
    b, t, hk, d = 3, 40, 2, 32
    q = torch.randn(b, t, hk * group, d, generator=gen, dtype=torch.float64)
    k = torch.randn(b, t, hk, d, generator=gen, dtype=torch.float64)
    v = torch.randn(b, t, hk, d, generator=gen, dtype=torch.float64)
    alpha = torch.rand(hk, generator=gen)
    scale = d**-0.5
    truth_full = torch.stack([oracle_attention(q[i], k[i], v[i], scale=scale) for i in range(b)])
    truth = torch.stack([oracle_attention(q[i], k[i], v[i], scale=scale, alpha=alpha, sink=3, recent=5)
                         for i in range(b)])
    qb, kb, vb = (x.to(torch.bfloat16) for x in (q, k, v))
    rep = lambda x: x.repeat_interleave(group, dim=2).transpose(1, 2)  # noqa: E731 - [B, Hq, T, D]
    stock = torch.nn.functional.scaled_dot_product_attention(qb.transpose(1, 2), rep(kb), rep(vb), is_causal=True,
                                                             scale=scale).transpose(1, 2)
    ours = gated_attention(qb, kb, vb, scale=scale, sink=3, recent=5, alpha=alpha)
    assert ours.dtype == torch.bfloat16
    err_stock = float((stock.double() - truth_full).abs().max())
    err_ours = float((ours.double() - truth).abs().max())
    assert err_ours <= 2.0 * err_stock + 1e-3, (err_ours, err_stock)


def test_dummy_weights_build_the_folders_shape(tiny_model):
    """model.load_format = dummy: the learner builds the shape with random weights (speed runs)."""
    real = _policy(tiny_model)
    dummy = GatedPolicy.from_pretrained(tiny_model, dummy_weights=True, sink=2, recent=3)
    assert dummy.alpha.shape == real.alpha.shape
    a = dict(real.model.named_parameters())
    b = dict(dummy.model.named_parameters())
    assert a.keys() == b.keys() and all(a[k].shape == b[k].shape for k in a)
    assert not torch.equal(a["model.layers.0.self_attn.q_proj.weight"].float(),
                           b["model.layers.0.self_attn.q_proj.weight"].float())
    lps = dummy.completion_logprobs([Sequence([5, 6, 7], [8, 9])], SamplingSpec())
    assert lps[0].shape == (2,) and torch.isfinite(lps[0]).all()


def test_attention_choice(tiny_model):
    """"auto" is batched on the CPU (flex on CUDA); "flex" installs the fused implementation."""
    assert _policy(tiny_model, attention="auto").model.config._attn_implementation == "rlkv_oracle"
    assert _policy(tiny_model, attention="flex").model.config._attn_implementation == "rlkv_fused"
    with pytest.raises(ValueError, match="attention must be"):
        _policy(tiny_model, attention="sdpa")


def test_flex_learner_step_equals_batched(tiny_model, monkeypatch):
    """One learner step with the fused attention, gradient checkpointing on, moves alpha as the batched
    one does (fp64; torch's CPU check against flex_attention's backward lifted: its eager backward is the
    reference math)."""
    import torch.nn.attention.flex_attention as fa

    monkeypatch.setattr(fa, "_validate_device", lambda *args: None)
    samples, rewards = _samples(5), [1.0, 0.0, 0.0, 1.0, 1.0, 0.0]
    after, stats = [], []
    for attention in ("batched", "flex"):
        policy = _policy(tiny_model, attention=attention, gradient_checkpointing=True)
        learner = Learner(policy, Objective(ObjectiveConfig(beta=1e-2, tau=0.1)), spec=SPEC, lr=1e-2,
                          weight_decay=0.017)
        stats.append(learner.step(samples, rewards))
        after.append(learner.policy.alpha.detach().clone())
    assert (after[0] != 1.0).any()
    torch.testing.assert_close(after[1], after[0], rtol=0, atol=1e-10)
    assert abs(stats[0]["grad_norm"] - stats[1]["grad_norm"]) < 1e-9 * max(1.0, stats[0]["grad_norm"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusals are for a machine without CUDA")
@pytest.mark.parametrize("overrides, message", [
    (["learner.device=auto", "learner.attention=flex"],
     r"^train.learner.attention = 'flex' is not allowed: FlexAttention runs on CUDA and learner.device = 'auto' "
     r"found none"),
    (["rollout.sleep=true", "rollout.colocate=true"],
     r"^train.rollout.sleep = true is not allowed: vLLM's sleep mode needs a CUDA GPU and this run rolls out on "
     r"the CPU; use false$"),
], ids=["flex", "sleep"])
def test_cuda_only_options_on_a_cpu_run_are_refused(overrides, message, tmp_path):
    from rlkv_trainer.config import CONFIG_DIR, TrainConfigError, load_config
    from rlkv_trainer.run import Run

    with pytest.raises(TrainConfigError, match=message):
        Run(load_config(f"{CONFIG_DIR}/tiny.yaml", overrides), str(tmp_path))
