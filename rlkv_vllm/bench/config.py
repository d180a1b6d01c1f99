"""What a benchmark run measures: the engine config grammar, the settings, their validation,
and the command-line options shared by ``rlkv bench`` and ``benchmarks/engine_study.py``.

Pure Python: imports neither vLLM nor torch, so a bad argument is refused in milliseconds.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import re
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

# TPOT needs a first and a last token
MIN_OUTPUT_LEN = 2
STUDIES = ("engine", "latency", "steady")
# settings that define the workload: results measured with different values are not comparable
WORKLOAD_KEYS = (
    "model", "pattern", "dtype", "load_format", "kv_bytes", "gpu_mem", "max_num_seqs", "max_model_len",
    "block_size", "enforce_eager", "num_prompts", "input_len", "output_len", "temperature", "seed",
    "detokenize", "batches", "contexts", "latency_output_len", "concurrency", "output_dist", "input_min",
    "input_max", "warmup_s", "window_s",
)
LATENCY_ONLY_KEYS = ("batches", "contexts", "latency_output_len")
THROUGHPUT_ONLY_KEYS = ("num_prompts", "input_len", "output_len")
STEADY_ONLY_KEYS = ("concurrency", "output_dist", "input_min", "input_max", "warmup_s", "window_s")


def workload_keys(study: str) -> tuple[str, ...]:
    """WORKLOAD_KEYS that matter for this kind of study."""
    skip = {"latency": THROUGHPUT_ONLY_KEYS + STEADY_ONLY_KEYS, "engine": LATENCY_ONLY_KEYS + STEADY_ONLY_KEYS,
            "steady": LATENCY_ONLY_KEYS + ("num_prompts", "input_len")}[study]
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
    kv_cache_dtype: vLLM's ``kv_cache_dtype`` (``+fp8``, ``+fp8_e4m3``, ``+fp8_e5m2``); None:
        vLLM's default ("auto", the model dtype).
    permute_heads: ``rlkv.permute_heads`` (``+permute`` / ``+gather``, rlkv configs only);
        None: the setting's default.
    """

    kind: Literal["stock", "rlkv", "gated"]
    backend: str | None = None
    sparsity: float | None = None
    kv_cache_dtype: str | None = None
    permute_heads: bool | None = None

    @property
    def name(self) -> str:
        if self.kind == "rlkv":
            base = f"rlkv:{self.sparsity:g}"
        elif self.kind == "gated":
            base = "gated"
        else:
            base = f"stock:{self.backend}" if self.backend else "stock"
        opts = [self.kv_cache_dtype] if self.kv_cache_dtype else []
        if self.permute_heads is not None:
            opts.append("permute" if self.permute_heads else "gather")
        return "+".join([base, *opts])

    def identity(self) -> dict[str, Any]:
        """The fields every result row starts with, measured or not."""
        return dict(config=self.name, kind=self.kind, backend=self.backend, sparsity=self.sparsity,
                    kv_cache_dtype=self.kv_cache_dtype or "auto", permute_heads=self.permute_heads)


_BACKEND_RE = re.compile(r"^[A-Z][A-Z0-9_]*$")
KV_DTYPE_OPTIONS = ("fp8", "fp8_e4m3", "fp8_e5m2")
HEAD_ORDER_OPTIONS = {"permute": True, "gather": False}
CONFIG_HELP = ("stock, stock:BACKEND (e.g. stock:FLASH_ATTN, stock:CPU_ATTN), rlkv:S with S in [0, 1), "
               "or gated (RLKV's gated rollout mode), each optionally followed by +fp8 / +fp8_e4m3 / "
               "+fp8_e5m2 (KV-cache dtype) and, for rlkv:S, +permute / +gather (rlkv.permute_heads)")


def _parse_base(text: str, base: str) -> EngineConfig:
    kind, sep, arg = base.strip().partition(":")
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


def parse_config(text: str) -> EngineConfig:
    """Parse ``stock``, ``stock:BACKEND``, ``rlkv:S`` or ``gated``, then ``+OPTION``s; a bad
    string raises a one-line BenchError."""
    base, *opts = text.strip().split("+")
    cfg = _parse_base(text, base)
    kv: str | None = None
    order: bool | None = None
    for o in opts:
        if o in KV_DTYPE_OPTIONS:
            if kv is not None:
                raise bench_error("configs", text, "give one KV-cache dtype option")
            kv = o
        elif o in HEAD_ORDER_OPTIONS:
            if cfg.kind != "rlkv":
                raise bench_error("configs", text, "+permute / +gather apply to rlkv:S configs only")
            if order is not None:
                raise bench_error("configs", text, "give one of +permute / +gather")
            order = HEAD_ORDER_OPTIONS[o]
        else:
            raise bench_error("configs", text, f"unknown option {o!r}; use {CONFIG_HELP}")
    return dataclasses.replace(cfg, kv_cache_dtype=kv, permute_heads=order)


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
    study: Literal["engine", "latency", "steady"] = "engine"
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
    # steady-state workload (workload.py): a closed loop of `concurrency` requests, prompts uniform in
    # [input_min, input_max], outputs from `output_dist` (reasoning, fixed = output_len, or a file of lengths)
    concurrency: int = 0  # 0: max_num_seqs + a quarter, so the waiting queue never empties
    output_dist: str = "reasoning"
    input_min: int = 100
    input_max: int = 500
    warmup_s: float = 60.0
    window_s: float = 120.0
    # a torch-profiler window over the throughput run (0 steps: none); see step_profile.py
    profile_steps: int = 0
    profile_start: int = 200

    def workload(self) -> dict[str, Any]:
        """The settings that must match for two results to be comparable."""
        d = asdict(self)
        return {k: d[k] for k in workload_keys(self.study)}

    def steady_concurrency(self) -> int:
        return self.concurrency or self.max_num_seqs + max(16, self.max_num_seqs // 4)

    def output_lengths(self) -> Any:
        """The steady study's output-length distribution (workload.OutputLengths)."""
        from .workload import REASONING_CAP, OutputLengths

        if self.output_dist == "reasoning":
            return OutputLengths.reasoning()
        if self.output_dist == "fixed":
            return OutputLengths.fixed(self.output_len)
        return OutputLengths.from_file(self.output_dist, min(REASONING_CAP, self.max_model_len - self.input_max))

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
    if s.study == "steady":
        if not (isinstance(s.input_min, int) and 1 <= s.input_min <= s.input_max):
            raise bench_error("input_min", s.input_min, f"must be an integer in [1, input_max {s.input_max}]")
        if s.concurrency < 0:
            raise bench_error("concurrency", s.concurrency, "must be a positive integer, or 0 for max_num_seqs + 25%")
        if s.concurrency and s.concurrency <= s.max_num_seqs:
            raise bench_error("concurrency", s.concurrency, f"must exceed max_num_seqs {s.max_num_seqs}: the "
                              "closed loop keeps more requests than any config can run")
        if not (s.warmup_s >= 0 and s.window_s > 0):
            raise bench_error("window_s", s.window_s, "must be > 0 (and warmup_s >= 0)")
        if s.output_dist not in ("reasoning", "fixed") and not os.path.isfile(s.output_dist):
            raise bench_error("output_dist", s.output_dist, "must be reasoning, fixed, or a file of lengths")
        try:
            longest = s.output_lengths().lengths[-1]
        except ValueError as e:
            raise bench_error("output_dist", s.output_dist, str(e)) from None
        if s.input_max + longest > s.max_model_len:
            raise bench_error("max_model_len", s.max_model_len, f"must hold input_max {s.input_max} + the longest "
                              f"output {longest} = {s.input_max + longest}")
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


# ---------------------------------------------------------------- command-line options


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
    p.add_argument("--steady", action="store_true",
                   help="steady-state mode: a closed loop keeps --concurrency requests in the engine; tok/s, mean "
                        "running and TPOT over --window-s after --warmup-s (no ramp, no tail)")
    p.add_argument("--concurrency", type=nonneg_int, default=0,
                   help="steady: requests kept in the engine (default max_num_seqs + 25%%: more than any config runs)")
    p.add_argument("--output-dist", default="reasoning",
                   help="steady: output lengths: reasoning (R1-distill MATH-500 traces, modelled: see "
                        "rlkv_vllm/bench/workload.py), fixed (--output-len), or a file with one length per line")
    p.add_argument("--input-range", nargs=2, type=positive_int, default=[100, 500], metavar=("MIN", "MAX"),
                   help="steady: prompt lengths, uniform (default 100 500)")
    p.add_argument("--warmup-s", type=nonneg_float, default=60.0, help="steady: seconds before the window")
    p.add_argument("--window-s", type=nonneg_float, default=120.0, help="steady: the measured window's seconds")
    p.add_argument("--profile-steps", type=nonneg_int, default=0,
                   help="profile this many engine steps of the throughput run (torch profiler): device time "
                        "per kernel category per step, in each config's result (0: off)")
    p.add_argument("--profile-start", type=nonneg_int, default=200,
                   help="the step at which the profiled window opens (steady state, after admission; with --steady: steps into the measured window)")
    p.add_argument("--deadline-s", type=nonneg_float, default=d["deadline_s"],
                   help="the whole run must end within this; configs that cannot are skipped")
    p.add_argument("--config-timeout-s", type=nonneg_float, default=d["config_timeout_s"])
    p.add_argument("--min-config-s", type=nonneg_float, default=0.0,
                   help="expected seconds per config before one has finished (for the deadline)")
    p.add_argument("--out", default=None, help="study JSON (merged into if it exists)")
    p.add_argument("--tag", default="", help="suffix of the default JSON name")
