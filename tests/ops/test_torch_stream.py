"""The PyTorch ring path against the oracle, over a grid of shapes and windows."""

import pytest
import torch

from rlkv_vllm.ops.torch_stream import (
    build_stream_plan,
    dequantize_kv,
    quantize_kv,
    ring_stream_attention,
    ring_write,
)
from tests.stream_harness import Case, run_case

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def torch_ring_step(q, k, v, ring_k, ring_v, step, scale, out):
    ring_stream_attention(q, k, v, ring_k, ring_v, step.plan, scale, out, step.k_scale, step.v_scale)
    ring_write(ring_k, ring_v, k, v, step.plan, step.k_scale, step.v_scale)


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


@pytest.mark.parametrize("kv_dtype", [torch.float8_e4m3fn, torch.float8_e5m2])
def test_quantize_kv_is_vllms_scaled_convert(kv_dtype):
    """stored = clamp(x / scale) cast to fp8 (saturating, round to nearest even); read = fp8 * scale."""
    gen = torch.Generator().manual_seed(int(torch.randint(0, 1 << 30, ()).item()))
    x = torch.cat([torch.randn(1000, generator=gen) * m for m in (1e-3, 1.0, 30.0, 1e5)])
    scale = torch.tensor(0.37)
    q = quantize_kv(x, scale, kv_dtype)
    fmax = torch.finfo(kv_dtype).max
    assert q.dtype == kv_dtype and torch.isfinite(q.float()).all()
    assert torch.equal(q.float(), (x / scale).clamp(-fmax, fmax).to(kv_dtype).float())
    back = dequantize_kv(q, scale)
    inside = (x / scale).abs() < fmax
    rel = ((back - x).abs() / x.abs().clamp(min=1e-30))[inside & ((x / scale).abs() > 1)]
    assert rel.max() <= 2.0 ** -(4 if kv_dtype == torch.float8_e4m3fn else 3) + 1e-6
    assert (back[~inside].abs() == fmax * scale).all()  # saturated, never inf or NaN


def dequantised_reference(q, k, v, ring_k, ring_v, step, scale, out):
    """The fp8 path against an explicit quantise-dequantise: the same step on a float32 copy
    of the ring holding the dequantised fp8 values must give the same output, and every ring
    row the step writes must hold ``quantize_kv`` of that token's key/value."""
    ks, vs = step.k_scale, step.v_scale
    ref_k, ref_v = dequantize_kv(ring_k, ks), dequantize_kv(ring_v, vs)
    o_ref = torch.full_like(out, float("nan"), dtype=torch.float32)
    ring_stream_attention(q.float(), k.float(), v.float(), ref_k, ref_v, step.plan, scale, o_ref)
    torch_ring_step(q, k, v, ring_k, ring_v, step, scale, out)
    n = int(step.query_start_loc[-1])
    tol = 1e-5 if out.dtype == torch.float32 else 1e-2  # one rounding of the output dtype
    assert torch.allclose(out[:n].float(), o_ref[:n].to(out.dtype).float(), rtol=tol, atol=tol / 10)
    kept = step.plan.write_dst[:n] < ring_k.shape[0] - step.plan.window  # rows a later query reads
    rows = step.plan.write_dst[:n][kept]
    assert torch.equal(ring_k[rows].view(torch.uint8), quantize_kv(k[:n][kept], ks, ring_k.dtype).view(torch.uint8))
    assert torch.equal(ring_v[rows].view(torch.uint8), quantize_kv(v[:n][kept], vs, ring_v.dtype).view(torch.uint8))


@pytest.mark.parametrize("kv_dtype,tol", [(torch.float8_e4m3fn, 0.05), (torch.float8_e5m2, 0.1)])
@pytest.mark.parametrize("sink,recent,kv_heads,group", [(4, 8, 2, 3), (16, 64, 2, 4), (1, 1, 1, 7)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("device", DEVICES)
def test_ring_fp8(kv_dtype, tol, sink, recent, kv_heads, group, dtype, device):
    """fp8 rings (random scales, permuted slots, NaN-poisoned): quantise-dequantise exact, and
    within fp8's error of the oracle (bf16 inputs: bf16's error on top)."""
    seed = int(torch.randint(0, 1 << 30, ()).item())
    case = Case(num_reqs=4, max_len=120, kv_heads=kv_heads, group=group, head_dim=32, sink=sink, recent=recent,
                dtype=dtype, seed=seed, pad=True, kv_dtype=kv_dtype)
    err, n = run_case(case, dequantised_reference, device)
    assert n > 0
    assert err < tol + (0.02 if dtype == torch.bfloat16 else 0), f"seed {seed}: rel err {err}"
