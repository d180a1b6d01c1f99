"""Per-worker RLKV state derived from one vLLM config.

The plan (``core.plan``) is pure and is built both in the front-end (to validate at
startup) and in each worker. ``RLKVRuntime`` adds what a worker holds: the ring
pool, the slot manager and the gate buffer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from . import compat
from .core.gates import checked_gates
from .core.patterns import local_kv_heads
from .core.plan import FP8_KV_DTYPES, RLKVPlan, kv_storage_dtype
from .core.plan import build_plan as core_build_plan
from .core.settings import RLKVConfigError, parse_settings
from .metrics import WorkerMetricsPublisher
from .ops.pools import StreamingPool, choose_pool
from .ring import RingPool
from .slots import SlotManager

logger = compat.plugin_logger()


def build_plan(vllm_config: Any, tp_rank: int | None = None) -> RLKVPlan:
    """The plan of one engine config; raises RLKVConfigError with one line."""
    tp_size, rank = compat.tp_size_rank(vllm_config)
    dtype = compat.model_dtype(vllm_config)
    plan = core_build_plan(
        parse_settings(compat.rlkv_section(vllm_config)),
        compat.model_shape(vllm_config),
        max_num_seqs=compat.max_num_seqs(vllm_config),
        dtype=dtype,
        tp_size=tp_size,
        tp_rank=rank if tp_rank is None else tp_rank,
        kv_dtype=kv_dtype_of(vllm_config, dtype),
    )
    by = compat.ring_slots_by(vllm_config)  # the workers see the number the front end decided, not why
    if by is not None:
        plan.slots_by = by
    return plan


def kv_dtype_of(vllm_config: Any, dtype: torch.dtype) -> torch.dtype:
    """The element type of the paged cache and the ring; raises RLKVConfigError (one line)
    for a ``kv_cache_dtype`` RLKV cannot store."""
    name = compat.kv_cache_dtype_name(vllm_config)
    try:
        return kv_storage_dtype(name, dtype)
    except ValueError:
        allowed = ", ".join(["auto", *FP8_KV_DTYPES])
        raise RLKVConfigError(f"kv_cache_dtype = {name!r} is not allowed with RLKV: use one of {allowed}") from None


class RLKVRuntime:
    """A worker's RLKV state for one engine. Created by the first RLKV attention layer."""

    def __init__(self, vllm_config: Any) -> None:
        self.vllm_config = vllm_config
        self.plan = build_plan(vllm_config)
        self.settings = self.plan.settings
        self.device = torch.device(vllm_config.device_config.device)
        self.ring: RingPool | None = None
        self.metrics = WorkerMetricsPublisher.from_env(self.plan)
        self.slots = SlotManager(self.plan.num_slots, on_change=self.metrics.on_slots)
        # alpha per (layer, local KV head); updated in place so CUDA graphs stay valid
        local = [len(l.full) + len(l.stream) for l in self.plan.layers]
        if len(set(local)) != 1:
            raise RLKVConfigError(f"layers hold different numbers of KV heads: {local}")
        self.gates = self._local_gates(self.plan.gates).to(self.device)
        self._plan_cache: tuple[Any, Any] | None = None
        # the streaming-pool implementation, chosen once (inside model loading, so a CUDA
        # decode module is loaded before any graph capture)
        self.pool: StreamingPool = choose_pool(self.plan, self.device)
        sched = vllm_config.scheduler_config
        rows = max(self.plan.max_num_seqs, int(getattr(sched, "max_num_batched_tokens", 0) or 0)) + 1
        self.slot_buffer = torch.full((rows,), self.plan.num_slots, dtype=torch.int32, device=self.device)
        self.preemptions_seen = 0
        # the (rows, request ids) whose slots the device buffer holds; None: rebuild at the next step
        self._slots_written: tuple[int, list[str]] | None = None
        self.slot_rows_written = self.slot_rows_reused = 0  # steps that copied the slots / found them right
        # set by the attention impls when they bind: what runs the full heads, and whether vLLM hands
        # them fp8 queries (FA3 with an fp8 cache)
        self.full_kernel: str | None = None
        self.fp8_queries = False
        self.metrics.on_slots(self.slots)
        if self.serve and self.settings.permute_heads == "auto" and not self.permute_heads:
            logger.info("RLKV permute_heads auto: off, sleep mode is enabled (a level-2 wake reloads the weights "
                        "in the model's head order); the full heads are gathered per step")

    @property
    def serve(self) -> bool:
        return self.plan.serve

    @property
    def permute_heads(self) -> bool:
        """Serve mode reorders each layer's heads at weight load (``rlkv.permute_heads``; auto:
        unless sleep mode may reload the weights in the model's order)."""
        want = self.settings.permute_heads
        if want == "auto":
            return self.serve and not compat.sleep_mode_enabled(self.vllm_config)
        return self.serve and bool(want)

    @property
    def kernel(self) -> str:
        """The streaming-pool path: "triton" or "torch"."""
        return self.pool.name

    @property
    def decode_kernel(self) -> str | None:
        """The decode-step kernel of the Triton pool ("triton" or "cuda"); None for torch."""
        return getattr(self.pool, "decode", None)

    def _local_gates(self, gates: np.ndarray) -> torch.Tensor:
        heads = local_kv_heads(self.plan.shape.num_kv_heads, self.plan.tp_size, self.plan.tp_rank)
        return torch.as_tensor(np.asarray(gates, dtype=np.float32)[:, heads])

    def ensure_ring(self) -> RingPool | None:
        """Allocate the rings (inside model loading, so memory profiling counts them)."""
        if self.ring is None:
            self.ring = RingPool(
                self.plan.ring_heads(),
                self.plan.num_slots,
                self.settings.sink,
                self.settings.recent,
                self.plan.shape.head_size,
                self.plan.cache_dtype,
                self.device,
            )
            logger.info("RLKV ring pool: %.1f MiB on %s, %d slots", self.ring.nbytes / 2**20, self.device,
                        self.plan.num_slots)
        return self.ring

    def set_gates(self, gates: Any) -> float:
        """Replace alpha in place; gates: [L, H_kv] (global heads) as nested lists, numpy, torch or
        vLLM's msgpack triple of a small array (see core.gates). Returns the checksum."""
        g = checked_gates(gates, self.plan.shape.num_layers, self.plan.shape.num_kv_heads)
        self.gates.copy_(self._local_gates(g).to(self.gates.device))
        return self.gates_checksum()

    def gates_checksum(self) -> float:
        return float(self.gates.double().sum().item())

    # ------------------------------------------------------------ slot tracking
    def on_step(self, runner: Any, scheduler_output: Any) -> None:
        done = set(getattr(scheduler_output, "finished_req_ids", None) or ())
        preempted = set(getattr(scheduler_output, "preempted_req_ids", None) or ())
        self.preemptions_seen += len(preempted)
        done |= preempted
        if done:
            self.slots.release(done)
            self._slots_written = None  # a released slot may be reassigned: rebuild the rows' slots
        self.metrics.on_step()

    def slot_ids_for_batch(self, num_reqs: int) -> list[int]:
        """Ring slot per batch row; dummy batches all use the scratch slot."""
        return self._slot_rows(num_reqs, compat.RUNNER_HOOKS.batch_req_ids(num_reqs)).tolist()

    def _slot_rows(self, num_reqs: int, ids: list[str] | None) -> np.ndarray:
        """int32 ``[num_reqs]``: each real row's slot, the scratch slot for padded or dummy rows."""
        rows = np.full(num_reqs, self.plan.num_slots, dtype=np.int32)
        if ids is not None:
            self.slots.assign_rows(ids, alive=compat.RUNNER_HOOKS.request_alive(), out=rows)
        return rows

    def slot_ids_on_device(self, num_reqs: int) -> torch.Tensor:
        """This step's ring slot per batch row, in a persistent device buffer (CUDA graphs
        capture its address). Returns a view of its first ``num_reqs`` entries.

        Host work in proportion to what changed (benchmarks/host_step.py): a decode step whose rows are
        the same requests in the same order as the last written batch, with no slot released since
        (``on_step``), finds the buffer already right and costs one list comparison; any other batch
        maps its rows to slots in one C-level pass (only new requests take the Python path,
        ``SlotManager.assign_rows``) and copies ``num_reqs`` int32 to the device."""
        if num_reqs > self.slot_buffer.shape[0]:
            raise RuntimeError(f"batch of {num_reqs} rows exceeds the ring slot buffer")
        buf = self.slot_buffer[:num_reqs]
        ids = compat.RUNNER_HOOKS.batch_req_ids(num_reqs)
        if ids is not None and self._slots_written is not None and self._slots_written == (num_reqs, ids):
            self.slot_rows_reused += 1
            return buf
        host = torch.from_numpy(self._slot_rows(num_reqs, ids))
        self._slots_written = None if ids is None else (num_reqs, ids)
        self.slot_rows_written += 1
        if buf.is_cuda:
            # from pageable memory CUDA synchronises the stream before the copy; a pinned block
            # from the caching host allocator is truly async and not reused before its copy ran
            # (on the H200 engine study the change was within noise: docs/RESULTS.md)
            host = host.pin_memory()
        buf.copy_(host, non_blocking=True)
        return buf

    def cached_step_value(self, key: Any, make: Any) -> Any:
        """Share one per-step computation (the stream plan) across attention groups."""
        if self._plan_cache is not None and self._plan_cache[0] is key:
            return self._plan_cache[1]
        value = make()
        self._plan_cache = (key, value)
        return value


_RUNTIME: RLKVRuntime | None = None


def runtime_for(vllm_config: Any) -> RLKVRuntime:
    """The runtime of this engine's config (a new engine in the same process gets a new one)."""
    global _RUNTIME
    if _RUNTIME is None or _RUNTIME.vllm_config is not vllm_config:
        _RUNTIME = RLKVRuntime(vllm_config)
    return _RUNTIME


def current_runtime() -> RLKVRuntime | None:
    return _RUNTIME


def _on_step(runner: Any, scheduler_output: Any) -> None:
    if _RUNTIME is not None:
        _RUNTIME.on_step(runner, scheduler_output)


if _on_step not in compat.RUNNER_HOOKS.listeners:
    compat.RUNNER_HOOKS.listeners.append(_on_step)
