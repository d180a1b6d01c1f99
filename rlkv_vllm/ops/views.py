"""What every streaming-pool kernel takes: the step's rows and one layer's pool views.

``StepRows`` is per step and shared by every layer (vLLM's persistent per-step buffers
plus our ring-slot buffer: their addresses never change, so CUDA graphs replay them).
``LayerPools`` is per layer: the paged cache views of its full heads, its ring, and which
model KV head each paged / ring head stores. The Triton and CUDA kernels take the same two
structures, so their launches are written once each.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class StepRows:
    """One step's batch rows (device tensors unless noted).

    query_start_loc: [B + 1] int32, the first query token of each row (packed tokens);
    seq_lens: [B] int32, each row's context length after this step (0: a padding row);
    slot_ids: [>= B] int32, each row's ring slot; slot_mapping: [>= T] int64, each token's
        paged-cache slot (-1: skip), or None where no head is paged;
    max_query_len: host int, the longest query span of a row (1: a decode batch).
    Tokens past ``query_start_loc[B]`` are padding (CUDA-graph batches): they write nothing
    and get a zero output.
    """

    query_start_loc: torch.Tensor
    seq_lens: torch.Tensor
    slot_ids: torch.Tensor
    slot_mapping: torch.Tensor | None = None
    max_query_len: int = 0

    @property
    def num_rows(self) -> int:
        return int(self.seq_lens.shape[0])


@dataclass(frozen=True)
class LayerPools:
    """One layer's two pools.

    key_cache, value_cache: [num_blocks, block_size, P, D] views of the paged cache (any
        strides, contiguous D); paged_src: [P] int32, the model KV head stored in paged head
        j (-1: a tensor-parallel padding head, stored as zeros). None: the layer pages no head.
    ring_k, ring_v: [(num_slots + 1) * (sink + recent), R, D]; ring_src: [R] int32, the model
        KV head of each ring head. None: the layer has no ring head.
    Position p of the request in slot s lives in ring row
    ``s * (sink + recent) + (p if p < sink else sink + (p - sink) % recent)``.
    k_scale, v_scale: [] or [1] float32 device tensors, the layer's k/v scales (vLLM's
        ``_k_scale`` / ``_v_scale``), given with an fp8 KV cache: the fp8 pools (paged views
        and rings, typed fp8) store ``clamp(x / scale)`` and read back ``x * scale``. None:
        the pools hold the compute dtype.
    """

    sink: int
    recent: int
    key_cache: torch.Tensor | None = None
    value_cache: torch.Tensor | None = None
    paged_src: torch.Tensor | None = None
    ring_k: torch.Tensor | None = None
    ring_v: torch.Tensor | None = None
    ring_src: torch.Tensor | None = None
    k_scale: torch.Tensor | None = None
    v_scale: torch.Tensor | None = None

    @property
    def window(self) -> int:
        return self.sink + self.recent

    @property
    def num_paged(self) -> int:
        return 0 if self.paged_src is None else int(self.paged_src.shape[0])

    @property
    def num_ring(self) -> int:
        return 0 if self.ring_src is None else int(self.ring_src.shape[0])

    def paged_only(self) -> "LayerPools":
        return dataclasses.replace(self, ring_k=None, ring_v=None, ring_src=None)

    def ring_only(self) -> "LayerPools":
        return dataclasses.replace(self, key_cache=None, value_cache=None, paged_src=None)
