"""/metrics without a server: the ring slot count and why (rlkv:ring_slots, rlkv:config_info)."""

from __future__ import annotations

import numpy as np
import torch

from rlkv_vllm import metrics as rlkv_metrics
from rlkv_vllm.core.plan import build_plan
from rlkv_vllm.core.settings import ModelShape, RLKVSettings
from rlkv_vllm.server import parse_prometheus


def test_ring_slots_count_and_why():
    from prometheus_client import CollectorRegistry, generate_latest

    shape = ModelShape(num_layers=2, num_kv_heads=2, num_q_heads=4, head_size=32, model_id="rlkv-tiny")
    full = tuple((int(l), int(h)) for l, h in zip(*np.nonzero(np.array([[1, 0], [0, 1]]))))
    plan = build_plan(RLKVSettings(selection="explicit", full_heads=full), shape, max_num_seqs=8,
                      dtype=torch.float32).with_slots(3, "budget: the KV budget holds 3 requests of 512 tokens")
    collector = rlkv_metrics.RLKVCollector()
    collector.plan = plan
    registry = CollectorRegistry()
    registry.register(collector)
    m = parse_prometheus(generate_latest(registry).decode())
    assert dict((lab["state"], v) for lab, v in m["rlkv:ring_slots"]) == {"in_use": 0.0, "free": 3.0}
    info = m["rlkv:config_info"][0][0]
    assert info["ring_slots"] == "3" and info["ring_slots_by"].startswith("budget: the KV budget holds 3")
    assert m["rlkv:ring_bytes"] == [({}, float(4 * plan.ring_slot_nbytes))]
