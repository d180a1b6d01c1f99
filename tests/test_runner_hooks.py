"""The model-runner hooks without an engine: a stand-in V2 runner class (the real one's method
names and parameters), wrapped by ``compat.patch_v2_runner``, feeding a runtime's slot manager;
and the wrapped methods of the installed vLLM's V2 runner."""

from __future__ import annotations

import types

import pytest

from rlkv_vllm import compat
from rlkv_vllm.core.settings import RLKVConfigError
from rlkv_vllm.runtime import RLKVRuntime
from rlkv_vllm.slots import SlotManager

SCRATCH = 2


def _runtime(num_slots: int = 2) -> RLKVRuntime:
    rt = object.__new__(RLKVRuntime)  # the slot-tracking half only: no config, ring or pool
    rt.plan = types.SimpleNamespace(num_slots=num_slots)
    rt.slots = SlotManager(num_slots)
    rt.metrics = types.SimpleNamespace(on_step=lambda: None)
    rt.preemptions_seen = 0
    return rt


def _out(num_scheduled=None, finished=(), preempted=()):
    return types.SimpleNamespace(num_scheduled_tokens=dict(num_scheduled or {}), finished_req_ids=set(finished),
                                 preempted_req_ids=set(preempted))


class FakeV2Runner:
    """The V2 runner's shape (vllm/v1/worker/gpu/model_runner.py): execute_model applies the
    scheduler output (finish, then add) and, for a real step, builds the batch in
    prepare_inputs; the attention metadata builder then asks the runtime for slots."""

    def __init__(self, rt: RLKVRuntime, max_num_reqs: int = 4):
        self.rt = rt
        self.req_states = types.SimpleNamespace(req_id_to_index={})
        self.free = list(range(max_num_reqs))
        self.seen: list[list[int]] = []

    def execute_model(self, scheduler_output, intermediate_tensors=None, dummy_run=False,
                      skip_attn_for_dummy_run=False, is_profile=False):
        index = self.req_states.req_id_to_index
        if not dummy_run:
            for rid in scheduler_output.finished_req_ids | scheduler_output.preempted_req_ids:
                if rid in index:
                    self.free.append(index.pop(rid))
            for rid in scheduler_output.num_scheduled_tokens:
                if rid not in index:
                    index[rid] = self.free.pop()
            if not scheduler_output.num_scheduled_tokens:
                return None
            batch = self.prepare_inputs(scheduler_output, None)
            num_reqs = len(batch.req_ids)
        else:
            num_reqs = len(scheduler_output.num_scheduled_tokens)
        self.seen.append(self.rt.slot_ids_for_batch(num_reqs + 1))  # + a padded row
        return None

    def prepare_inputs(self, scheduler_output, batch_desc):
        # decode-first order: here, reversed ids
        return types.SimpleNamespace(req_ids=sorted(scheduler_output.num_scheduled_tokens, reverse=True))

    def _dummy_run(self, num_tokens, *args, **kwargs):
        self.execute_model(_out({f"_dummy_req_{i}": 1 for i in range(num_tokens)}), dummy_run=True)

    def capture_model(self):
        # the capture builds metadata for made-up batches outside execute_model
        self.seen.append(self.rt.slot_ids_for_batch(3))
        return 0


compat.patch_v2_runner(FakeV2Runner)


@pytest.fixture
def rt(monkeypatch):
    rt = _runtime()
    monkeypatch.setattr(compat.RUNNER_HOOKS, "listeners", [rt.on_step])
    monkeypatch.setattr(compat.RUNNER_HOOKS, "_runner", None)
    monkeypatch.setattr(compat.RUNNER_HOOKS, "v2_req_ids", None)
    return rt


def test_batch_rows_get_slots_in_batch_order_and_finished_ones_free_theirs(rt):
    runner = FakeV2Runner(rt)
    assert compat.is_v2_runner(runner)
    runner.execute_model(_out({"a": 5, "b": 3}))
    assert runner.seen[-1] == [0, 1, SCRATCH]  # rows b, a; the padded row on the scratch slot
    assert (rt.slots.slot_of("b"), rt.slots.slot_of("a")) == (0, 1)
    # a finishes, c takes its slot in the same step (released before the batch takes slots)
    runner.execute_model(_out({"b": 1, "c": 4}, finished={"a"}))
    assert rt.slots.slot_of("a") is None and rt.slots.slot_of("c") == 1
    assert runner.seen[-1] == [1, 0, SCRATCH]  # rows c, b
    # b preempted (and the step schedules nothing): its slot is free; empty steps assign none
    runner.execute_model(_out({}, preempted={"b"}))
    assert rt.slots.in_use == 1 and rt.preemptions_seen == 1
    runner.execute_model(_out({}, finished={"c"}))
    assert rt.slots.in_use == 0


def test_dummy_capture_and_warm_up_runs_take_no_slot(rt):
    runner = FakeV2Runner(rt)
    runner._dummy_run(4)
    runner.execute_model(_out({"x": 1}), None, True)  # dummy_run given by position
    runner.capture_model()
    with compat.RUNNER_HOOKS.dummy():  # what the wrapped warmup_kernels does around its real steps
        runner.execute_model(_out({f"_warmup_{i}_": 2 for i in range(4)}))  # more rows than slots
        runner.execute_model(_out({}, finished={f"_warmup_{i}_" for i in range(4)}))
    assert runner.seen == [[SCRATCH] * 5, [SCRATCH] * 2, [SCRATCH] * 3, [SCRATCH] * 5]
    assert rt.slots.in_use == 0 and rt.slots.total_assigned == 0
    assert not compat.RUNNER_HOOKS.in_dummy_run


def test_a_missed_finish_is_reclaimed_from_the_runners_request_states(rt):
    runner = FakeV2Runner(rt)
    runner.execute_model(_out({"a": 1, "b": 1}))
    runner.req_states.req_id_to_index.pop("a")  # gone from the runner, no finish event seen
    runner.execute_model(_out({"b": 1, "c": 1}))
    assert rt.slots.slot_of("a") is None and rt.slots.slot_of("c") is not None


def test_the_installed_v2_runner_is_wrapped():
    import rlkv_vllm

    rlkv_vllm.register()
    cls = compat.v2_model_runner_cls()
    assert cls is not None and compat.v2_hook_problem(cls) is None and compat.V2_HOOKED
    for name in ("execute_model", "_dummy_run", "capture_model"):
        assert getattr(getattr(cls, name), "_rlkv_wrapped", False), name
    assert getattr(cls, "_rlkv_v2_runner", False)
    from vllm.v1.worker.gpu import warmup

    assert getattr(warmup.warmup_kernels, "_rlkv_wrapped", False)
    from vllm.v1.worker import cpu

    try:
        from vllm.v1.worker.cpu.model_runner import CPUModelRunner
    except ImportError:  # pragma: no cover - a build without the CPU V2 runner
        CPUModelRunner = None
    assert cpu is not None and (CPUModelRunner is None or issubclass(CPUModelRunner, cls))


def test_hook_problem_names_what_is_missing():
    class NoCapture:
        def execute_model(self, scheduler_output, dummy_run=False): ...
        def prepare_inputs(self, scheduler_output): ...
        def _dummy_run(self, n): ...

    class OldExecute(NoCapture):
        def execute_model(self, scheduler_output): ...
        def capture_model(self): ...

    assert compat.v2_hook_problem(NoCapture) == "its V2 model runner has no capture_model"
    assert compat.v2_hook_problem(OldExecute) == "its V2 model runner's execute_model lacks dummy_run"


def _args():
    return types.SimpleNamespace(attention_backend="rlkv", attention_config=None, enable_prefix_caching=None)


def test_v2_is_kept_where_the_hooks_are_installed(monkeypatch):
    monkeypatch.setattr(compat, "V2_HOOKED", True)
    monkeypatch.setenv("VLLM_USE_V2_MODEL_RUNNER", "1")
    assert compat.prepare_engine_args(_args())
    assert compat.os.environ["VLLM_USE_V2_MODEL_RUNNER"] == "1"
    monkeypatch.delenv("VLLM_USE_V2_MODEL_RUNNER")
    compat.prepare_engine_args(_args())
    assert "VLLM_USE_V2_MODEL_RUNNER" not in compat.os.environ  # vLLM's own default then


def test_v1_is_forced_where_they_are_not(monkeypatch):
    import logging

    monkeypatch.setattr(compat, "V2_HOOKED", False)
    monkeypatch.setattr(compat, "v2_hook_problem", lambda cls=None: "its V2 model runner has no capture_model")
    monkeypatch.setenv("VLLM_USE_V2_MODEL_RUNNER", "1")
    with pytest.raises(RLKVConfigError, match="VLLM_USE_V2_MODEL_RUNNER = 1 is not allowed .*no capture_model"):
        compat.prepare_engine_args(_args())
    monkeypatch.delenv("VLLM_USE_V2_MODEL_RUNNER")
    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.INFO)
    handler.emit = records.append  # type: ignore[method-assign]
    log = compat.plugin_logger()
    log.addHandler(handler)
    monkeypatch.setattr(log, "level", logging.INFO)
    try:
        compat.prepare_engine_args(_args())
    finally:
        log.removeHandler(handler)
    assert compat.os.environ["VLLM_USE_V2_MODEL_RUNNER"] == "0"
    lines = [r.getMessage() for r in records]
    assert any("V1 model runner" in line and "no capture_model" in line for line in lines), lines


def _llm(runner):
    worker = types.SimpleNamespace(worker=types.SimpleNamespace(model_runner=runner))
    core = types.SimpleNamespace(model_executor=types.SimpleNamespace(driver_worker=worker))
    return types.SimpleNamespace(llm_engine=types.SimpleNamespace(engine_core=types.SimpleNamespace(engine_core=core)))


def test_the_bench_names_the_runner_and_its_kind(rt):
    class V1Like:
        pass

    v2 = _llm(FakeV2Runner(rt))
    assert compat.model_runner_kind(v2) == "v2"
    assert compat.model_runner_name(v2) == f"{__name__}.FakeV2Runner"
    assert compat.model_runner_kind(_llm(V1Like())) == "v1"
    assert compat.model_runner_kind(_llm(None)) == "unknown"
    assert compat.model_runner_name(_llm(None)).startswith("unknown (VLLM_USE_V2_MODEL_RUNNER=")


class DeviceSlotsRunner(FakeV2Runner):
    """The same runner, asking for the slots as the metadata builder does: the persistent buffer."""

    def execute_model(self, scheduler_output, intermediate_tensors=None, dummy_run=False,
                      skip_attn_for_dummy_run=False, is_profile=False):
        rt, seen = self.rt, self.seen
        real = len(seen)
        rt.slot_ids_for_batch = lambda n: rt.slot_ids_on_device(n).tolist()  # type: ignore[method-assign]
        try:
            super().execute_model(scheduler_output, intermediate_tensors, dummy_run, skip_attn_for_dummy_run,
                                  is_profile)
        finally:
            del rt.slot_ids_for_batch
        return real


def test_unchanged_decode_rows_reuse_the_device_slots_and_any_change_rewrites_them(rt):
    import torch

    scratch = 3
    rt.plan.num_slots, rt.slots = scratch, SlotManager(scratch)
    rt.slot_buffer = torch.full((8,), scratch, dtype=torch.int32)
    rt._slots_written, rt.slot_rows_written, rt.slot_rows_reused = None, 0, 0
    runner = DeviceSlotsRunner(rt)
    runner.execute_model(_out({"a": 5, "b": 3}))
    assert runner.seen[-1] == [0, 1, scratch] and (rt.slot_rows_written, rt.slot_rows_reused) == (1, 0)
    for _ in range(3):  # decode steps of the same two requests: nothing to do on the host
        runner.execute_model(_out({"a": 1, "b": 1}))
        assert runner.seen[-1] == [0, 1, scratch]
    assert (rt.slot_rows_written, rt.slot_rows_reused) == (1, 3)
    runner.execute_model(_out({"a": 1, "b": 1, "c": 7}))  # a new row
    assert runner.seen[-1] == [2, 0, 1, scratch] and rt.slot_rows_written == 2
    runner.execute_model(_out({"b": 1, "c": 1}, finished={"a"}))  # a row leaves
    assert runner.seen[-1] == [2, 0, scratch] and rt.slot_rows_written == 3
    # a slot released elsewhere (a request preempted outside this batch) invalidates the rows' slots
    rt.slots.assign(["z"])
    runner.execute_model(_out({"b": 1, "c": 1}, preempted={"z"}))
    assert runner.seen[-1] == [2, 0, scratch] and rt.slot_rows_written == 4
    runner._dummy_run(2)  # a dummy batch writes scratch slots: the next real step rewrites
    assert runner.seen[-1] == [scratch] * 3 and rt.slot_rows_written == 5
    runner.execute_model(_out({"b": 1, "c": 1}))
    assert runner.seen[-1] == [2, 0, scratch] and rt.slot_rows_written == 6
    assert rt.slot_buffer[:3].tolist() == [2, 0, scratch]
