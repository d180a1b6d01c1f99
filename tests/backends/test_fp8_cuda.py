"""FP8 KV cache on CUDA: every RLKV path against the oracle, calibrated by stock fp8 (GPU only).

The yardstick is stock FLASH_ATTN with the same fp8 cache (TRITON_ATTN for fp8_e5m2, which
FA3 does not take) against the full-attention oracle, as in test_fp8.py, whose shared
engines and check this file reuses. RLKV's full heads run on FA3 with fp8 queries (fp8 /
fp8_e4m3 on SM90, vLLM's layer quantising them as for stock; decode_step v2 dequantises the
ring heads' own in registers, prefill chunks attend a dequantised copy), or on TRITON_ATTN (fp8_e5m2, ``rlkv.full_kernel = triton``, no FA3); the streaming
heads on the Triton kernels (default), the PyTorch path (``rlkv.kernel = torch``) or, asked
for, the CUDA decode kernel, which has no fp8 path and falls back to Triton's decode step
(one log line), and under CUDA graphs.
"""

from __future__ import annotations

import pytest

from tests.backends.test_fp8 import check_tracks_oracle, fp8_case  # noqa: F401 - the shared fixture

pytestmark = [pytest.mark.slow, pytest.mark.gpu]

GRAPHS = dict(enforce_eager=False,
              compilation_config={"cudagraph_mode": "FULL_AND_PIECEWISE", "cudagraph_capture_sizes": [1, 2, 4, 8]})


def fa3_takes(kv: str) -> bool:
    """Stock FLASH_ATTN's own answer: FA3 on SM90 takes fp8 / fp8_e4m3 caches."""
    from rlkv_vllm import compat

    return compat.stock_backend_classes("FLASH_ATTN")[0].supports_kv_cache_dtype(kv)


@pytest.mark.parametrize("kv", ["fp8", "fp8_e5m2"])
def test_triton_path(kv, fp8_case):  # noqa: F811
    facts = check_tracks_oracle(fp8_case, kv)
    assert (facts.kernel, facts.decode_kernel) == ("triton", "triton")
    fa3 = kv == "fp8" and fa3_takes(kv)
    assert (facts.full_kernel, facts.fp8_queries) == (("flash_attn", True) if fa3 else ("triton", False)), facts


def test_full_heads_on_triton_attention(fp8_case):  # noqa: F811
    facts = check_tracks_oracle(fp8_case, "fp8", full_kernel="triton")
    assert (facts.full_kernel, facts.fp8_queries) == ("triton", False), facts


def test_cuda_decode_kernel_falls_back_to_triton(fp8_case):  # noqa: F811
    facts = check_tracks_oracle(fp8_case, "fp8", decode_kernel="cuda")
    assert facts.decode_kernel == "triton", "the CUDA decode kernel has no fp8 path: Triton's runs"


def test_torch_path(fp8_case):  # noqa: F811
    facts = check_tracks_oracle(fp8_case, "fp8", kernel="torch")
    assert facts.kernel == "torch"


def test_under_cuda_graphs(fp8_case):  # noqa: F811
    check_tracks_oracle(fp8_case, "fp8", engine=GRAPHS)
