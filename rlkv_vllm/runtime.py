"""Per-process RLKV state derived from one vLLM config.

``RLKVPlan`` is pure (settings, head split, ring size) and is built both in the
front-end (to validate at startup) and in each worker. ``RLKVRuntime`` adds what
a worker holds: the ring pool, the slot manager and the gate buffer.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from . import compat
from .patterns import LayerHeads, resolve_head_mask, split_layers
from .ring import RingPool, ring_bytes
from .settings import ModelShape, RLKVConfigError, RLKVSettings, parse_settings
from .slots import SlotManager

logger = logging.getLogger("rlkv_vllm")


def model_shape(vllm_config: Any) -> ModelShape:
    mc = vllm_config.model_config
    hf = mc.hf_text_config
    return ModelShape(
        num_layers=int(hf.num_hidden_layers),
        num_kv_heads=int(mc.get_total_num_kv_heads()),
        num_q_heads=int(hf.num_attention_heads),
        head_size=int(mc.get_head_size()),
        model_id=str(mc.model),
    )


def tp_size_rank(vllm_config: Any) -> tuple[int, int]:
    size = int(vllm_config.parallel_config.tensor_parallel_size)
    if size == 1:
        return 1, 0
    try:
        from vllm.distributed import get_tensor_model_parallel_rank

        return size, int(get_tensor_model_parallel_rank())
    except Exception:  # noqa: BLE001 - front-end: no process group yet
        return size, 0


@dataclass
class RLKVPlan:
    """What RLKV will do for one engine config (no tensors allocated).

    mask: bool [L, H_kv] full heads (global indices); gates: float32 [L, H_kv].
    layers: this rank's per-layer split; ring_nbytes: bytes of this rank's rings
    (max over ranks, which is what every rank must reserve).
    """

    settings: RLKVSettings
    shape: ModelShape
    mask: np.ndarray
    gates: np.ndarray
    tp_size: int
    tp_rank: int
    layers: list[LayerHeads]
    max_num_seqs: int
    dtype: torch.dtype
    ring_nbytes: int

    @property
    def serve(self) -> bool:
        return self.settings.mode == "serve"

    def ring_heads(self) -> list[int]:
        """Heads with a ring per layer: the streaming heads (serve), every head (gated)."""
        return ring_heads_of(self.layers, self.settings.mode)

    @property
    def sparsity_actual(self) -> float:
        return float(1.0 - self.mask.mean())

    def paged_heads(self) -> list[int]:
        """KV-head slots each layer pages (0: a layer with no full head)."""
        if not self.serve:
            return [len(l.full) + len(l.stream) for l in self.layers]
        return [l.paged_slots for l in self.layers]

    def paged_bytes_per_token(self) -> int:
        """What vLLM's block manager is charged per token; a layer with no full head
        reports one slot of head size 1 (see compat.reduce_kv_spec)."""
        elem = torch.empty((), dtype=self.dtype).element_size()
        heads = self.paged_heads()
        return (sum(heads) * 2 * self.shape.head_size + 2 * heads.count(0)) * elem

    def ideal_bytes_per_token(self) -> int:
        """Bytes per token of the full heads alone."""
        elem = torch.empty((), dtype=self.dtype).element_size()
        return sum(self.paged_heads()) * 2 * self.shape.head_size * elem

    def stock_bytes_per_token(self) -> int:
        elem = torch.empty((), dtype=self.dtype).element_size()
        heads = sum(len(l.full) + len(l.stream) for l in self.layers)
        return heads * 2 * self.shape.head_size * elem

    def summary(self) -> str:
        full = int(self.mask.sum())
        return (
            f"RLKV {self.settings.mode}: {full}/{self.mask.size} KV heads full "
            f"(sparsity {self.sparsity_actual:.3f}, selection {self.settings.selection}), "
            f"window {self.settings.sink}+{self.settings.recent}, "
            f"paged KV {self.paged_bytes_per_token()} B/token vs stock {self.stock_bytes_per_token()}, "
            f"ring {self.ring_nbytes / 2**20:.1f} MiB for {self.max_num_seqs} slots"
        )


def ring_heads_of(layers: list[LayerHeads], mode: str) -> list[int]:
    if mode == "serve":
        return [l.n_stream for l in layers]
    # gated: the streaming branch of every head reads its own ring (vLLM's CPU paged
    # layout is ISA-specific, so the ring is the one portable place to read it from)
    return [l.n_full + l.n_stream for l in layers]


def build_plan(vllm_config: Any, tp_rank: int | None = None) -> RLKVPlan:
    """Validate RLKV against an engine config; raises RLKVConfigError with one line."""
    raw = (vllm_config.additional_config or {}).get("rlkv")
    settings = parse_settings(raw)
    shape = model_shape(vllm_config)
    if shape.num_q_heads % shape.num_kv_heads:
        raise RLKVConfigError(
            f"model {shape.model_id} has {shape.num_q_heads} query heads, not a multiple of "
            f"its {shape.num_kv_heads} KV heads"
        )
    mask, gates = resolve_head_mask(settings, shape)
    tp_size, rank = tp_size_rank(vllm_config)
    if tp_rank is not None:
        rank = tp_rank
    layers = split_layers(mask, tp_size, rank)
    dtype = vllm_config.model_config.dtype
    max_num_seqs = int(vllm_config.scheduler_config.max_num_seqs)
    nbytes = max(
        ring_bytes(ring_heads_of(split_layers(mask, tp_size, r), settings.mode), max_num_seqs,
                   settings.window, shape.head_size, dtype)
        for r in range(tp_size)
    )
    return RLKVPlan(
        settings=settings,
        shape=shape,
        mask=mask,
        gates=gates,
        tp_size=tp_size,
        tp_rank=rank,
        layers=layers,
        max_num_seqs=max_num_seqs,
        dtype=dtype,
        ring_nbytes=nbytes,
    )


def resolve_kernel(kernel: str, device: torch.device) -> str:
    """The streaming-pool implementation to run: "triton" or "torch"."""
    if kernel == "auto":
        return "triton" if device.type == "cuda" else "torch"
    return kernel


def decode_kernel_problem(plan: RLKVPlan) -> str | None:
    """Why the CUDA decode kernel cannot serve this plan (None if it can), device aside."""
    from .ops import cuda_build, cuda_decode

    reason = cuda_decode.shape_unsupported_reason(plan.dtype, plan.shape.head_size, plan.shape.group_size,
                                                  plan.settings.window)
    if reason is not None:
        return reason
    try:
        cuda_build.locate("rlkv_decode")
    except cuda_build.CudaBuildError as e:
        return str(e)
    return None


def resolve_decode_kernel(plan: RLKVPlan, kernel: str, device: torch.device) -> str:
    """The decode-step kernel: "triton" or "cuda" (only with the Triton streaming path).

    "auto" takes Triton: the CUDA kernel is opt-in until the kernel study shows it faster
    on the device in hand (docs/RESULTS.md).
    """
    choice = plan.settings.decode_kernel
    if kernel != "triton" or choice in ("auto", "triton"):
        return "triton"
    from .ops import cuda_decode

    problem = decode_kernel_problem(plan) or cuda_decode.unavailable_reason(device)
    if problem is not None:
        raise RLKVConfigError(f"rlkv.decode_kernel = 'cuda' cannot run: {problem}")
    return "cuda"


class RLKVRuntime:
    """A worker's RLKV state for one engine. Created by the first RLKV attention layer."""

    def __init__(self, vllm_config: Any) -> None:
        self.vllm_config = vllm_config
        self.plan = build_plan(vllm_config)
        self.settings = self.plan.settings
        self.device = torch.device(vllm_config.device_config.device)
        self.ring: RingPool | None = None
        from .metrics import WorkerMetricsPublisher

        self.metrics = WorkerMetricsPublisher.from_env(self.plan)
        self.slots = SlotManager(self.plan.max_num_seqs, on_change=self.metrics.on_slots)
        # alpha per (layer, local KV head); updated in place so CUDA graphs stay valid
        local = [len(l.full) + len(l.stream) for l in self.plan.layers]
        if len(set(local)) != 1:
            raise RLKVConfigError(f"layers hold different numbers of KV heads: {local}")
        self.gates = self._local_gates(self.plan.gates).to(self.device)
        self._plan_cache: tuple[Any, Any] | None = None
        self.kernel = resolve_kernel(self.settings.kernel, self.device)
        # loads the CUDA module here, inside model loading and before any graph capture
        self.decode_kernel = resolve_decode_kernel(self.plan, self.kernel, self.device)
        sched = vllm_config.scheduler_config
        rows = max(self.plan.max_num_seqs, int(getattr(sched, "max_num_batched_tokens", 0) or 0)) + 1
        self.slot_buffer = torch.full((rows,), self.plan.max_num_seqs, dtype=torch.int32, device=self.device)
        self.preemptions_seen = 0
        self.metrics.on_slots(self.slots)

    @property
    def serve(self) -> bool:
        return self.plan.serve

    def _local_gates(self, gates: np.ndarray) -> torch.Tensor:
        from .patterns import local_kv_heads

        heads = local_kv_heads(self.plan.shape.num_kv_heads, self.plan.tp_size, self.plan.tp_rank)
        return torch.as_tensor(np.asarray(gates, dtype=np.float32)[:, heads])

    def ensure_ring(self) -> RingPool | None:
        """Allocate the rings (inside model loading, so memory profiling counts them)."""
        if self.ring is None:
            self.ring = RingPool(
                self.plan.ring_heads(),
                self.plan.max_num_seqs,
                self.settings.sink,
                self.settings.recent,
                self.plan.shape.head_size,
                self.plan.dtype,
                self.device,
            )
            logger.info("RLKV ring pool: %.1f MiB on %s", self.ring.nbytes / 2**20, self.device)
        return self.ring

    def set_gates(self, gates: Any) -> float:
        """Replace alpha in place; gates: [L, H_kv] (global heads). Returns the checksum."""
        g = np.asarray(gates, dtype=np.float32)
        if g.shape != (self.plan.shape.num_layers, self.plan.shape.num_kv_heads):
            raise ValueError(
                f"gates must have shape {self.plan.shape.num_layers} x {self.plan.shape.num_kv_heads}, "
                f"got {g.shape}"
            )
        if not np.all(np.isfinite(g)):
            raise ValueError("gates hold NaN or inf")
        self.gates.copy_(self._local_gates(np.clip(g, 0.0, 1.0)).to(self.gates.device))
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
        self.metrics.on_step()

    def slot_ids_for_batch(self, num_reqs: int) -> list[int]:
        """Ring slot per batch row; dummy batches all use the scratch slot."""
        scratch = self.plan.max_num_seqs
        ids = compat.RUNNER_HOOKS.batch_req_ids(num_reqs)
        if ids is None:
            return [scratch] * num_reqs
        runner = compat.RUNNER_HOOKS.runner
        known = getattr(runner, "requests", None)
        alive = (lambda rid: rid in known) if known is not None else None
        return self.slots.assign(ids, alive=alive) + [scratch] * (num_reqs - len(ids))

    def slot_ids_on_device(self, num_reqs: int) -> torch.Tensor:
        """This step's ring slot per batch row, in a persistent device buffer (CUDA graphs
        capture its address). Returns a view of its first ``num_reqs`` entries."""
        slots = self.slot_ids_for_batch(num_reqs)
        if num_reqs > self.slot_buffer.shape[0]:
            raise RuntimeError(f"batch of {num_reqs} rows exceeds the ring slot buffer")
        buf = self.slot_buffer[:num_reqs]
        host = torch.tensor(slots, dtype=torch.int32)
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
