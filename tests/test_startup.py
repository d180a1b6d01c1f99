"""Start-up decisions without an engine: ring slots sized by the KV budget (or set, or left at
max_num_seqs where vLLM sizes the cache), vLLM's running requests capped at them, the summary."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from rlkv_vllm import compat, startup
from rlkv_vllm.core.plan import build_plan
from rlkv_vllm.core.settings import ModelShape, RLKVConfigError, RLKVSettings

SHAPE = ModelShape(num_layers=4, num_kv_heads=4, num_q_heads=8, head_size=32, model_id="tiny")
# the tiny test model at sparsity 0.5 in fp32: 8 full heads (2,048 B/token), 8 ringed (163,840 B/slot)
MASK = np.array([[1, 1, 0, 0]] * 4, dtype=bool)


def _plan(max_num_seqs=8, **settings):
    full = tuple((int(l), int(h)) for l, h in zip(*np.nonzero(MASK)))
    st = RLKVSettings(selection="explicit", full_heads=full, **settings)
    return build_plan(st, SHAPE, max_num_seqs=max_num_seqs, dtype=torch.float32)


class Scheduler:
    """vLLM's SchedulerConfig as far as the cap goes; active=False: a release without max_num_active_seqs."""

    def __init__(self, max_num_seqs, active=True):
        self.max_num_seqs = max_num_seqs
        if active:
            self.max_num_active_seqs = None


def _config(max_num_seqs=8, max_model_len=2048, block=128, active=True):
    return SimpleNamespace(scheduler_config=Scheduler(max_num_seqs, active),
                           model_config=SimpleNamespace(max_model_len=max_model_len),
                           cache_config=SimpleNamespace(block_size=block))


def test_plan_numbers():
    plan = _plan()
    assert (plan.paged_bytes_per_token(), plan.ring_slot_nbytes) == (2048, 163_840)


def test_auto_slots_from_the_budget_cap_running_requests():
    # L = 512 tokens: r + L p = 163,840 + 1,048,576 = 1,212,416; (4 MiB - r) / that = 3.32 -> 3
    cfg = _config()
    plan = startup.size_ring_slots(cfg, _plan(slot_tokens=512), 4 << 20)
    assert (plan.num_slots, plan.ring_nbytes, plan.settings.ring_slots) == (3, 4 * 163_840, 3)
    assert cfg.scheduler_config.max_num_active_seqs == 3 and cfg.scheduler_config.max_num_seqs == 8
    assert plan.slots_by.startswith("budget: the KV budget holds 3 requests of 512 tokens")
    assert "max_num_active_seqs = 3" in plan.slots_by
    lines = startup.summary_lines(plan, cpu=True, budget=4 << 20)
    assert any(line.startswith("RLKV ring slots 3 of max_num_seqs 8, from budget: ") for line in lines)
    assert any("3 slots + 1 scratch x 80 tokens" in line for line in lines)


def test_auto_slot_tokens_is_a_quarter_of_max_model_len_in_whole_blocks():
    # max_model_len 1000 -> 250 -> 256 (two blocks of 128): r + 256 p = 688,128; (4 MiB - r) / that = 5.85
    plan = startup.size_ring_slots(_config(max_model_len=1000), _plan(), 4 << 20)
    assert plan.num_slots == 5 and "5 requests of 256 tokens (rlkv.slot_tokens = auto: max_model_len x 0.25)" in plan.slots_by


def test_without_max_num_active_seqs_max_num_seqs_is_lowered():
    cfg = _config(active=False)
    plan = startup.size_ring_slots(cfg, _plan(slot_tokens=512), 4 << 20)
    assert plan.num_slots == 3 and cfg.scheduler_config.max_num_seqs == 3
    assert "max_num_seqs = 3" in plan.slots_by


def test_a_budget_for_more_than_max_num_seqs_keeps_max_num_seqs():
    cfg = _config()
    plan = startup.size_ring_slots(cfg, _plan(), 64 << 20)
    assert plan.num_slots == 8 and plan.slots_by.startswith("max_num_seqs (the KV budget holds 8 requests")
    assert cfg.scheduler_config.max_num_active_seqs is None  # no cap needed


def test_no_budget_keeps_max_num_seqs_and_says_why():
    plan = startup.size_ring_slots(_config(), _plan(), None)
    assert plan.num_slots == 8 and "set --kv-cache-memory-bytes or rlkv.ring_slots" in plan.slots_by


def test_a_set_slot_count_wins_and_caps():
    cfg = _config()
    plan = startup.size_ring_slots(cfg, _plan(ring_slots=2), None)
    assert plan.num_slots == 2 and plan.slots_by.startswith("rlkv.ring_slots")
    assert cfg.scheduler_config.max_num_active_seqs == 2


def test_an_existing_active_cap_is_kept_when_lower():
    cfg = _config()
    cfg.scheduler_config.max_num_active_seqs = 2
    assert compat.cap_running_requests(cfg, 5) == "max_num_active_seqs"
    assert cfg.scheduler_config.max_num_active_seqs == 2


def test_slot_tokens_beyond_max_model_len_is_refused():
    with pytest.raises(RLKVConfigError) as e:
        startup.size_ring_slots(_config(max_model_len=2048), _plan(slot_tokens=4096), 4 << 20)
    msg = str(e.value)
    assert msg.startswith("rlkv.slot_tokens = 4096 is not allowed: must be at most max_model_len = 2048")
    assert "\n" not in msg


def test_fp8_sizes_slots_at_one_byte_and_says_so():
    """An fp8 KV cache: a quarter of fp32's bytes per token and per slot, so the same budget
    sizes 4x the slots' worth; the summary names the KV dtype and the kernels fp8 runs."""
    full = tuple((int(l), int(h)) for l, h in zip(*np.nonzero(MASK)))
    st = RLKVSettings(selection="explicit", full_heads=full, slot_tokens=512, decode_kernel="cuda")
    plan = build_plan(st, SHAPE, max_num_seqs=16, dtype=torch.float32, kv_dtype=torch.float8_e4m3fn)
    assert (plan.paged_bytes_per_token(), plan.ring_slot_nbytes) == (512, 40_960)
    # (4 MiB - r) / (r + L p) = (4,194,304 - 40,960) / (40,960 + 262,144) = 13.7 -> 13
    sized = startup.size_ring_slots(_config(max_num_seqs=16), plan, 4 << 20)
    assert sized.num_slots == 13
    lines = startup.summary_lines(sized, cpu=False, budget=4 << 20)
    assert any("512 B/token vs stock 1024, KV float8_e4m3fn" in line for line in lines), lines
    assert any("full heads flash_attn (FA3 fp8, queries quantised) where usable, else triton" in line
               and "decode step triton" in line for line in lines), lines
    e5m2 = build_plan(st, SHAPE, max_num_seqs=16, dtype=torch.float32, kv_dtype=torch.float8_e5m2)
    lines = startup.summary_lines(startup.size_ring_slots(_config(max_num_seqs=16), e5m2, 4 << 20), cpu=False,
                                  budget=4 << 20)
    assert any("full heads triton (fp8_e5m2 KV)" in line for line in lines), lines


def test_a_predicted_budget_sizes_an_auto_ring_and_says_how():
    """--gpu-memory-utilization: vLLM sizes the cache after the ring exists, so the ring is sized from the
    predicted budget (compat.predicted_kv_budget) exactly as from a given one, and the reason says so."""
    cfg = _config()
    plan = startup.size_ring_slots(cfg, _plan(slot_tokens=512), None, (4 << 20, "0.9 x 80 GiB - weights"))
    assert plan.num_slots == 3 and cfg.scheduler_config.max_num_active_seqs == 3
    assert plan.slots_by.startswith("budget: the predicted KV budget (0.9 x 80 GiB - weights) holds 3 requests")
    given = startup.size_ring_slots(_config(), _plan(slot_tokens=512), 4 << 20, (64 << 20, "ignored"))
    assert given.num_slots == 3 and "predicted" not in given.slots_by  # a given budget wins
    fixed = startup.size_ring_slots(_config(), _plan(ring_slots=2), None, (64 << 20, "ignored"))
    assert fixed.num_slots == 2


def test_compat_predicts_the_budget_from_device_memory_and_weights(monkeypatch):
    """On a GPU: utilization x NVML's device memory - the dense weights per rank; None where any figure is
    missing or the weights are quantised (the ring then keeps max_num_seqs slots)."""
    from vllm.platforms import current_platform

    hf = {"model_type": "llama", "vocab_size": 1000, "hidden_size": 64, "intermediate_size": 128,
          "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2}
    params = 1000 * 64 * 2 + 2 * (64 * 64 * 2 + 2 * 64 * 32 + 3 * 64 * 128 + 2 * 64) + 64

    def config(quantization=None, tp=2, pp=1):
        return SimpleNamespace(
            model_config=SimpleNamespace(hf_text_config=SimpleNamespace(to_dict=lambda: hf), dtype=torch.bfloat16,
                                         quantization=quantization),
            parallel_config=SimpleNamespace(tensor_parallel_size=tp, pipeline_parallel_size=pp),
            cache_config=SimpleNamespace(gpu_memory_utilization=0.5))

    assert compat.predicted_kv_budget(config()) is None  # this machine is the CPU platform
    monkeypatch.setattr(compat, "is_cpu_platform", lambda: False)
    monkeypatch.setattr(type(current_platform), "get_device_total_memory", classmethod(lambda cls, i=0: 8 << 30),
                        raising=False)
    budget, how = compat.predicted_kv_budget(config())
    assert budget == (4 << 30) - params * 2 // 2
    assert how.startswith("gpu_memory_utilization 0.5 x 8.0 GiB - 0.0 GiB of weights per rank")
    assert compat.predicted_kv_budget(config(quantization="fp8")) is None
    assert compat.predicted_kv_budget(config(pp=2)) is None
