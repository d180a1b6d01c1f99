"""Helpers for tests that run real vLLM engines on the tiny models."""

from __future__ import annotations

import contextlib
import gc
import os
import random
from typing import Any, Iterator

import numpy as np

from rlkv_vllm.core.patterns import HeadPattern
from rlkv_vllm.tiny_model import TinyModelSpec, build_tiny_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL_CACHE = os.environ.get("RLKV_TEST_MODELS", os.path.join(ROOT, ".cache", "test-models"))
KV_BYTES = 64 << 20


def tiny_model_dir(spec: TinyModelSpec = TinyModelSpec()) -> str:
    name = f"l{spec.num_layers}-q{spec.num_q_heads}-kv{spec.num_kv_heads}-d{spec.head_dim}-s{spec.seed}"
    return build_tiny_model(os.path.join(MODEL_CACHE, name), spec)


def write_pattern(path: str, gates: Any, **meta: Any) -> str:
    HeadPattern(np.asarray(gates, dtype=np.float32), {"model_id": "rlkv-tiny", **meta}).save(path)
    return path


def random_gates(num_layers: int, num_kv_heads: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).uniform(0.0, 1.0, size=(num_layers, num_kv_heads)).astype(np.float32)


def mixed_prompts(n: int = 16, vocab: int = 512, seed: int = 0, max_len: int = 150) -> list[list[int]]:
    """Token-id prompts of mixed lengths (1 .. max_len), avoiding special tokens."""
    rng = random.Random(seed)
    lengths = [1, 3, 7, 15, 31, 64, 100, max_len, 5, 9, 20, 45, 80, 120, 2, 60]
    lengths = (lengths * (n // len(lengths) + 1))[:n]
    return [[rng.randrange(7, vocab) for _ in range(m)] for m in lengths]


def _on_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def engine_kwargs(model: str, rlkv: dict[str, Any] | None = None, **overrides: Any) -> dict[str, Any]:
    kw: dict[str, Any] = dict(
        model=model,
        dtype="float32",
        kv_cache_memory_bytes=KV_BYTES,
        max_num_seqs=16,
        max_model_len=2048,
        enforce_eager=True,
        seed=0,
        enable_prefix_caching=False,
    )
    if _on_cuda():
        # with kv_cache_memory_bytes this is only vLLM's start-up check of free memory: keep it
        # low so parallel test workers (pytest -n) can share one GPU
        kw["gpu_memory_utilization"] = 0.1
    if rlkv is not None:
        from rlkv_vllm.compat import backend_flag

        kw["attention_backend"] = backend_flag()
        kw["additional_config"] = {"rlkv": rlkv}
    kw.update(overrides)
    return kw


def shutdown(llm: Any) -> None:
    with contextlib.suppress(Exception):
        llm.llm_engine.engine_core.shutdown()
    del llm
    gc.collect()
    with contextlib.suppress(Exception):
        from vllm.distributed import cleanup_dist_env_and_memory

        cleanup_dist_env_and_memory()


@contextlib.contextmanager
def engine(model: str, rlkv: dict[str, Any] | None = None, **overrides: Any) -> Iterator[Any]:
    from vllm import LLM

    llm = LLM(**engine_kwargs(model, rlkv, **overrides))
    try:
        yield llm
    finally:
        shutdown(llm)


def greedy(llm: Any, prompts: list[list[int]], max_tokens: int, one_by_one: bool = False) -> list[list[int]]:
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    sp = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    if one_by_one:
        return [list(llm.generate([TokensPrompt(prompt_token_ids=p)], sp, use_tqdm=False)[0].outputs[0].token_ids)
                for p in prompts]
    outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], sp, use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outs]


def kv_capacity_tokens(llm: Any) -> int:
    cc = llm.llm_engine.vllm_config.cache_config
    return int(cc.num_gpu_blocks) * int(cc.block_size)


def first_mismatch(a: list[int], b: list[int]) -> int | None:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))
