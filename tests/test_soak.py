"""(e) Soak: random client aborts under a KV budget small enough to force preemption.

No crash, ring slots in use return to 0, and every completed output equals its run
without memory pressure."""

from __future__ import annotations

import random

import pytest

from tests.engine_utils import engine, greedy, mixed_prompts, random_gates, write_pattern
from tests.runner_process import RUNNERS, on_runner, runner_of

pytestmark = pytest.mark.slow

GEN = 160


@pytest.mark.parametrize("runner", RUNNERS)
def test_aborts_and_preemption(runner, tiny_model, tmp_path):
    on_runner(runner, check_aborts_and_preemption, runner, tiny_model, tmp_path)


def check_aborts_and_preemption(runner, tiny_model, tmp_path):
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    pattern = write_pattern(str(tmp_path / "p.json"), random_gates(4, 4, seed=9))
    rlkv = {"heads": pattern, "sparsity": 0.5, "sink": 4, "recent": 8}
    prompts = mixed_prompts(24, seed=4, max_len=120)
    with engine(tiny_model, rlkv, max_num_seqs=8, max_model_len=512) as llm:
        assert runner_of(llm) == runner
        unpressured = greedy(llm, prompts, GEN)

    rng = random.Random(1)
    sp = SamplingParams(temperature=0.0, max_tokens=GEN, ignore_eos=True)
    # ~10 blocks of 128 tokens for 8 running requests of up to 280 tokens: preemption is certain
    with engine(tiny_model, rlkv, max_num_seqs=8, max_model_len=512, kv_cache_memory_bytes=3 << 20) as llm:
        eng = llm.llm_engine
        pending = list(range(len(prompts)))
        live: set[str] = set()
        done: dict[int, list[int]] = {}
        aborted: set[int] = set()
        # a quarter of the requests are aborted by their client at a random step
        abort_at = {str(i): rng.randint(1, 120) for i in rng.sample(range(len(prompts)), len(prompts) // 4)}
        age: dict[str, int] = {}
        steps = 0
        while pending or eng.has_unfinished_requests():
            while pending and len(live) < 12:  # keep the queue fuller than max_num_seqs
                i = pending.pop(0)
                eng.add_request(str(i), TokensPrompt(prompt_token_ids=prompts[i]), sp)
                live.add(str(i))
            for out in eng.step():
                if out.finished:
                    live.discard(out.request_id)
                    done[int(out.request_id)] = list(out.outputs[0].token_ids)
            steps += 1
            for rid in sorted(live):
                age[rid] = age.get(rid, 0) + 1
                if abort_at.get(rid) == age[rid]:
                    eng.abort_request([rid])
                    live.discard(rid)
                    aborted.add(int(rid))
            assert steps < 20000
        # vLLM tells workers about finished requests in the next scheduler step; the
        # server's busy loop runs that step by itself, an offline loop must ask for it
        eng.step()
        stats = llm.collective_rpc("rlkv_slot_stats")[0]

    assert stats["preemptions"] > 0, "the budget was meant to force preemption"
    assert stats["in_use"] == 0 and stats["free"] == stats["num_slots"]
    assert len(aborted) >= 2 and len(done) >= len(prompts) // 2
    completed = [i for i in done if i not in aborted]
    assert completed
    for i in completed:
        assert done[i] == unpressured[i], f"request {i} differs from its unpressured run"
