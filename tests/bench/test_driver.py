"""rlkv_vllm.bench.driver without an engine: engine arguments, the step driver on a fake engine, percentiles."""

from __future__ import annotations

from typing import Any

import pytest

from rlkv_vllm.bench.config import BenchSettings, EngineConfig, parse_config
from rlkv_vllm.bench.driver import drive, engine_kwargs, percentile


def test_engine_kwargs() -> None:
    s = BenchSettings(model="m", pattern="p.tsv", kv_bytes=1 << 20, enforce_eager=True)
    assert "attention_backend" not in engine_kwargs(s, parse_config("stock:CPU_ATTN"))
    assert engine_kwargs(s, parse_config("stock:FLASH_ATTN"))["attention_backend"] == "FLASH_ATTN"
    kw = engine_kwargs(s, parse_config("rlkv:0.5"))
    assert kw["attention_backend"] == "rlkv"
    assert kw["additional_config"] == {"rlkv": {"heads": "p.tsv", "sparsity": 0.5}}
    assert kw["kv_cache_memory_bytes"] == 1 << 20 and kw["enable_prefix_caching"] is False
    kw = engine_kwargs(s, parse_config("gated"))
    assert kw["attention_backend"] == "rlkv"
    assert kw["additional_config"] == {"rlkv": {"heads": "p.tsv", "mode": "gated"}}
    kw = engine_kwargs(s, parse_config("rlkv:0.5+fp8+permute"))
    assert kw["kv_cache_dtype"] == "fp8" and kw["additional_config"]["rlkv"]["permute_heads"] is True
    assert engine_kwargs(s, parse_config("rlkv:0.5+gather"))["additional_config"]["rlkv"]["permute_heads"] is False
    assert "kv_cache_dtype" not in engine_kwargs(s, parse_config("stock"))
    s.gpu_mem = 0.9
    assert engine_kwargs(s, EngineConfig("stock"))["gpu_memory_utilization"] == 0.9


class _ChunkedPrefillEngine:
    """Just enough of LLMEngine for drive: one request at a time prefills for
    ``chunks`` steps of ``prefill_s`` (no token), while the prefilled ones decode one
    token per step; a step with no prefill takes ``decode_s``."""

    def __init__(self, chunks: int, prefill_s: float, decode_s: float) -> None:
        self.chunks, self.prefill_s, self.decode_s = chunks, prefill_s, decode_s
        self.queue: list[str] = []
        self.left: dict[str, int] = {}
        self.decoding: list[str] = []
        self.chunks_left = chunks

    def add_request(self, rid: str, prompt: dict, params: Any) -> None:
        self.queue.append(rid)
        self.left[rid] = params.max_tokens

    def has_unfinished_requests(self) -> bool:
        return bool(self.left)

    def step(self) -> list[Any]:
        import time
        from types import SimpleNamespace

        emit = list(self.decoding)
        if self.queue:
            time.sleep(self.prefill_s)
            self.chunks_left -= 1
            if self.chunks_left == 0:  # the last chunk yields the first token
                emit.append(self.queue.pop(0))
                self.decoding.append(emit[-1])
                self.chunks_left = self.chunks
        else:
            time.sleep(self.decode_s)
        outs = []
        for r in emit:
            self.left[r] -= 1
            outs.append(SimpleNamespace(request_id=r, outputs=[SimpleNamespace(token_ids=[1])],
                                        finished=self.left[r] == 0))
            if self.left[r] == 0:
                del self.left[r]
                self.decoding.remove(r)
        return outs


def test_decode_step_time_leaves_out_prefill_steps() -> None:
    """TPOT counts the 40 ms steps that also prefill other requests; the decode-only step
    time is the 5 ms of steps in which every request decoded."""
    from types import SimpleNamespace

    llm = SimpleNamespace(llm_engine=_ChunkedPrefillEngine(chunks=2, prefill_s=0.04, decode_s=0.005))
    res = drive(llm, None, [[1, 2]] * 3, SimpleNamespace(max_tokens=12), "t", None)
    assert res["output_tokens"] == 36
    # steps 1-6 prefill (first tokens at 2, 4, 6); 7-17 only decode, until the last request's 12th token
    assert res["decode_steps"] == 11, res["decode_steps"]
    assert 0.0045 <= res["decode_step_mean_s"] < 0.012, res["decode_step_mean_s"]
    assert res["tpot_mean_s"] > 1.5 * res["decode_step_mean_s"]


def test_percentile_matches_numpy_default() -> None:
    np = pytest.importorskip("numpy")
    xs = [0.3, 0.1, 0.7, 0.2, 0.9]
    assert percentile(xs, 90) == pytest.approx(float(np.percentile(xs, 90)))
    assert percentile([], 50) is None


def test_drive_reports_progress_while_it_generates(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every report interval the driver says how many requests are done and how many tokens came out."""
    from types import SimpleNamespace

    from rlkv_vllm.bench import progress

    monkeypatch.setattr(progress, "PROGRESS_EVERY_S", 0.02)
    llm = SimpleNamespace(llm_engine=_ChunkedPrefillEngine(chunks=2, prefill_s=0.01, decode_s=0.005))
    reports: list[dict[str, Any]] = []
    res = drive(llm, None, [[1, 2]] * 3, SimpleNamespace(max_tokens=12), "t", None, on_progress=reports.append)
    assert len(reports) >= 3
    assert all(r["total"] == 3 and r["running"] is None for r in reports)
    assert [r["tokens"] for r in reports] == sorted(r["tokens"] for r in reports)
    assert [r["done"] for r in reports] == sorted(r["done"] for r in reports)
    assert reports[-1]["tokens"] <= res["output_tokens"] == 36
    assert len(reports) <= res["gen_s"] / 0.02 + 1  # one report per interval, not one per step
