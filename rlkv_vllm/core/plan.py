"""The plan: what RLKV does for one model and engine shape, with no tensors allocated.

Pure (numpy + torch dtypes only): the front-end builds it to validate at startup, each
worker builds it again to allocate, and the trainer builds it to size its rollouts.

Ring geometry (serving and training share it): a streaming head keeps, per request,
``window = sink + recent`` rows; position ``p`` lives in row ``p`` if ``p < sink``, else
``sink + (p - sink) % recent``. Keys carry RoPE already, so the order inside the ring
does not matter for attention.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from .patterns import LayerHeads, layers_without_full_head, select_heads, split_layers, streaming_fraction
from .settings import ModelShape, RLKVSettings


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
    """Bytes of all rings: (slots + 1 scratch) x window x ring heads x (K + V)."""
    elem = torch.empty((), dtype=dtype).element_size()
    return (num_slots + 1) * window * sum(ring_heads) * 2 * head_size * elem


@dataclass
class RLKVPlan:
    """What RLKV will do for one engine config (no tensors allocated).

    mask: bool [L, H_kv] full heads (global indices); gates: float32 [L, H_kv].
    layers: this rank's per-layer split; ring_nbytes: bytes of this rank's rings
    (max over ranks, which is what every rank must reserve).
    warnings: one-line problems that do not stop a start (e.g. a pattern made for another
    model), for the start-up log and ``rlkv pattern``.
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
    warnings: list[str] = field(default_factory=list)

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


def build_plan(
    settings: RLKVSettings,
    shape: ModelShape,
    *,
    max_num_seqs: int,
    dtype: torch.dtype,
    tp_size: int = 1,
    tp_rank: int = 0,
) -> RLKVPlan:
    """Validate settings against a model shape and size the pools; raises RLKVConfigError."""
    heads = select_heads(settings, shape)
    mask = heads.mask
    layers = split_layers(mask, tp_size, tp_rank)
    nbytes = max(
        ring_bytes(ring_heads_of(split_layers(mask, tp_size, r), settings.mode), max_num_seqs,
                   settings.window, shape.head_size, dtype)
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
        ring_nbytes=nbytes,
        warnings=list(heads.warnings),
    )
