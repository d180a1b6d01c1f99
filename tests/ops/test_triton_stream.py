"""The Triton ring kernels against the oracle.

Without CUDA they run under TRITON_INTERPRET=1 on small shapes (CI catches a kernel
regression that way); with CUDA the grid is larger. Inputs are fresh random every run;
the seed is in each assertion message.
"""

from __future__ import annotations

import functools
import importlib
import os
import random
import re

import pytest
import torch

from tests.ops.kernel_cases import check_decode_batch, check_writes_and_gather, embed_stream_heads
from tests.stream_harness import Case, run_case

ON_GPU = torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"


@pytest.fixture(scope="module")
def kernels():
    """The kernel module, in interpreter mode when there is no GPU."""
    if not ON_GPU:
        os.environ["TRITON_INTERPRET"] = "1"
    mod = importlib.import_module("rlkv_vllm.ops.triton_stream")
    if not mod.HAVE_TRITON:
        pytest.skip("Triton is not installed")
    if not ON_GPU:
        from triton.language import standard
        from triton.runtime.interpreter import InterpretedFunction

        assert isinstance(standard.zeros, InterpretedFunction), (
            "triton.language was imported before TRITON_INTERPRET=1 was set; tests/conftest.py "
            "must import it first (run through pytest, without importing vLLM beforehand)")
    return importlib.reload(mod)  # @triton.jit reads TRITON_INTERPRET when it decorates


def fresh_seed() -> int:
    return random.SystemRandom().randrange(1 << 30)


# decode_step implementations under test: its variants; "decode-v2/hHbBsS" is v2 at H ring heads
# a program, B-row window blocks, S pipeline stages (the default: one head, 16 rows, 5 stages)
DECODE_PATHS = ["decode-v1", "decode-v2"]
V2_MULTI_HEAD = "decode-v2/h2b8s2"  # two heads a program (paged heads then in fewer programs), 8-row blocks


def decode_kernel(kernels, path: str):
    """The decode_step function of a test path ("split": None, the split kernels alone)."""
    if path == "split":
        return None
    variant, _, settings = path.removeprefix("decode-").partition("/")
    if settings:
        m = re.fullmatch(r"h(\d+)b(\d+)s(\d+)", settings)
        assert m, path
        return functools.partial(kernels.decode_step_v2, heads=int(m[1]), block=int(m[2]), num_stages=int(m[3]))
    return functools.partial(kernels.decode_step, variant=variant)


if ON_GPU:
    WINDOWS = [(1, 1), (4, 8), (16, 64), (3, 5)]
    GQA = [(1, 1), (2, 3), (1, 7), (3, 2), (2, 8), (4, 4)]
    DIMS = [64, 128]
    REQS, MAX_LEN = 6, 300
else:  # interpreter: small, still wraps the ring many times and covers odd groups
    WINDOWS = [(4, 8), (3, 5)]
    GQA = [(1, 7), (2, 3)]
    DIMS = [32]
    REQS, MAX_LEN = 4, 60


@pytest.mark.parametrize("path", ["split", *DECODE_PATHS])
@pytest.mark.parametrize("sink,recent", WINDOWS)
@pytest.mark.parametrize("kv_heads,group", GQA)
@pytest.mark.parametrize("head_dim", DIMS)
def test_ring_kernels_match_oracle_fp32(kernels, path, sink, recent, kv_heads, group, head_dim):
    """split: ring_attention + fused_kv_write on every step; decode: steps with one token
    per row (most of them, here) go through decode_step instead."""
    seed = fresh_seed()
    case = Case(num_reqs=REQS, max_len=MAX_LEN, kv_heads=kv_heads, group=group, head_dim=head_dim,
                sink=sink, recent=recent, seed=seed, pad=True, max_chunk=24 if not ON_GPU else 40,
                decode_steps=0.0 if path == "split" else 0.7)
    fn = embed_stream_heads(kernels, random.Random(seed).randint(0, 2), random.Random(seed), sink, recent,
                            decode_fn=decode_kernel(kernels, path))
    err, n = run_case(case, fn, DEVICE)
    assert n > 0
    assert err < 1e-5, f"seed {seed}: rel err {err}"


@pytest.mark.parametrize("path,group,num_ring,sink,recent,kv_dtype", [
    *[(path, *case) for path in DECODE_PATHS for case in [
        (1, 3, 16, 64, None), (4, 3, 16, 64, None), (8, 3, 16, 64, None), (3, 2, 3, 5, None),
        (8, 2, 16, 64, torch.float8_e4m3fn), (4, 3, 3, 5, torch.float8_e5m2)]],
    (V2_MULTI_HEAD, 4, 3, 16, 64, None), (V2_MULTI_HEAD, 8, 3, 16, 64, torch.float8_e4m3fn),
    ("decode-v2/h4b16s1", 1, 3, 16, 64, None), ("decode-v2/h1b32s3", 3, 2, 3, 5, None)])
def test_decode_step_one_batch(kernels, path, group, num_ring, sink, recent, kv_dtype):
    """One decode batch from a filled ring, every window state at once (the serving window
    16 + 64 and a small odd one), GROUP 1/4/8/3, float32 and fp8 rings: outputs within 1e-5
    of the oracle on the keys the kernel sees, ring writes bit for bit. v2 also at other
    settings: with three ring heads, two or four a program leave a masked head."""
    check_decode_batch(decode_kernel(kernels, path), group, num_ring, DIMS[-1], sink, recent, fresh_seed(), DEVICE,
                       kv_dtype=kv_dtype)


@pytest.mark.parametrize("path", ["split", *DECODE_PATHS])
@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 2e-2), (torch.float16, 5e-3)])
def test_ring_kernels_match_oracle_half(kernels, path, dtype, tol):
    seed = fresh_seed()
    sink, recent = (16, 64) if ON_GPU else (4, 8)
    case = Case(num_reqs=REQS, max_len=MAX_LEN * 2 if ON_GPU else MAX_LEN, kv_heads=2, group=4,
                head_dim=128 if ON_GPU else 32, sink=sink, recent=recent, dtype=dtype, seed=seed, pad=True,
                decode_steps=0.0 if path == "split" else 0.7)
    fn = embed_stream_heads(kernels, 1, random.Random(seed), sink, recent,
                            decode_fn=decode_kernel(kernels, path))
    err, _ = run_case(case, fn, DEVICE)
    assert err < tol, f"seed {seed}: rel err {err}"


@pytest.mark.parametrize("gqa", [(2, 4), (3, 1)])
def test_gated_mix(kernels, gqa):
    """alpha mixes the full result already in ``out`` with the streaming result."""
    from rlkv_vllm.core.reference import oracle_attention
    from rlkv_vllm.ops.views import LayerPools, StepRows

    seed = fresh_seed()
    gen = torch.Generator().manual_seed(seed)
    h, g = gqa
    d, sink, recent, n = 32, 2, 5, 23
    q = torch.randn(n, h * g, d, generator=gen)
    k = torch.randn(n, h, d, generator=gen)
    v = torch.randn(n, h, d, generator=gen)
    alpha = torch.rand(h, generator=gen)
    scale = d**-0.5
    full = oracle_attention(q, k, v, scale=scale).float()
    c = sink + recent
    ring = torch.full((2 * c, h, d), float("nan"), device=DEVICE)
    ring_v = torch.full_like(ring, float("nan"))
    out = full.clone().to(DEVICE)
    dev = lambda x: x.to(DEVICE)  # noqa: E731
    rows = StepRows(dev(torch.tensor([0, n], dtype=torch.int32)), dev(torch.tensor([n], dtype=torch.int32)),
                    dev(torch.tensor([0], dtype=torch.int32)))
    pools = LayerPools(sink=sink, recent=recent, ring_k=ring, ring_v=ring_v,
                       ring_src=dev(torch.arange(h, dtype=torch.int32)))
    kernels.ring_attention(dev(q), dev(k), dev(v), out, rows, pools, scale, alpha=dev(alpha))
    ref = oracle_attention(q, k, v, scale=scale, alpha=alpha, sink=sink, recent=recent).float()
    err = (out.cpu().double() - ref.double()).norm() / ref.double().norm()
    assert err < 1e-5, f"seed {seed}: rel err {err}"


@pytest.mark.parametrize("kernel", ["fused_kv_write", *DECODE_PATHS, V2_MULTI_HEAD])
@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize("num_paged,num_full", [(3, 3), (4, 2), (2, 0)])
def test_writes_and_query_gather(kernels, kernel, block_size, num_paged, num_full):
    """Full heads land at their slot_mapping rows of a strided paged cache (padding heads
    zeroed, -1 slots skipped) and their query heads in q_full; streaming heads land in
    their ring rows; nothing else moves."""
    decode_fn = None if kernel == "fused_kv_write" else decode_kernel(kernels, kernel)
    check_writes_and_gather(kernels, decode_fn, block_size, num_paged, num_full, fresh_seed(), DEVICE)


@pytest.mark.parametrize("path", ["decode-v2", V2_MULTI_HEAD])
@pytest.mark.parametrize("query_scale", ["tensor", "head"])
@pytest.mark.parametrize("group,kv_dtype", [(4, None), (3, torch.float8_e4m3fn)])
def test_decode_step_fp8_queries(kernels, path, query_scale, group, kv_dtype):
    """vLLM's fp8 queries (FA3 with an fp8 cache), one scale or one per KV head: v2 dequantizes the
    ring heads' queries in registers (the oracle attends with q8 * q_scale, within 1e-5) and
    gathers the paged heads' fp8 queries into an fp8 q_full byte for byte."""
    fn = decode_kernel(kernels, path)
    check_decode_batch(fn, group, 3, DIMS[-1], 3, 5, fresh_seed(), DEVICE, kv_dtype=kv_dtype, query_scale=query_scale)
    check_writes_and_gather(kernels, fn, 16, 4, 2, fresh_seed(), DEVICE, kv_dtype=kv_dtype, query_scale=query_scale)


def test_fp8_queries_need_their_scale_and_v2(kernels):
    """fp8 queries without a usable q_scale, or to v1, get one line saying what is allowed."""
    from tests.ops.kernel_cases import fp8_queries

    q8, scale, _ = fp8_queries(torch.randn(2, 6, 32), 2, "tensor", random.Random(0))
    k = torch.zeros(2, 2, 32)
    rows = kernels.StepRows(torch.tensor([0, 1, 2], dtype=torch.int32), torch.tensor([1, 1], dtype=torch.int32),
                            torch.tensor([0, 1], dtype=torch.int32), max_query_len=1)
    pools = kernels.LayerPools(sink=1, recent=1, ring_k=torch.zeros(6, 1, 32), ring_v=torch.zeros(6, 1, 32),
                               ring_src=torch.tensor([0], dtype=torch.int32))
    out = torch.zeros(2, 6, 32)
    for bad in (None, torch.ones(3)):
        with pytest.raises(ValueError, match=r"fp8 queries need q_scale: \[\] or \[2\]"):
            kernels.decode_step(q8, k, k, out, None, rows, pools, 1.0, variant="v2", q_scale=bad)
    with pytest.raises(ValueError, match="v1 takes model-dtype queries"):
        kernels.decode_step(q8, k, k, out, None, rows, pools, 1.0, variant="v1", q_scale=scale)
    assert kernels.takes_fp8_queries("v2") and not kernels.takes_fp8_queries("v1")


FP8 = [(torch.float8_e4m3fn, 0.05), (torch.float8_e5m2, 0.1)]  # (ring dtype, rel err vs the oracle)


# without a GPU v1's fp8 decode runs in test_decode_step_one_batch and test_writes_fp8 only (the
# serving schedules through the interpreter are slow)
FP8_DECODE_PATHS = DECODE_PATHS if ON_GPU else ["decode-v2"]


@pytest.mark.parametrize("path", ["split", *FP8_DECODE_PATHS])
@pytest.mark.parametrize("kv_dtype,tol", FP8)
@pytest.mark.parametrize("sink,recent,kv_heads,group", [(4, 8, 2, 3), (3, 5, 1, 7)] if not ON_GPU else
                         [(4, 8, 2, 3), (16, 64, 2, 4), (3, 5, 1, 7), (1, 1, 4, 4)])
def test_ring_kernels_fp8(kernels, path, kv_dtype, tol, sink, recent, kv_heads, group):
    """fp8 rings with random per-layer scales: every step the kernels' ring rows are bit for
    bit the PyTorch path's quantise (``torch_stream.quantize_kv``) and their outputs match its
    dequantised attention; the whole run stays within fp8's error of the oracle."""
    from tests.ops.test_torch_stream import torch_ring_step
    from tests.stream_harness import paired

    seed = fresh_seed()
    case = Case(num_reqs=REQS, max_len=MAX_LEN, kv_heads=kv_heads, group=group, head_dim=DIMS[-1], sink=sink,
                recent=recent, seed=seed, pad=True, max_chunk=24 if not ON_GPU else 40, kv_dtype=kv_dtype,
                decode_steps=0.0 if path == "split" else 0.7)
    fn = embed_stream_heads(kernels, random.Random(seed).randint(0, 2), random.Random(seed), sink, recent,
                            decode_fn=decode_kernel(kernels, path))
    err, n = run_case(case, paired(fn, torch_ring_step, 1e-4), DEVICE)
    assert n > 0
    assert err < tol, f"seed {seed}: rel err {err}"


@pytest.mark.parametrize("kernel", ["fused_kv_write", *DECODE_PATHS])
@pytest.mark.parametrize("kv_dtype", [torch.float8_e4m3fn, torch.float8_e5m2])
@pytest.mark.parametrize("num_paged,num_full", [(3, 3), (4, 2), (2, 0)])
def test_writes_fp8(kernels, kernel, kv_dtype, num_paged, num_full):
    """The paged and ring stores of an fp8 cache: ``quantize_kv`` bit for bit, at the same rows."""
    decode_fn = None if kernel == "fused_kv_write" else decode_kernel(kernels, kernel)
    check_writes_and_gather(kernels, decode_fn, 16, num_paged, num_full, fresh_seed(), DEVICE, kv_dtype=kv_dtype)
