"""The PyTorch ring path against the oracle, over a grid of shapes and windows."""

import pytest
import torch

from rlkv_vllm.ops.torch_stream import (
    build_stream_plan,
    ring_stream_attention,
    ring_write,
)
from tests.stream_harness import Case, run_case

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def torch_ring_step(q, k, v, ring_k, ring_v, step, scale, out):
    ring_stream_attention(q, k, v, ring_k, ring_v, step.plan, scale, out)
    ring_write(ring_k, ring_v, k, v, step.plan)


@pytest.mark.parametrize("sink,recent", [(1, 1), (4, 8), (16, 64), (3, 5)])
@pytest.mark.parametrize("kv_heads,group", [(1, 1), (2, 3), (1, 7), (3, 2), (2, 8)])
@pytest.mark.parametrize("head_dim", [32, 64])
@pytest.mark.parametrize("device", DEVICES)
def test_ring_matches_oracle_fp32(sink, recent, kv_heads, group, head_dim, device):
    case = Case(num_reqs=5, max_len=150, kv_heads=kv_heads, group=group, head_dim=head_dim,
                sink=sink, recent=recent, seed=hash((sink, recent, kv_heads, group, head_dim)) % 1000, pad=True)
    err, n = run_case(case, torch_ring_step, device)
    assert n > 0
    assert err < 1e-5, err


@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 2e-2), (torch.float16, 5e-3)])
@pytest.mark.parametrize("device", DEVICES)
def test_ring_matches_oracle_half(dtype, tol, device):
    case = Case(num_reqs=4, max_len=200, kv_heads=2, group=4, head_dim=64, sink=16, recent=64, dtype=dtype, seed=7)
    err, _ = run_case(case, torch_ring_step, device)
    assert err < tol, err


def test_plan_candidates_and_writes():
    # one request, chunk of 5 tokens at positions 10..14, sink 2, recent 3
    plan = build_stream_plan(torch.tensor([0, 5]), torch.tensor([15]), torch.tensor([1]), 5, 2, 3, 9)
    last = plan.cand_pos[-1][plan.valid[-1]].tolist()
    assert last == [0, 1, 12, 13, 14]
    # only the last `recent` tokens (and none of the sinks here) survive into the ring
    c = 5
    kept = (plan.write_dst < 9 * c).tolist()
    assert kept == [False, False, True, True, True]
    # keys from earlier steps come from the ring, this chunk's from the step's tokens
    first = plan.from_ring[0][plan.valid[0]].tolist()  # query at 10: keys 0,1 (ring), 8,9 (ring), 10 (chunk)
    assert first == [True, True, True, True, False]


def test_padding_tokens_stay_finite():
    plan = build_stream_plan(torch.tensor([0, 3]), torch.tensor([3]), torch.tensor([0]), 6, 2, 2, 4)
    assert plan.valid[3:].any(dim=1).all()
    assert (plan.write_dst[3:] >= 4 * 4).all()  # padding writes go to the scratch slot
