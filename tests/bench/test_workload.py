"""The steady-state study: its workload (seeded reasoning-trace lengths, the equilibrium start) and its
closed-loop driver against a fake engine whose throughput is known."""

from __future__ import annotations

import random
import time
from types import SimpleNamespace
from typing import Any

import pytest

from rlkv_vllm.bench.config import BenchSettings, BenchError, validate_settings
from rlkv_vllm.bench.driver import drive_steady
from rlkv_vllm.bench.workload import REASONING_CAP, ClosedLoop, OutputLengths


def test_reasoning_distribution_is_the_stated_one() -> None:
    d = OutputLengths.reasoning()
    assert abs(sum(d.probs) - 1.0) < 1e-9 and d.lengths[0] == 2 and d.lengths[-1] == REASONING_CAP
    desc = d.describe()
    assert (desc["p50"], desc["p90"], desc["max"]) == (2640, 6903, 8192)
    assert 3200 < desc["mean"] < 3300  # the docstring's 3,252
    rng = random.Random(0)
    xs = [d.sample(rng) for _ in range(20000)]
    assert abs(sum(xs) / len(xs) - d.mean()) < 60
    assert sorted(xs)[len(xs) // 2] == pytest.approx(2640, rel=0.04)
    assert [d.sample(random.Random(5)) for _ in range(3)] == [d.sample(random.Random(5)) for _ in range(3)]


def test_in_flight_lengths_are_length_biased_and_ages_fit() -> None:
    d = OutputLengths.reasoning()
    rng = random.Random(1)
    biased = [d.sample_in_flight(rng) for _ in range(20000)]
    want = sum(p * n * n for p, n in zip(d.probs, d.lengths)) / d.mean()  # E[L^2] / E[L]
    assert abs(sum(biased) / len(biased) - want) < 0.02 * want
    loop = ClosedLoop(d, 100, 500, 8704, seed=3)
    primed = loop.primed(3000)
    assert all(s.output_len >= 2 and 0 <= s.age and 100 + s.age <= s.prompt_len <= 500 + s.age for s in primed)
    assert all(s.age + s.output_len <= REASONING_CAP for s in primed)
    ages = sum(s.age for s in primed) / len(primed)
    assert abs(ages - (loop.in_flight_tokens() - 300)) < 0.05 * ages  # E[A] = E[L^2] / (2 E[L])
    fresh = [loop.next() for _ in range(100)]
    assert all(s.age == 0 and 100 <= s.prompt_len <= 500 for s in fresh)
    # the same seed gives every config the same requests
    again = ClosedLoop(d, 100, 500, 8704, seed=3)
    assert again.primed(3000) == primed and [again.next() for _ in range(100)] == fresh
    assert loop.primed_count(800_000, 1024) == int(800_000 / loop.in_flight_tokens())
    assert loop.primed_count(10**9, 64) == 64 and loop.primed_count(10, 64) == 1


def test_lengths_from_a_file(tmp_path) -> None:
    f = tmp_path / "lens.txt"
    f.write_text("# completion_tokens of real traces\n1200\n\n30000\n1\n1200\n")
    d = OutputLengths.from_file(str(f), cap=8192)
    assert d.lengths == [2, 1200, 8192] and d.probs == [0.25, 0.5, 0.25] and "4 lengths" in d.source
    (tmp_path / "bad.txt").write_text("12\nlots\n")
    with pytest.raises(ValueError, match=r"bad\.txt:2: 'lots' is not a token count"):
        OutputLengths.from_file(str(tmp_path / "bad.txt"), cap=8192)


def test_steady_settings_are_validated() -> None:
    ok = BenchSettings(model="m", study="steady", kv_bytes=1, max_model_len=8704)
    validate_settings(ok)
    assert ok.steady_concurrency() == 1024 + 256
    cases = [
        (dict(max_model_len=4096), r"bench\.max_model_len = 4096 .* input_max 500 \+ the longest output 8192"),
        (dict(concurrency=16, max_num_seqs=32), r"bench\.concurrency = 16 .* must exceed max_num_seqs 32"),
        (dict(input_min=600), r"bench\.input_min = 600"),
        (dict(window_s=0.0), r"bench\.window_s = 0\.0"),
        (dict(output_dist="nope.txt"), r"bench\.output_dist = 'nope\.txt' .* reasoning, fixed, or a file"),
    ]
    for change, pattern in cases:
        s = BenchSettings(**{**ok.__dict__, **change})
        with pytest.raises(BenchError, match=pattern):
            validate_settings(s)
    fixed = BenchSettings(**{**ok.__dict__, "output_dist": "fixed", "output_len": 64, "max_model_len": 600})
    validate_settings(fixed)
    assert fixed.output_lengths().lengths == [64]


class _CappedEngine:
    """A fake engine that runs at most ``cap`` requests (FIFO admission, one step prefills a prompt and
    yields its first token), each step ``step_s`` long and one token per running request."""

    def __init__(self, cap: int, step_s: float) -> None:
        self.cap, self.step_s = cap, step_s
        self.waiting: list[str] = []
        self.running: list[str] = []
        self.left: dict[str, int] = {}
        self.added: list[tuple[str, int, int]] = []
        self.aborted: list[str] = []

    def add_request(self, rid: str, prompt: dict, params: Any) -> None:
        self.waiting.append(rid)
        self.left[rid] = params.max_tokens
        self.added.append((rid, len(prompt["prompt_token_ids"]), params.max_tokens))

    def abort_request(self, rids: list[str]) -> None:
        for r in rids:
            self.aborted.append(r)
            self.left.pop(r, None)
            if r in self.waiting:
                self.waiting.remove(r)
            if r in self.running:
                self.running.remove(r)

    def has_unfinished_requests(self) -> bool:
        return bool(self.left)

    def step(self) -> list[Any]:
        time.sleep(self.step_s)
        while self.waiting and len(self.running) < self.cap:
            self.running.append(self.waiting.pop(0))
        outs = []
        for r in list(self.running):
            self.left[r] -= 1
            outs.append(SimpleNamespace(request_id=r, outputs=[SimpleNamespace(token_ids=[1])],
                                        finished=self.left[r] == 0))
            if self.left[r] == 0:
                del self.left[r]
                self.running.remove(r)
        return outs


def test_the_closed_loop_keeps_the_engine_full_and_measures_only_the_window() -> None:
    eng = _CappedEngine(cap=6, step_s=0.004)
    loop = ClosedLoop(OutputLengths([4, 8, 16], [1.0, 1.0, 1.0], "test"), 2, 5, 64, seed=0)
    res = drive_steady(SimpleNamespace(llm_engine=eng), None, loop, concurrency=9, primed=6, vocab=100,
                       make_params=lambda n: SimpleNamespace(max_tokens=n), warmup_s=0.1, window_s=0.4,
                       deadline=None)
    # the first 6 were primed (ages folded into the prompt), the other 3 queued fresh; every finished
    # request was replaced at once, so 9 stayed outstanding until the end, when the rest were aborted
    assert all(2 <= p and p + n <= 5 + 16 for _, p, n in eng.added[:6])  # prompt + age + what is left
    assert all(2 <= p <= 5 for _, p, _ in eng.added[6:])  # fresh: the prompt alone
    finished = len(eng.added) - 9
    assert len(eng.aborted) == 9 and not eng.has_unfinished_requests() and finished > 20
    assert not res["truncated"] and res["primed"] == 6 and res["concurrency"] == 9
    assert 0.38 < res["measured_s"] < 0.6
    # 6 running, one token each per step of >= 4 ms: at most 1,500 tok/s; the window's steps only
    assert res["steps"] >= 40 and res["output_tokens"] <= 6 * res["steps"]
    assert res["output_tokens"] / res["measured_s"] == pytest.approx(res["output_tok_s"])
    assert res["output_tok_s"] <= 6 / 0.004
    assert res["step_mean_s"] >= 0.004 and res["tpot_mean_s"] >= 0.004
    assert res["requests_finished"] <= finished


def test_a_deadline_ends_the_loop_truncated() -> None:
    eng = _CappedEngine(cap=2, step_s=0.002)
    loop = ClosedLoop(OutputLengths.fixed(8), 2, 3, 64, seed=0)
    res = drive_steady(SimpleNamespace(llm_engine=eng), None, loop, concurrency=3, primed=2, vocab=100,
                       make_params=lambda n: SimpleNamespace(max_tokens=n), warmup_s=0.05, window_s=60,
                       deadline=time.time() + 0.2)
    assert res["truncated"] and not eng.has_unfinished_requests()
