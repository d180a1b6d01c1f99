"""The streaming pool: per layer, fixed ring slots of sink + recent tokens for the streaming heads."""

from __future__ import annotations

import torch


class RingPool:
    """K and V rings per layer.

    k[layer], v[layer]: [(num_slots + 1) * window, ring_heads[layer], head_size], or None
    for a layer with no ring head (serve mode: its streaming heads; gated mode: all heads). Row ``slot * window + ring_index(pos)`` holds
    position ``pos`` of the request in ``slot``; slot ``num_slots`` is scratch (writes
    that no query will read, and dummy batches). dtype: the KV cache's element type (fp8
    with an fp8 KV cache: rows hold ``clamp(x / scale)``, the layer's k/v scales).
    """

    def __init__(
        self,
        ring_heads: list[int],
        num_slots: int,
        sink: int,
        recent: int,
        head_size: int,
        dtype: torch.dtype,
        device: torch.device | str,
    ) -> None:
        self.num_slots = num_slots
        self.sink = sink
        self.recent = recent
        self.window = sink + recent
        self.scratch_slot = num_slots
        self.k: list[torch.Tensor | None] = []
        self.v: list[torch.Tensor | None] = []
        rows = (num_slots + 1) * self.window
        for heads in ring_heads:
            if heads == 0:
                self.k.append(None)
                self.v.append(None)
                continue
            # zeros, not empty: the pages must be touched so a CPU worker's RSS
            # (which sizes an automatic KV budget) already counts them
            self.k.append(torch.zeros(rows, heads, head_size, dtype=dtype, device=device))
            self.v.append(torch.zeros(rows, heads, head_size, dtype=dtype, device=device))
        self.nbytes = sum(t.numel() * t.element_size() for t in self.k + self.v if t is not None)
