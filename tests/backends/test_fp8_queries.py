"""FP8 queries for FA3's fp8 kernel, without an engine: where the stock base takes fp8 queries (FA3 with an
fp8/fp8_e4m3 cache) vLLM's layer quantises them with ``_q_scale``; RLKV's forward then hands the full heads
the fp8 queries themselves and the streaming pool either the fp8 queries with their scale (a pool whose step
``takes_fp8_queries``: Triton's decode steps) or a dequantised copy, in serve mode (permuted, gathered, with
tensor-parallel padding) and gated mode (always the copy). Every other base and cache keeps model-dtype
queries."""

from __future__ import annotations

import random
from types import SimpleNamespace

import pytest
import torch

from rlkv_vllm.backends.common import RLKVImplMixin, RLKVMetadata
from rlkv_vllm.ops.pools import FullHeadInputs, gather_heads, head_split


class FlashLike(RLKVImplMixin):
    _rlkv_fp8_query_for_full_heads = True

    def __init__(self) -> None:  # no stock constructor, no engine: the forward alone
        pass


class TritonLike(RLKVImplMixin):
    def __init__(self) -> None:
        pass


@pytest.mark.parametrize("kv", ["fp8", "fp8_e4m3", "fp8_e5m2", "auto", None])
def test_only_a_base_that_takes_fp8_queries_keeps_the_layer_quantising_them(kv) -> None:
    takes = kv in ("fp8", "fp8_e4m3")
    assert FlashLike._rlkv_takes_fp8_queries(True, kv) is takes
    assert FlashLike._rlkv_takes_fp8_queries(False, kv) is False  # the stock impl says no (e.g. FA2)
    assert TritonLike._rlkv_takes_fp8_queries(True, kv) is False


class RecordingPool:
    """The streaming pool's contract, recording the queries it was handed."""

    writes_paged = True

    def __init__(self, takes_fp8: bool = False) -> None:
        self.q: torch.Tensor | None = None
        self.q_scale: torch.Tensor | None = None
        self.takes_fp8 = takes_fp8

    def takes_fp8_queries(self, rows, q_scale, num_kv_heads):  # type: ignore[no-untyped-def]
        return self.takes_fp8

    def serve(self, split, q, k, v, out, rows, pools, plan, scale, q_scale=None):  # type: ignore[no-untyped-def]
        self.q, self.q_scale = q.clone(), q_scale
        out[:, split.stream_q] = 0.5  # stands for the ring's output
        return FullHeadInputs(gather_heads(q, split.full_q, split), gather_heads(k, split.full_kv, split),
                              gather_heads(v, split.full_kv, split))

    def gated_stream(self, split, q, k, v, rows, pools, plan, scale):  # type: ignore[no-untyped-def]
        self.q = q.clone()
        return torch.zeros(q.shape, dtype=torch.float32)


class RecordingInner:
    def __init__(self) -> None:
        self.q: torch.Tensor | None = None

    def forward(self, layer, q, k, v, kv_cache, md, out):  # type: ignore[no-untyped-def]
        self.q = q.clone()
        out.copy_(q.to(out.dtype))


def _impl(h: int, g: int, full: list[int], slots: int, serve: bool, permuted: bool,
          pool_takes_fp8: bool = False) -> FlashLike:
    impl = FlashLike()
    impl.rlkv_runtime = SimpleNamespace(serve=serve, gates=[torch.full((h,), 0.25)])
    heads = SimpleNamespace(full=tuple(full), stream=tuple(x for x in range(h) if x not in full),
                            paged_slots=slots, n_full=len(full), n_stream=h - len(full))
    impl._split = head_split(heads, h, g, serve, torch.device("cpu"), permuted=permuted)
    impl._rlkv_layer, impl._pool, impl._inner = 0, RecordingPool(pool_takes_fp8), RecordingInner()
    impl._layer_pools = lambda layer, kv_cache: None  # type: ignore[method-assign]
    impl.scale = 0.1
    return impl


@pytest.mark.parametrize("pool_takes_fp8", [False, True])
@pytest.mark.parametrize("serve,permuted,pad", [(True, True, 0), (True, False, 0), (True, False, 1), (False, False, 0)])
def test_full_heads_get_the_fp8_queries_and_the_ring_a_dequantised_copy(serve, permuted, pad, pool_takes_fp8) -> None:
    seed = random.randrange(1 << 30)
    gen = torch.Generator().manual_seed(seed)
    h, g, d, t = 4, 2, 16, 5
    full = [0, 1] if permuted else sorted(random.Random(seed).sample(range(h), 2))
    impl = _impl(h, g, full, len(full) + pad, serve, permuted, pool_takes_fp8)
    scale = torch.tensor(0.37)
    q_model = torch.randn(t + 2, h * g, d, generator=gen)  # 2 padding rows past num_actual_tokens
    q8 = (q_model / scale).to(torch.float8_e4m3fn)  # what vLLM's query_quant hands the impl
    k = torch.randn(t + 2, h, d, generator=gen).to(torch.bfloat16)
    out = torch.zeros(t + 2, h * g, d, dtype=torch.bfloat16)
    md = RLKVMetadata(full=None, num_actual_tokens=t, rows=None, step_plan=None)
    layer = SimpleNamespace(_q_scale=scale)
    impl.forward(layer, q8, k, k.clone(), None, md, out)
    if serve and pool_takes_fp8:  # the pool's own kernel dequantises: it gets the fp8 queries and their scale
        assert impl._pool.q.dtype == torch.float8_e4m3fn and impl._pool.q_scale is scale, seed
        assert torch.equal(impl._pool.q.view(torch.uint8), q8[:t].view(torch.uint8)), seed
    else:
        want = (q8[:t].to(torch.float32) * scale).to(torch.bfloat16)
        assert impl._pool.q.dtype == torch.bfloat16 and torch.equal(impl._pool.q, want), seed
        assert impl._pool.q_scale is None, seed
    got = impl._inner.q
    assert got.dtype == torch.float8_e4m3fn, seed
    split = impl._split
    expect = q8[:t] if not serve else gather_heads(q8[:t], split.full_q, split)
    assert got.shape == expect.shape and torch.equal(got.view(torch.uint8), expect.view(torch.uint8)), seed
    if serve:  # the full heads' output (here: their fp8 queries) lands on their own heads, in the model dtype
        assert torch.equal(out[:t, split.full_q], q8[:t, split.full_q].to(torch.bfloat16)), seed
        assert bool((out[:t, split.stream_q] == 0.5).all()), seed


def test_model_dtype_queries_pass_unchanged() -> None:
    impl = _impl(4, 2, [1, 3], 2, True, False)
    q = torch.randn(3, 8, 16).to(torch.bfloat16)
    k = torch.randn(3, 4, 16).to(torch.bfloat16)
    out = torch.zeros_like(q)
    impl.forward(SimpleNamespace(), q, k, k.clone(), None,
                 RLKVMetadata(full=None, num_actual_tokens=3, rows=None, step_plan=None), out)
    assert torch.equal(impl._pool.q, q) and impl._inner.q.dtype == torch.bfloat16
