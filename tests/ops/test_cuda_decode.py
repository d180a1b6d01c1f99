"""The CUDA decode step (csrc/rlkv_decode.cu) against the oracle, on the GPU.

The same serving schedules as the Triton kernels: random chunks and decodes, permuted
slots, sequences shorter than the sink, CUDA-graph padding, a NaN-poisoned ring; steps
with one token per row go through the CUDA kernel, the others through the Triton split
kernels. Without CUDA these tests skip; test_cuda_build.py checks the build on any machine.
"""

from __future__ import annotations

import random

import pytest
import torch

from tests.ops.kernel_cases import check_writes_and_gather, embed_stream_heads
from tests.stream_harness import Case, run_case

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def kernels():
    from rlkv_vllm.ops import cuda_decode, triton_stream

    reason = cuda_decode.unavailable_reason("cuda")
    if reason is not None:
        pytest.fail(f"the CUDA decode kernel must load on a CUDA machine: {reason}")
    return triton_stream, cuda_decode.decode_step


def fresh_seed() -> int:
    return random.SystemRandom().randrange(1 << 30)


@pytest.mark.parametrize("sink,recent", [(1, 1), (4, 8), (16, 64), (3, 5)])
@pytest.mark.parametrize("kv_heads,group", [(1, 1), (2, 3), (1, 7), (3, 2), (2, 8), (4, 4)])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_cuda_decode_matches_oracle_fp32(kernels, sink, recent, kv_heads, group, head_dim):
    triton_k, cuda_step = kernels
    seed = fresh_seed()
    case = Case(num_reqs=6, max_len=300, kv_heads=kv_heads, group=group, head_dim=head_dim, sink=sink,
                recent=recent, seed=seed, pad=True, decode_steps=0.8)
    fn = embed_stream_heads(triton_k, random.Random(seed).randint(0, 2), random.Random(seed), sink, recent,
                            decode_fn=cuda_step)
    err, n = run_case(case, fn, "cuda")
    assert n > 0
    assert err < 1e-5, f"seed {seed}: rel err {err}"


@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 2e-2), (torch.float16, 5e-3)])
@pytest.mark.parametrize("head_dim,group", [(128, 4), (64, 7), (128, 1)])
def test_cuda_decode_matches_oracle_half(kernels, dtype, tol, head_dim, group):
    triton_k, cuda_step = kernels
    seed = fresh_seed()
    case = Case(num_reqs=6, max_len=600, kv_heads=2, group=group, head_dim=head_dim, sink=16, recent=64,
                dtype=dtype, seed=seed, pad=True, decode_steps=0.8)
    fn = embed_stream_heads(triton_k, 1, random.Random(seed), 16, 64, decode_fn=cuda_step)
    err, _ = run_case(case, fn, "cuda")
    assert err < tol, f"seed {seed}: rel err {err}"


@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize("num_paged,num_full", [(3, 3), (4, 2), (2, 0)])
def test_cuda_decode_writes_and_query_gather(kernels, block_size, num_paged, num_full):
    triton_k, cuda_step = kernels
    check_writes_and_gather(triton_k, cuda_step, block_size, num_paged, num_full, fresh_seed(), "cuda")


def test_cuda_decode_refuses_misaligned_rows(kernels):
    _, cuda_step = kernels
    t, h, g, d = 2, 2, 2, 64
    q = torch.randn(t, h * g * d + 1, device="cuda", dtype=torch.float16)[:, 1:].view(t, h * g, d)
    k = torch.randn(t, h, d, device="cuda", dtype=torch.float16)
    ring = torch.zeros(3 * 80, 1, d, device="cuda", dtype=torch.float16)
    from rlkv_vllm.ops.views import LayerPools, StepRows

    rows = StepRows(*(torch.tensor(x, dtype=torch.int32, device="cuda") for x in ([0, 1, 2], [5, 9], [0, 1])))
    pools = LayerPools(sink=16, recent=64, ring_k=ring, ring_v=ring.clone(),
                       ring_src=torch.tensor([1], dtype=torch.int32, device="cuda"))
    with pytest.raises(ValueError, match="16-byte aligned"):
        cuda_step(q, k, k, torch.empty_like(q), None, rows, pools, 0.125)
