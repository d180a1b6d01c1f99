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


def test_scheduler_probe_splits_decode_prefill_and_recompute() -> None:
    """The probe reads each scheduled batch: one-token rows decode, longer ones prefill, and the prefill of a
    request preempted earlier is recompute until that request decodes again."""
    from types import SimpleNamespace

    from rlkv_vllm.bench.driver import BatchTokens, SchedulerProbe, StepSplit

    batches = iter([
        {"a": 1, "b": 1, "c": 300},           # c: a fresh prompt
        {"a": 1, "b": 1, "c": 1},
        {"a": 1, "c": 1, "b": 2048},          # b was preempted (below) and re-prefills in two chunks
        {"a": 1, "c": 1, "b": 1000},
        {"a": 1, "c": 1, "b": 1},             # b decodes again: no longer recompute
        {"a": 1, "c": 1, "b": 1},
    ])

    class FakeScheduler:
        running: list[str] = ["a", "b", "c"]
        waiting: list[str] = []

        def schedule(self) -> SimpleNamespace:
            per = next(batches)
            return SimpleNamespace(num_scheduled_tokens=per, total_num_scheduled_tokens=sum(per.values()))

        def _preempt_request(self, request: SimpleNamespace, timestamp: float) -> None:
            pass

    sched = FakeScheduler()
    probe = SchedulerProbe(sched)
    sched.schedule()
    sched.schedule()
    sched._preempt_request(SimpleNamespace(request_id="b"), 0.0)
    for _ in range(4):
        sched.schedule()
    assert probe.preemptions == 1
    assert probe.batches == [BatchTokens(2, 300, 0), BatchTokens(3, 0, 0), BatchTokens(2, 2048, 2048),
                             BatchTokens(2, 1000, 1000), BatchTokens(3, 0, 0), BatchTokens(3, 0, 0)]
    split = StepSplit()
    for step_s, b in zip([0.02, 0.01, 0.05, 0.03, 0.01, 0.01], probe.batches):
        split.add(step_s, [b])
    d = split.to_dict()
    assert d["decode_only"]["steps"] == 3 and d["with_prefill"]["steps"] == 3
    assert d["with_recompute"]["steps"] == 2
    assert d["prefill_tokens"] == 3348 and d["recompute_tokens"] == 3048
    assert d["recompute_share_of_prefill"] == pytest.approx(3048 / 3348)
    assert d["with_prefill"]["share_of_time"] == pytest.approx(0.10 / 0.13)
    assert d["decode_only"]["mean_s"] == pytest.approx(0.01)
    from rlkv_vllm.bench.report import format_step_split

    line = format_step_split("rlkv:0.5", d)
    assert line.startswith("rlkv:0.5: decode-only steps 3 (mean 10.00 ms, 23 % of the time)")
    assert "3,348 prefill tokens, 91 % of them recompute" in line


class _AsyncScheduledEngine:
    """LLMEngine with vLLM's async scheduling (a batch queue of two), just enough for drive_steady: a step
    schedules batch k (admitting waiting requests, whose prompts make it a prefill batch), then waits for
    batch k-1 (sleeps its duration: ``prefill_s`` if it prefilled, else ``decode_s``) and returns its
    tokens. The scheduler is a separate object with ``schedule``/``update_from_output``, as in vLLM."""

    def __init__(self, cap: int, prefill_s: float, decode_s: float) -> None:
        from types import SimpleNamespace

        self.prefill_s, self.decode_s = prefill_s, decode_s
        self.left: dict[str, int] = {}
        self.prompt: dict[str, int] = {}
        self.queue: list[Any] = []
        engine = self

        class Scheduler:
            running: list[str] = []
            waiting: list[str] = []

            def schedule(self) -> Any:
                admitted = []
                while self.waiting and len(self.running) < cap:
                    admitted.append(self.waiting.pop(0))
                    self.running.append(admitted[-1])
                per = {r: (engine.prompt[r] if r in admitted else 1) for r in self.running}
                return SimpleNamespace(num_scheduled_tokens=per, total_num_scheduled_tokens=sum(per.values()))

            def update_from_output(self, scheduler_output: Any, model_output: Any) -> None:
                pass

        self.scheduler = Scheduler()

    def add_request(self, rid: str, prompt: dict, params: Any) -> None:
        self.scheduler.waiting.append(rid)
        self.left[rid] = params.max_tokens
        self.prompt[rid] = max(2, len(prompt["prompt_token_ids"]))

    def abort_request(self, rids: list[str]) -> None:
        for r in rids:
            self.left.pop(r, None)
            for q in (self.scheduler.waiting, self.scheduler.running):
                if r in q:
                    q.remove(r)
        self.queue.clear()

    def has_unfinished_requests(self) -> bool:
        return bool(self.left)

    def step(self) -> list[Any]:
        import time
        from types import SimpleNamespace

        self.queue.append(self.scheduler.schedule())
        if len(self.queue) < 2:
            return []
        done = self.queue.pop(0)  # batch k-1: its time is what this call waits for
        per = done.num_scheduled_tokens
        time.sleep(self.prefill_s if any(n > 1 for n in per.values()) else self.decode_s)
        self.scheduler.update_from_output(done, None)
        outs = []
        for r in per:
            if r not in self.left:
                continue
            self.left[r] -= 1
            outs.append(SimpleNamespace(request_id=r, outputs=[SimpleNamespace(token_ids=[1])],
                                        finished=self.left[r] == 0))
            if self.left[r] == 0:
                del self.left[r]
                self.scheduler.running.remove(r)
        return outs


def test_step_split_times_the_batch_each_step_waited_for() -> None:
    """With async scheduling a step schedules batch k and returns when batch k-1 is done: the split must
    give each step's time to batch k-1 (``SchedulerProbe.completed``). Classified by the batch just
    scheduled, every slow prefill step's time would land on the decode-only step after it."""
    from types import SimpleNamespace

    from rlkv_vllm.bench.driver import SchedulerProbe, drive_steady
    from rlkv_vllm.bench.workload import ClosedLoop, OutputLengths

    eng = _AsyncScheduledEngine(cap=4, prefill_s=0.03, decode_s=0.003)
    probe = SchedulerProbe(eng.scheduler)
    loop = ClosedLoop(OutputLengths.fixed(6), 2, 4, 64, seed=0)
    res = drive_steady(SimpleNamespace(llm_engine=eng), probe, loop, concurrency=6, primed=0, vocab=100,
                       make_params=lambda n: SimpleNamespace(max_tokens=n), warmup_s=0.05, window_s=0.5,
                       deadline=None)
    split = res["step_split"]
    assert split["decode_only"]["steps"] >= 10 and split["with_prefill"]["steps"] >= 5
    assert split["decode_only"]["p90_s"] < 0.015, split["decode_only"]
    assert split["with_prefill"]["p50_s"] >= 0.03, split["with_prefill"]
    assert len(probe.completed) <= len(probe.batches) <= len(probe.completed) + 2
    steps = split["per_step"]  # every step: [ms, decode rows, prefill tokens, recompute tokens]
    assert split["per_step_fields"] == ["ms", "decode_rows", "prefill_tokens", "recompute_tokens"]
    assert len(steps) == res["steps"] and all(len(x) == 4 for x in steps)
    assert all(ms >= 25 for ms, _, prefill, _ in steps if prefill), steps
