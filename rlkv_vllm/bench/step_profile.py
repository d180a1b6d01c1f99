"""Where an engine step's time goes: device time per kernel category over a window of steps.

The engine study (``rlkv bench --profile-steps N``) wraps N consecutive ``engine.step()``
calls in a torch profiler and reduces the trace to a small table: device time per step
in each category (full attention, RLKV's ring kernel and KV write, head gathers/scatters,
GEMMs, sampling, ...), the share of each, and how busy the device was (kernel time / wall
time: the rest is host overhead and gaps). On CPU the same table is built from the CPU
operators' self time, which is enough to check the tool, not to time a GPU.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from typing import Any

# first match wins; patterns are matched against lower-cased kernel / operator names
CATEGORIES: list[tuple[str, re.Pattern[str]]] = [
    ("rlkv_decode_step", re.compile(r"_decode_step_kernel|rlkv_decode_step")),
    ("rlkv_ring_attention", re.compile(r"_ring_attention_kernel")),
    ("rlkv_kv_write", re.compile(r"_fused_kv_write_kernel")),
    ("kv_cache_write", re.compile(r"reshape_and_cache|cache_kernel|concat_and_cache|kv_cache_update")),
    ("attention", re.compile(r"flash|fmha|attention|attn|paged|sdpa|unified")),
    ("gather_scatter", re.compile(r"index_select|indexselect|index_put|indexput|index_copy|gather|scatter|"
                                  r"cat_|catarray|aten::cat|index_elementwise|vectorized_gather|"
                                  r"aten::index$")),
    ("gemm", re.compile(r"gemm|cutlass|xmma|cublas|nvjet|matmul|aten::mm|aten::addmm|aten::bmm|aten::linear|"
                        r"onednn_mm|sm90_|wgmma|splitk")),
    ("sampling", re.compile(r"sampl|topk|top_k|softmax|argmax|multinomial|exponential|sort|log_softmax|"
                            r"penalt")),
    ("norm_rope_act", re.compile(r"rms_norm|rmsnorm|layernorm|rotary|rope|silu|act_and_mul|gelu")),
    ("copy_fill", re.compile(r"memcpy|memset|copy_|fill_|elementwise_kernel.*copy")),
    # host-side tensor bookkeeping (CPU traces only: no device time on a GPU)
    ("views_allocs", re.compile(r"^aten::(slice|view|as_strided|empty|reshape|expand|select|unsqueeze|"
                                r"squeeze|t|transpose|permute|narrow|split|unbind|alias|detach|_to_copy|to)$")),
]


def categorize(name: str) -> str:
    """The category of a kernel or operator name ("other" when none matches)."""
    low = name.lower()
    for cat, pat in CATEGORIES:
        if pat.search(low):
            return cat
    return "other"


@dataclass
class StepProfile:
    """A profiling window's result.

    ``device_us_per_step[cat]``: summed kernel (GPU) or self (CPU) time of that category,
    divided by the steps in the window.
    """

    steps: int
    wall_ms_per_step: float
    device: str  # "cuda" or "cpu": where the times were read
    device_us_per_step: dict[str, float] = field(default_factory=dict)
    top_kernels: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        busy_us = sum(self.device_us_per_step.values())
        wall_us = self.wall_ms_per_step * 1e3
        return dict(
            steps=self.steps, device=self.device, wall_ms_per_step=round(self.wall_ms_per_step, 3),
            device_ms_per_step=round(busy_us / 1e3, 3),
            busy_fraction=round(busy_us / wall_us, 3) if wall_us > 0 else None,
            ms_per_step={k: round(v / 1e3, 4) for k, v in sorted(self.device_us_per_step.items(),
                                                                  key=lambda kv: -kv[1])},
            share={k: round(v / busy_us, 4) for k, v in self.device_us_per_step.items()} if busy_us else {},
            top_kernels=self.top_kernels,
        )


def _self_device_us(evt: Any) -> float:
    for attr in ("self_device_time_total", "self_cuda_time_total"):
        v = getattr(evt, attr, None)
        if v:
            return float(v)
    return 0.0


def summarize(events: Any, steps: int, wall_s: float, on_cuda: bool, top: int = 15) -> StepProfile:
    """Reduce ``profiler.key_averages()`` to a StepProfile."""
    per_cat: dict[str, float] = {}
    rows: list[tuple[float, str, int]] = []
    for evt in events:
        if on_cuda:
            # kernels only: a CPU operator's self device time repeats its kernels' time
            if not str(getattr(evt, "device_type", "")).endswith("CUDA"):
                continue
            us = _self_device_us(evt)
        else:
            us = float(getattr(evt, "self_cpu_time_total", 0.0) or 0.0)
            # profiler bookkeeping, not work
            if evt.key.startswith("ProfilerStep") or evt.key.startswith("[memory]"):
                continue
        if us <= 0:
            continue
        cat = categorize(evt.key)
        per_cat[cat] = per_cat.get(cat, 0.0) + us
        rows.append((us, evt.key, int(getattr(evt, "count", 0))))
    rows.sort(reverse=True)
    n = max(steps, 1)
    top_rows = [dict(name=name[:120], category=categorize(name), us_per_step=round(us / n, 2), calls=calls)
                for us, name, calls in rows[:top]]
    return StepProfile(steps=steps, wall_ms_per_step=wall_s * 1e3 / n, device="cuda" if on_cuda else "cpu",
                       device_us_per_step={k: v / n for k, v in per_cat.items()}, top_kernels=top_rows)


class StepProfiler:
    """Profile a window of engine steps: call ``before_step`` and ``after_step`` around each step.

    The window opens at step ``start`` (0-based count of steps seen) and closes after
    ``steps`` steps; ``result`` is None until it closed. ``overhead_s`` is the host time the
    profiler itself took outside the window's steps (draining the device before the window,
    collecting and reducing the trace after it): a timed run subtracts it from its clock.
    """

    def __init__(self, start: int, steps: int) -> None:
        if start < 0 or steps <= 0:
            raise ValueError(f"profile window start={start} steps={steps}: need start >= 0 and steps > 0")
        self.start, self.steps = start, steps
        self._seen = 0
        self._prof: Any = None
        self._t0 = 0.0
        self._on_cuda = False
        self.overhead_s = 0.0
        self.result: StepProfile | None = None

    def before_step(self) -> None:
        if self._seen == self.start and self.result is None:
            t = time.perf_counter()
            import torch
            from torch.profiler import ProfilerActivity, profile

            self._on_cuda = torch.cuda.is_available()
            acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self._on_cuda else [])
            if self._on_cuda:
                torch.cuda.synchronize()
            self._prof = profile(activities=acts)
            self._prof.start()
            self._t0 = time.perf_counter()
            self.overhead_s += self._t0 - t

    def after_step(self) -> None:
        self._seen += 1
        if self._prof is not None and self._seen == self.start + self.steps:
            self.close()

    def close(self) -> None:
        """Close an open window early (the run ended inside it)."""
        if self._prof is None:
            return
        import torch

        if self._on_cuda:
            torch.cuda.synchronize()
        t = time.perf_counter()
        wall = t - self._t0
        self._prof.stop()
        done = self._seen - self.start
        self.result = summarize(self._prof.key_averages(), done, wall, self._on_cuda)
        self._prof = None
        self.overhead_s += time.perf_counter() - t
