"""An fp8 KV cache through the impl's pool views (``RLKVImplMixin._layer_pools``) and the
Triton pool, without an engine: vLLM's byte-typed paged cache is viewed as the platform's
fp8 type, the layer's own scale tensors reach the kernels (so in-place scale updates reach
them too), and one serve step stores ``quantize_kv`` bytes in both pools and attends the
streaming heads over the fp8 ring. Runs on CPU under TRITON_INTERPRET=1 (the engine tests
need fp8 kernels in vLLM: AVX-512 on CPU, SM89+ on CUDA)."""

from __future__ import annotations

import random
from types import SimpleNamespace

import pytest
import torch

from rlkv_vllm.backends.common import RLKVImplMixin
from rlkv_vllm.core.reference import oracle_attention
from rlkv_vllm.ops.pools import HeadSplit, TorchPool, head_split
from rlkv_vllm.ops.torch_stream import dequantize_kv, quantize_kv
from rlkv_vllm.ops.views import StepRows
from tests.ops.test_triton_stream import DEVICE, fresh_seed, kernels  # noqa: F401 - the kernel fixture


class Impl(RLKVImplMixin):
    """The mixin's pool views alone (no stock base, no engine)."""

    def __init__(self) -> None:  # the stock constructor and the bind are skipped on purpose
        pass


def bound_impl(pool, kv_dtype, n_heads, full, ring_rows, head_size, device):
    impl = Impl()
    impl.head_size = head_size
    impl.rlkv_runtime = SimpleNamespace(settings=SimpleNamespace(sink=2, recent=3),
                                        plan=SimpleNamespace(cache_dtype=kv_dtype))
    impl._pool = pool
    layer_heads = SimpleNamespace(full=tuple(full), stream=tuple(h for h in range(n_heads) if h not in full),
                                  paged_slots=len(full), n_full=len(full), n_stream=n_heads - len(full))
    impl._split: HeadSplit = head_split(layer_heads, n_heads, 2, True, torch.device(device))
    n_ring = n_heads - len(full)
    impl._ring_k = torch.full((ring_rows, n_ring, head_size), float("nan"), device=device).to(kv_dtype)
    impl._ring_v = impl._ring_k.clone()
    impl._pools = None
    return impl


@pytest.mark.parametrize("kv_dtype", [torch.float8_e4m3fn, torch.float8_e5m2])
def test_serve_step_stores_fp8_and_reads_it_back(kernels, kv_dtype):  # noqa: F811
    from rlkv_vllm.ops.pools import TritonPool

    seed = fresh_seed()
    gen = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    d, h, g, blocks, bs = 32, 4, 2, 4, 16
    full = sorted(rng.sample(range(h), 2))
    impl = bound_impl(TritonPool(), kv_dtype, h, full, 3 * 5, d, DEVICE)
    # vLLM's layout, bytes: logical [blocks, paged heads, block_size, 2 * D]
    kv_cache = torch.zeros(blocks, bs, 2, 2 * d, dtype=torch.uint8, device=DEVICE).transpose(1, 2)
    layer = SimpleNamespace(_k_scale=torch.tensor(0.6, device=DEVICE), _v_scale=torch.tensor(1.7, device=DEVICE))
    pools = impl._layer_pools(layer, kv_cache)
    assert pools.key_cache.dtype == torch.float8_e4m3fn  # the platform's fp8, what the stock readers view
    assert pools.key_cache.untyped_storage().data_ptr() == kv_cache.untyped_storage().data_ptr()
    assert pools.k_scale is layer._k_scale and pools.v_scale is layer._v_scale  # in-place updates reach them
    assert impl._layer_pools(layer, kv_cache) is pools  # built once per cache tensor

    n = 9  # one request, a 9-token prefill in slot 1
    q = torch.randn(n, h * g, d, generator=gen).to(DEVICE)
    k = torch.randn(n, h, d, generator=gen).to(DEVICE)
    v = torch.randn(n, h, d, generator=gen).to(DEVICE)
    slot_mapping = torch.tensor(rng.sample(range(blocks * bs), n), dtype=torch.int64)
    rows = StepRows(torch.tensor([0, n], dtype=torch.int32, device=DEVICE),
                    torch.tensor([n], dtype=torch.int32, device=DEVICE),
                    torch.tensor([1], dtype=torch.int32, device=DEVICE), slot_mapping=slot_mapping.to(DEVICE),
                    max_query_len=n)
    out = torch.full_like(q, float("nan"))
    inputs = impl._pool.serve(impl._split, q, k, v, out, rows, pools, None, d**-0.5)
    assert inputs is not None and inputs.q.shape == (n, 2 * g, d)
    # paged: the full heads' keys and values, quantised with the layer's scales
    kc, vc = pools.key_cache.cpu(), pools.value_cache.cpu()
    for t in range(n):
        b, o = divmod(int(slot_mapping[t]), bs)
        for j, head in enumerate(full):
            assert torch.equal(kc[b, o, j].view(torch.uint8),
                               quantize_kv(k[t, head].cpu(), layer._k_scale.cpu(), torch.float8_e4m3fn).view(torch.uint8))
            assert torch.equal(vc[b, o, j].view(torch.uint8),
                               quantize_kv(v[t, head].cpu(), layer._v_scale.cpu(), torch.float8_e4m3fn).view(torch.uint8))
    # ring: the streaming heads' sinks and last `recent` tokens, in the ring's own format
    stream = [x for x in range(h) if x not in full]
    ring = impl._ring_k.cpu()
    for pos, row in ((0, 5), (1, 6), (6, 7 + (6 - 2) % 3), (7, 7 + (7 - 2) % 3), (8, 7 + (8 - 2) % 3)):
        assert torch.equal(ring[row].view(torch.uint8),
                           quantize_kv(k[pos, stream].cpu(), layer._k_scale.cpu(), kv_dtype).view(torch.uint8))
    # streaming heads: this chunk's own keys (a prefill reads no ring row) against the oracle
    o = out.cpu().view(n, h, g, d)[:, stream]
    ref = oracle_attention(q.cpu().view(n, h, g, d)[:, stream].reshape(n, -1, d), k.cpu()[:, stream], v.cpu()[:, stream],
                           scale=d**-0.5, full_heads=torch.zeros(len(stream), dtype=torch.bool), sink=2, recent=3)
    assert torch.allclose(o.reshape(n, -1, d), ref.float(), atol=1e-5), f"seed {seed}"

    # a decode step at position 9 reads the fp8 ring back (dequantised): vs the oracle over
    # the dequantised keys of positions 0, 1, 7, 8 and its own
    q1, k1, v1 = (torch.randn(1, *x.shape[1:], generator=gen).to(DEVICE) for x in (q, k, v))
    rows1 = StepRows(torch.tensor([0, 1], dtype=torch.int32, device=DEVICE),
                     torch.tensor([n + 1], dtype=torch.int32, device=DEVICE),
                     torch.tensor([1], dtype=torch.int32, device=DEVICE),
                     slot_mapping=torch.tensor([-1], dtype=torch.int64, device=DEVICE), max_query_len=1)
    out1 = torch.full_like(q1, float("nan"))
    impl._pool.serve(impl._split, q1, k1, v1, out1, rows1, pools, None, d**-0.5)

    def dq(x, s):
        return dequantize_kv(quantize_kv(x, s, kv_dtype), s)

    keys = torch.cat([dq(k[[0, 1, 7, 8]][:, stream].cpu(), layer._k_scale.cpu()), k1.cpu()[:, stream]])
    vals = torch.cat([dq(v[[0, 1, 7, 8]][:, stream].cpu(), layer._v_scale.cpu()), v1.cpu()[:, stream]])
    qs = q1.cpu().view(1, h, g, d)[:, stream]
    scores = torch.einsum("hgd,chd->hgc", qs[0].double(), keys.double()) * d**-0.5
    want = torch.einsum("hgc,chd->hgd", scores.softmax(-1), vals.double())
    got = out1.cpu().view(1, h, g, d)[0, stream]
    assert torch.allclose(got.double(), want, atol=1e-5), f"seed {seed}"


def test_compute_dtype_pools_carry_no_scales():
    impl = bound_impl(TorchPool(), torch.float32, 4, [0, 3], 15, 32, "cpu")
    layer = SimpleNamespace(_k_scale=torch.tensor(1.0), _v_scale=torch.tensor(1.0))
    pools = impl._layer_pools(layer, torch.zeros(2, 2, 16, 64))
    assert pools.k_scale is None and pools.v_scale is None and pools.key_cache is None  # torch: stock writes pages


def test_cuda_decode_kernel_falls_back_to_triton_for_fp8():
    """``rlkv.decode_kernel = cuda`` with an fp8 KV cache runs Triton's decode step (the CUDA
    kernel has no fp8 path); at the model dtype the choice stands (and loads the module)."""
    import numpy as np

    from rlkv_vllm.core.plan import build_plan
    from rlkv_vllm.core.settings import ModelShape, RLKVSettings
    from rlkv_vllm.ops.pools import resolve_decode_kernel

    mask = np.array([[1, 0], [0, 1]], dtype=bool)
    settings = RLKVSettings(selection="explicit", decode_kernel="cuda", sink=4, recent=8,
                            full_heads=tuple((int(l), int(h)) for l, h in zip(*np.nonzero(mask))))
    shape = ModelShape(num_layers=2, num_kv_heads=2, num_q_heads=4, head_size=64)
    for kv in (torch.float8_e4m3fn, torch.float8_e5m2):
        plan = build_plan(settings, shape, max_num_seqs=4, dtype=torch.bfloat16, kv_dtype=kv)
        assert resolve_decode_kernel(plan, "triton", torch.device("cuda")) == "triton"
    assert resolve_decode_kernel(plan, "torch", torch.device("cuda")) == "triton"  # no Triton pool: moot
