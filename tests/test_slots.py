import pytest

from rlkv_vllm.slots import SlotManager, SlotsExhaustedError
from tests.runner_process import RUNNERS, on_runner, runner_of


def test_assign_release_reuse():
    m = SlotManager(3)
    assert m.assign(["a", "b"]) == [0, 1]
    assert m.assign(["b", "a", "c"]) == [1, 0, 2]
    assert (m.in_use, m.free, m.peak_in_use) == (3, 0, 3)
    with pytest.raises(SlotsExhaustedError):
        m.assign(["d"])
    assert m.release(["a", "zzz"]) == 1
    assert m.assign(["d"]) == [0]


def test_reclaims_dead_requests_only_when_full():
    m = SlotManager(2)
    m.assign(["a", "b"])
    assert m.assign(["c"], alive=lambda r: r != "a") == [0]
    assert m.slot_of("a") is None and m.slot_of("b") == 1


class ListSlotManager:
    """The slot semantics written out row by row: the lowest free slot to each new request."""

    def __init__(self, n: int) -> None:
        self.free, self.owner = list(range(n)), {}

    def assign(self, ids: list[str]) -> list[int]:
        for rid in ids:
            if rid not in self.owner:
                self.owner[rid] = self.free.pop(self.free.index(min(self.free)))
        return [self.owner[r] for r in ids]

    def release(self, ids) -> None:
        for rid in ids:
            if rid in self.owner:
                self.free.append(self.owner.pop(rid))


def test_assign_rows_matches_row_by_row_assignment_on_random_batches():
    """The array path (known rows in one C-level pass, new rows through the free list) equals the
    row-by-row semantics over random admissions, finishes, reorders and repeated ids in a batch."""
    import random

    import numpy as np

    rng = random.Random(7)
    m, ref = SlotManager(24), ListSlotManager(24)
    running: list[str] = []
    seq = 0
    for step in range(400):
        done = [r for r in running if rng.random() < 0.15]
        m.release(done)
        ref.release(done)
        running = [r for r in running if r not in done]
        while len(running) < 24 and rng.random() < 0.6:
            running.append(f"r{seq}")
            seq += 1
        if rng.random() < 0.3:
            rng.shuffle(running)  # V2 sorts its rows each step: positions move
        batch = running + running[:1] if step % 50 == 0 else list(running)  # one id twice: one slot
        out = np.full(len(batch) + 2, -7, dtype=np.int32)
        got = m.assign_rows(batch, out=out)
        assert got.dtype == np.int32 and got.tolist() == ref.assign(batch), step
        assert out[: len(batch)].tolist() == got.tolist() and out[len(batch):].tolist() == [-7, -7]
        assert m.in_use == len(set(batch))
    assert m.assign_rows([]).shape == (0,)


@pytest.mark.slow
@pytest.mark.parametrize("runner", RUNNERS)
def test_fewer_slots_than_max_num_seqs_requests_wait(runner, tiny_model, tmp_path):
    """A ring of 3 slots (auto, from a 4 MiB budget at 512-token requests) under max_num_seqs 8:
    12 requests all finish, never more than 3 hold a slot, and the tokens are those of a ring
    with a slot per max_num_seqs (greedy). On both model runners: the cap is the scheduler's."""
    on_runner(runner, check_fewer_slots_than_max_num_seqs, runner, tiny_model, tmp_path)


def check_fewer_slots_than_max_num_seqs(runner, tiny_model, tmp_path):
    from rlkv_vllm.core.plan import budget_ring_slots
    from rlkv_vllm.runtime import current_runtime
    from tests.engine_utils import engine, greedy, mixed_prompts, random_gates, write_pattern

    pattern = write_pattern(str(tmp_path / "p.json"), random_gates(4, 4, seed=5))
    prompts = mixed_prompts(12)
    budget, gen = 4 << 20, 40
    common = dict(max_num_seqs=8, kv_cache_memory_bytes=budget, max_model_len=1024)
    rlkv = {"heads": pattern, "sparsity": 0.5, "slot_tokens": 512}
    with engine(tiny_model, rlkv, **common) as llm:
        assert runner_of(llm) == runner
        rt = current_runtime()
        sched = llm.llm_engine.vllm_config.scheduler_config
        plan = rt.plan
        expect = budget_ring_slots(budget, plan.ring_slot_nbytes, plan.paged_bytes_per_token(), 512, 8)
        assert plan.num_slots == expect == 3
        # the workers' plan gives the front end's reason, not the number it wrote back
        assert plan.slots_by.startswith("budget: the KV budget holds 3 requests of 512 tokens"), plan.slots_by
        assert rt.ring.num_slots == 3 and rt.slots.num_slots == 3
        assert getattr(sched, "max_num_active_seqs", sched.max_num_seqs) == 3
        few = greedy(llm, prompts, gen)
        assert rt.slots.peak_in_use == 3 and rt.slots.total_assigned >= len(prompts)
    with engine(tiny_model, {**rlkv, "ring_slots": 8}, **common) as llm:
        assert current_runtime().plan.num_slots == 8
        assert runner_of(llm) == runner
        full = greedy(llm, prompts, gen)
        assert current_runtime().slots.peak_in_use > 3
    assert all(len(t) == gen for t in few)
    assert few == full
