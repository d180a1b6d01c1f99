"""The plan: what RLKV does for one model and engine shape, with no tensors allocated.

Pure (numpy + torch dtypes only): the front-end builds it to validate at startup, each
worker builds it again to allocate, and the trainer builds it to size its rollouts.

Ring geometry (serving and training share it): a streaming head keeps, per request,
``window = sink + recent`` rows; position ``p`` lives in row ``p`` if ``p < sink``, else
``sink + (p - sink) % recent``. Keys carry RoPE already, so the order inside the ring
does not matter for attention.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np
import torch

from .patterns import LayerHeads, layers_without_full_head, select_heads, split_layers, streaming_fraction
from .settings import ModelShape, RLKVSettings, config_error

# vLLM's FP8 ``kv_cache_dtype`` names and the element type RLKV stores them in (paged and
# ring alike): one byte per element, scaled per layer by vLLM's k/v scales
FP8_KV_DTYPES: dict[str, torch.dtype] = {
    "fp8": torch.float8_e4m3fn,
    "fp8_e4m3": torch.float8_e4m3fn,
    "fp8_e5m2": torch.float8_e5m2,
}


def kv_storage_dtype(kv_cache_dtype: str, dtype: torch.dtype) -> torch.dtype:
    """The element type a KV cache of vLLM's ``kv_cache_dtype`` name holds for a model of
    ``dtype`` ("auto" or the model's own dtype name: ``dtype``; an FP8 name: its fp8 type).
    Raises ValueError for a name RLKV does not store (the startup check refuses it first)."""
    if kv_cache_dtype in FP8_KV_DTYPES:
        return FP8_KV_DTYPES[kv_cache_dtype]
    if kv_cache_dtype == "auto" or kv_cache_dtype == str(dtype).replace("torch.", ""):
        return dtype
    raise ValueError(f"kv_cache_dtype {kv_cache_dtype!r}")


def is_fp8(dtype: torch.dtype) -> bool:
    return dtype in (torch.float8_e4m3fn, torch.float8_e5m2)


def ring_index(pos: torch.Tensor, sink: int, recent: int) -> torch.Tensor:
    """Ring row of absolute position(s) ``pos`` (any int tensor shape)."""
    return torch.where(pos < sink, pos, sink + torch.remainder(pos - sink, recent))


def ring_heads_of(layers: list[LayerHeads], mode: str) -> list[int]:
    """Heads with a ring per layer: the streaming heads (serve), every head (gated)."""
    if mode == "serve":
        return [l.n_stream for l in layers]
    # gated: the streaming branch of every head reads its own ring (vLLM's CPU paged
    # layout is ISA-specific, so the ring is the one portable place to read it from)
    return [l.n_full + l.n_stream for l in layers]


def ring_bytes(ring_heads: list[int], num_slots: int, window: int, head_size: int, dtype: torch.dtype) -> int:
    """Bytes of all rings: (slots + 1 scratch) x window x ring heads x (K + V); dtype: the
    ring's element type (the KV cache's: 1 byte for fp8)."""
    return (num_slots + 1) * ring_slot_bytes(ring_heads, window, head_size, dtype)


def ring_slot_bytes(ring_heads: list[int], window: int, head_size: int, dtype: torch.dtype) -> int:
    """Bytes of one ring slot, all layers: window x ring heads x (K + V)."""
    elem = torch.empty((), dtype=dtype).element_size()
    return window * sum(ring_heads) * 2 * head_size * elem


# the request length "auto" ring slots are sized for, as a fraction of max_model_len
AUTO_SLOT_TOKENS_FRACTION = 0.25


def budget_ring_slots(budget: int, slot_bytes: int, bytes_per_token: int, request_tokens: int,
                      max_num_seqs: int) -> int:
    """How many ring slots a KV budget should hold: the requests it holds at ``request_tokens`` each.

    Each running request costs one ring slot plus its paged tokens, and the ring has one
    scratch slot more, so the budget B splits as

        B = (slots + 1) * slot_bytes + slots * request_tokens * bytes_per_token
        slots = floor((B - slot_bytes) / (slot_bytes + request_tokens * bytes_per_token))

    clamped to [1, max_num_seqs]: a ring slot more than the paged pool can feed at that
    length is memory taken from the pool for nothing, and more than max_num_seqs never run.

    Why a representative length and not max_num_seqs: vLLM runs as many requests as the paged
    pool holds blocks for, so running requests settle where the pool is full of requests of
    their mean length in flight (prompt plus the output generated so far). ``request_tokens``
    stands for that mean. Too long a guess caps running requests below what the pool would
    run (each waits for a slot, not for blocks); too short keeps ring slots that never fill,
    the cost this replaces. The default, max_model_len / 4 (``AUTO_SLOT_TOKENS_FRACTION``),
    keeps every request of the H200 steady-state study running (665 at a mean of 2,523
    tokens in flight, 0.29 x max_model_len 8,704: auto gives 779 slots of the 1,024 asked);
    workloads of shorter requests set ``rlkv.slot_tokens`` or ``rlkv.ring_slots``.
    budget: the whole KV budget (paged + ring) in bytes; request_tokens: rounded up to whole
    blocks by the caller (the pool is charged whole blocks).
    """
    if slot_bytes <= 0:
        return max_num_seqs  # no ring (no streaming head): slots cost nothing
    per_request = slot_bytes + request_tokens * bytes_per_token
    slots = (budget - slot_bytes) // per_request
    return int(max(1, min(max_num_seqs, slots)))


@dataclass
class RLKVPlan:
    """What RLKV will do for one engine config (no tensors allocated).

    mask: bool [L, H_kv] full heads (global indices); gates: float32 [L, H_kv].
    layers: this rank's per-layer split; ring_nbytes: bytes of this rank's rings
    (max over ranks, which is what every rank must reserve), ``num_slots + 1`` slots of
    ``ring_slot_nbytes``. num_slots: ring slots, one per running request (slot ``num_slots``
    is scratch); at most max_num_seqs, the runner's row count.
    slots_by: why the ring has num_slots slots, in words (startup summary, /metrics).
    warnings: one-line problems that do not stop a start (e.g. a pattern made for another
    model), for the start-up log and ``rlkv pattern``.
    dtype: the model's (compute) dtype; kv_dtype: what the paged cache and the ring store
    (None: dtype; fp8 with ``--kv-cache-dtype fp8``): every byte count uses its element size.
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
    num_slots: int = 0
    ring_slot_nbytes: int = 0
    slots_by: str = "max_num_seqs"
    warnings: list[str] = field(default_factory=list)
    kv_dtype: torch.dtype | None = None

    @property
    def cache_dtype(self) -> torch.dtype:
        """The element type of the paged cache and the ring."""
        return self.kv_dtype if self.kv_dtype is not None else self.dtype

    def _elem(self) -> int:
        return torch.empty((), dtype=self.cache_dtype).element_size()

    def with_slots(self, num_slots: int, slots_by: str) -> "RLKVPlan":
        """The same plan with a ring of ``num_slots`` slots (and the settings saying so, so a
        worker that rebuilds the plan from them gets the same ring)."""
        if not 1 <= num_slots <= self.max_num_seqs:
            raise ValueError(f"num_slots must be in [1, {self.max_num_seqs}], got {num_slots}")
        return replace(self, settings=replace(self.settings, ring_slots=num_slots), num_slots=num_slots,
                       ring_nbytes=(num_slots + 1) * self.ring_slot_nbytes, slots_by=slots_by)

    @property
    def serve(self) -> bool:
        return self.settings.mode == "serve"

    def ring_heads(self) -> list[int]:
        """Heads with a ring per layer: the streaming heads (serve), every head (gated)."""
        return ring_heads_of(self.layers, self.settings.mode)

    @property
    def sparsity_actual(self) -> float:
        """The effective sparsity; selection works in whole heads, so it can differ from the request."""
        return streaming_fraction(self.mask)

    @property
    def layers_without_full_head(self) -> int:
        return layers_without_full_head(self.mask)

    def paged_heads(self) -> list[int]:
        """KV-head slots each layer pages (0: a layer with no full head)."""
        if not self.serve:
            return [len(l.full) + len(l.stream) for l in self.layers]
        return [l.paged_slots for l in self.layers]

    def paged_bytes_per_token(self) -> int:
        """What vLLM's block manager is charged per token; a layer with no full head
        reports one slot of head size 1 (see compat.reduce_kv_spec)."""
        elem = self._elem()
        heads = self.paged_heads()
        return (sum(heads) * 2 * self.shape.head_size + 2 * heads.count(0)) * elem

    def ideal_bytes_per_token(self) -> int:
        """Bytes per token of the full heads alone."""
        elem = self._elem()
        return sum(self.paged_heads()) * 2 * self.shape.head_size * elem

    def stock_bytes_per_token(self) -> int:
        """Stock vLLM's bytes per token at the same KV dtype (fp8 against stock fp8)."""
        elem = self._elem()
        heads = sum(len(l.full) + len(l.stream) for l in self.layers)
        return heads * 2 * self.shape.head_size * elem

    def summary(self) -> str:
        full = int(self.mask.sum())
        return (
            f"RLKV {self.settings.mode}: {full}/{self.mask.size} KV heads full "
            f"(sparsity {self.sparsity_actual:.3f}, selection {self.settings.selection}), "
            f"window {self.settings.sink}+{self.settings.recent}, "
            f"paged KV {self.paged_bytes_per_token()} B/token vs stock {self.stock_bytes_per_token()}, "
            f"ring {self.ring_nbytes / 2**20:.1f} MiB for {self.num_slots} slots"
        )


def build_plan(
    settings: RLKVSettings,
    shape: ModelShape,
    *,
    max_num_seqs: int,
    dtype: torch.dtype,
    tp_size: int = 1,
    tp_rank: int = 0,
    kv_dtype: torch.dtype | None = None,
) -> RLKVPlan:
    """Validate settings against a model shape and size the pools; raises RLKVConfigError.

    dtype: the model's dtype; kv_dtype: the KV cache's element type (None: dtype; fp8 from
    ``kv_storage_dtype``), which the ring stores too and every byte count uses.

    The ring gets ``settings.ring_slots`` slots when that is a number, else max_num_seqs (an
    "auto" ring is sized once the KV budget is known: ``RLKVPlan.with_slots``).
    """
    heads = select_heads(settings, shape)
    mask = heads.mask
    layers = split_layers(mask, tp_size, tp_rank)
    if settings.ring_slots == "auto":
        num_slots, slots_by = max_num_seqs, "max_num_seqs"
    elif settings.ring_slots > max_num_seqs:
        raise config_error("ring_slots", settings.ring_slots,
                           f"must be at most max_num_seqs = {max_num_seqs} (one slot per running request), "
                           'or "auto"')
    else:
        num_slots, slots_by = int(settings.ring_slots), "rlkv.ring_slots"
    slot_nbytes = max(
        ring_slot_bytes(ring_heads_of(split_layers(mask, tp_size, r), settings.mode), settings.window,
                        shape.head_size, kv_dtype if kv_dtype is not None else dtype)
        for r in range(tp_size)
    )
    return RLKVPlan(
        settings=settings,
        shape=shape,
        mask=mask,
        gates=heads.gates,
        tp_size=tp_size,
        tp_rank=tp_rank,
        layers=layers,
        max_num_seqs=max_num_seqs,
        dtype=dtype,
        ring_nbytes=(num_slots + 1) * slot_nbytes,
        num_slots=num_slots,
        ring_slot_nbytes=slot_nbytes,
        slots_by=slots_by,
        warnings=list(heads.warnings),
        kv_dtype=kv_dtype,
    )
