"""vLLM sleep mode between the rollout and learner phases (``rollout.sleep``), on CUDA: a gated-mode
rollout engine that slept and woke (level 1 and level 2) samples exactly what an engine that never slept
samples with the same gates and seeds, gives its GPU memory back while asleep, and takes gates after waking.
Skips without CUDA (vLLM's sleep mode is CUDA-only; a CPU run refuses ``rollout.sleep`` in one line)."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="vLLM's sleep mode needs CUDA")

SINK, RECENT = 4, 8


def _engine(model: str, tmp_path, level: int):
    from rlkv_trainer.rollout import RolloutEngine

    return RolloutEngine(model, sink=SINK, recent=RECENT, work_dir=str(tmp_path / f"l{level}"), model_id="rlkv-tiny",
                         engine_kwargs=dict(dtype="float32", gpu_memory_utilization=0.3, max_num_seqs=16,
                                            max_model_len=512, enforce_eager=True, seed=0),
                         sleep_level=level)


def _sample(engine, prompts, alpha):
    from rlkv_trainer.sampling import SamplingSpec

    engine.set_gates(alpha, version=engine.gate_version + 2)
    return engine.generate(prompts, SamplingSpec(temperature=1.0), n=2, max_tokens=32, seeds=list(range(len(prompts))))


@pytest.mark.parametrize("level", [0, 1, 2], ids=["never-sleeps", "level1", "level2"])
def test_sleep_wake_samples_what_an_awake_engine_samples(level, tiny_model, tmp_path, monkeypatch):
    from tests.engine_utils import mixed_prompts, random_gates

    # the engine core in its own process, as in a run (one engine per Ray actor): vLLM's CuMem allocator
    # serves one sleep-mode engine per process
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "1")
    monkeypatch.setenv("VLLM_WORKER_MULTIPROC_METHOD", "spawn")  # this process has touched CUDA already

    prompts = mixed_prompts(4, seed=5, max_len=40)
    before, after = random_gates(4, 4, seed=31), random_gates(4, 4, seed=32)
    engine = _engine(tiny_model, tmp_path, level)
    try:
        first = _sample(engine, prompts, before)
        if level:
            free_awake = torch.cuda.mem_get_info()[0]
            slept_s = engine.sleep()
            free_asleep = torch.cuda.mem_get_info()[0]
            # the KV cache (a 0.3 share of the GPU, minus the tiny weights) comes back to the device
            assert free_asleep - free_awake > 0.1 * torch.cuda.get_device_properties(0).total_memory, \
                (free_awake, free_asleep)
            woke_s = engine.wake_up()
            print(f"level {level}: sleep {slept_s:.2f} s, wake {woke_s:.2f} s, freed "
                  f"{(free_asleep - free_awake) / 2**30:.1f} GiB")
            assert not engine.sleeping and engine.wake_up() == 0.0  # waking an awake engine is a no-op
        second = _sample(engine, prompts, after)
        again = _sample(engine, prompts, before)
    finally:
        engine.shutdown()
    # same gates and seeds: the same tokens and log-probs as before the sleep; other gates: other samples
    assert [s.completion for s in again] == [s.completion for s in first]
    diff = max(abs(a - b) for x, y in zip(again, first) for a, b in zip(x.logprobs, y.logprobs))
    assert diff < 1e-4, diff
    assert [s.logprobs for s in second] != [s.logprobs for s in first]
