"""The streaming pools' serve seam with vLLM's fp8 queries (FA3 with an fp8 cache).

A decode step of ``TritonPool.serve`` given the fp8 queries and their q_scale must do exactly
what it does given ``dequantize_query``'s model-dtype copy (same outputs, ring and paged
writes, bit for bit), except that the full heads' inputs hold the fp8 queries as they are.
The copy's path is the one the oracle tests of ``test_triton_stream`` cover. Triton runs
under TRITON_INTERPRET=1 without CUDA.
"""

from __future__ import annotations

import random

import pytest
import torch

from rlkv_vllm.core.patterns import LayerHeads
from rlkv_vllm.ops.pools import TorchPool, TritonPool, dequantize_query, gather_heads, head_split
from rlkv_vllm.ops.views import LayerPools, StepRows
from tests.ops.kernel_cases import fp8_queries
from tests.ops.test_triton_stream import DEVICE, fresh_seed, kernels  # noqa: F401 - the interpreter fixture


def decode_case(seed: int, permuted: bool, query_scale: str, kv_dtype: torch.dtype | None):
    """A layer of 4 KV heads (2 full at random positions, 2 streaming), group 2, and a decode
    batch of 3 rows plus a padding token, with a filled ring and an empty paged cache."""
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    h, g, d, sink, recent, block_size, blocks = 4, 2, 32, 2, 3, 16, 4
    full = tuple(sorted(rng.sample(range(h), 2)))
    layer = LayerHeads(full=full, stream=tuple(x for x in range(h) if x not in full), paged_slots=2)
    split = head_split(layer, h, g, serve=True, device=torch.device(DEVICE), permuted=permuted)
    t, c = 4, sink + recent
    q = torch.randn(t, h * g, d, generator=gen)
    q8, q_scale, _ = fp8_queries(q, h, query_scale, rng)
    k, v = torch.randn(t, h, d, generator=gen), torch.randn(t, h, d, generator=gen)
    store = kv_dtype or torch.float32
    kv = torch.zeros(blocks, block_size, 2, 2 * d).to(store).transpose(1, 2)
    ring = torch.randn(2, 5 * c, 2, d, generator=gen).to(store)
    slot_mapping = torch.tensor(rng.sample(range(blocks * block_size), 3) + [-1])
    rows = StepRows(torch.tensor([0, 1, 2, 3, 3], dtype=torch.int32), torch.tensor([5, 1, 9, 0], dtype=torch.int32),
                    torch.tensor([2, 0, 1, 4], dtype=torch.int32), slot_mapping=slot_mapping, max_query_len=1)
    scales = dict(k_scale=torch.tensor(0.7), v_scale=torch.tensor(1.3)) if kv_dtype else {}

    def pools() -> tuple[LayerPools, torch.Tensor, torch.Tensor]:
        kv_ = kv.clone().to(DEVICE)
        key_cache, value_cache = kv_.transpose(1, 2).split(d, dim=-1)
        rk, rv = ring[0].clone().to(DEVICE), ring[1].clone().to(DEVICE)
        return LayerPools(sink=sink, recent=recent, key_cache=key_cache, value_cache=value_cache,
                          paged_src=split.paged_src, ring_k=rk, ring_v=rv, ring_src=split.ring_src,
                          **{n: x.to(DEVICE) for n, x in scales.items()}), kv_, torch.stack([rk, rv])

    dev = lambda x: x.to(DEVICE)  # noqa: E731
    rows = StepRows(*(dev(x) for x in (rows.query_start_loc, rows.seq_lens, rows.slot_ids)),
                    slot_mapping=dev(slot_mapping), max_query_len=1)
    return split, dev(q8), dev(q_scale), dev(k), dev(v), rows, pools


def raw(x: torch.Tensor) -> torch.Tensor:
    return x.contiguous().view(torch.uint8)


@pytest.mark.parametrize("permuted", [True, False])
@pytest.mark.parametrize("query_scale", ["tensor", "head"])
@pytest.mark.parametrize("kv_dtype", [None, torch.float8_e4m3fn])
def test_triton_decode_takes_fp8_queries_as_the_dequantized_copy(kernels, permuted, query_scale, kv_dtype):  # noqa: F811
    seed = fresh_seed()
    split, q8, q_scale, k, v, rows, pools = decode_case(seed, permuted, query_scale, kv_dtype)
    pool = TritonPool("triton")
    assert pool.takes_fp8_queries(rows, q_scale, split.num_kv_heads)
    runs = []
    for fp8_in in (True, False):
        p, kv, ring = pools()
        out = torch.full((q8.shape[0], q8.shape[1], q8.shape[2]), float("nan"), device=DEVICE)
        q = q8 if fp8_in else dequantize_query(q8, q_scale, out.dtype)
        full = pool.serve(split, q, k, v, out, rows, p, None, 32**-0.5, q_scale=q_scale if fp8_in else None)
        runs.append((out, kv, ring, full))
    (out8, kv8, ring8, full8), (out_m, kv_m, ring_m, full_m) = runs
    stream = split.stream_q.cpu()
    assert torch.isfinite(out8[:3, stream]).all(), f"seed {seed}"
    assert torch.equal(raw(out8[:, stream]), raw(out_m[:, stream])), f"seed {seed}: ring heads' outputs differ"
    assert torch.equal(raw(kv8), raw(kv_m)) and torch.equal(raw(ring8), raw(ring_m)), f"seed {seed}: writes differ"
    # FA3's input: the paged heads' fp8 queries, byte for byte (the copy's path gathers model-dtype ones)
    assert full8.q.dtype == torch.float8_e4m3fn and full_m.q.dtype == torch.float32
    want = gather_heads(q8, split.full_q, split)
    assert torch.equal(raw(full8.q[:3]), raw(want[:3])), f"seed {seed}: gathered fp8 queries"


def test_which_steps_take_fp8_queries(kernels):  # noqa: F811
    """Decode steps of the Triton decode kernel with a scale of [] or [Hkv]; prefill chunks, the
    CUDA decode kernel, a scale of another shape and the torch pool get a dequantized copy."""
    split, q8, q_scale, k, v, rows, pools = decode_case(1, True, "tensor", None)
    h = split.num_kv_heads
    prefill = StepRows(rows.query_start_loc, rows.seq_lens, rows.slot_ids, slot_mapping=rows.slot_mapping,
                       max_query_len=2)
    triton = TritonPool("triton")
    assert triton.takes_fp8_queries(rows, q_scale, h) and triton.takes_fp8_queries(rows, torch.ones(h), h)
    assert not triton.takes_fp8_queries(prefill, q_scale, h)
    assert not triton.takes_fp8_queries(rows, torch.ones(h + 1), h)
    assert not TritonPool("cuda").takes_fp8_queries(rows, q_scale, h)
    assert not TorchPool().takes_fp8_queries(rows, q_scale, h)
