"""RLKV on CUDA: selected as ``--attention-backend rlkv`` (0.32+) or ``CUSTOM``.

Per layer and step (serve mode, kernel "triton", the default here):
1. ``ring_attention``: the streaming heads' Lambda-window attention, straight from the
   step's q/k/v and the ring into the output (no gathers);
2. ``fused_kv_write``: full heads into the paged cache and streaming heads into the
   ring, one launch, after (1) read the ring;
3. vLLM's Triton unified attention for the full heads, on their gathered subset.
Every index is computed on the device from persistent buffers, so the builder declares
the stock Triton backend's CUDA-graph support (FULL graphs included).
Gated mode: paged write, full attention into the output, ring attention mixing in
place with alpha, ring write.
Kernel "torch" keeps the PyTorch ring path (piecewise graphs only).
Paged layout: vLLM's Triton layout, logical [num_blocks, H, block_size, 2 * head_size].
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from vllm.v1.attention.backend import AttentionCGSupport
from vllm.v1.attention.backends.triton_attn import (
    TritonAttentionBackend,
    TritonAttentionImpl,
    TritonAttentionMetadataBuilder,
)

from ..ops.triton_stream import fused_kv_write, ring_attention
from ..runtime import resolve_kernel
from .common import RLKVBuilderMixin, RLKVImplMixin, RLKVMetadata


def paged_key_value(kv_cache: torch.Tensor, head_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[num_blocks, block_size, H, D] key and value views of a Triton-layout cache."""
    key_cache, value_cache = kv_cache.transpose(1, 2).split(head_size, dim=-1)
    return key_cache, value_cache


class RLKVCudaImpl(RLKVImplMixin, TritonAttentionImpl):
    _rlkv_writes_in_forward = True

    def _forward_serve(self, layer, q, k, v, kv_cache, md: RLKVMetadata, out) -> None:  # type: ignore[no-untyped-def]
        rt = self.rlkv_runtime
        if rt.kernel != "triton":
            return super()._forward_serve(layer, q, k, v, kv_cache, md, out)
        sink, recent = rt.settings.sink, rt.settings.recent
        rows = (md.query_start_loc, md.seq_lens, md.slot_ids)
        if self._n_stream:
            ring_attention(q, k, v, out, self._ring_k, self._ring_v, self._ring_src, *rows,
                           sink, recent, self.scale)
        kc, vc = paged_key_value(kv_cache, self.head_size) if self._n_full else (None, None)
        fused_kv_write(
            k, v, kc, vc, md.slot_mapping, self._paged_src if self._n_full else None,
            self._ring_k, self._ring_v, self._ring_src if self._n_stream else None, *rows, sink, recent,
        )
        if self._n_full:
            self._forward_full(layer, q, k, v, kv_cache, md, out)

    def _forward_gated(self, layer, q, k, v, kv_cache, md: RLKVMetadata, out) -> None:  # type: ignore[no-untyped-def]
        rt = self.rlkv_runtime
        if rt.kernel != "triton":
            return super()._forward_gated(layer, q, k, v, kv_cache, md, out)
        sink, recent = rt.settings.sink, rt.settings.recent
        rows = (md.query_start_loc, md.seq_lens, md.slot_ids)
        kc, vc = paged_key_value(kv_cache, self.head_size)
        fused_kv_write(k, v, kc, vc, md.slot_mapping, self._paged_src, None, None, None, *rows, sink, recent)
        self._inner.forward(layer, q, k, v, kv_cache, md.full, out)
        ring_attention(q, k, v, out, self._ring_k, self._ring_v, self._ring_src, *rows, sink, recent,
                       self.scale, alpha=rt.gates[self._rlkv_layer])
        fused_kv_write(k, v, None, None, None, None, self._ring_k, self._ring_v, self._ring_src,
                       *rows, sink, recent)


class RLKVCudaMetadataBuilder(RLKVBuilderMixin, TritonAttentionMetadataBuilder):
    @classmethod
    def get_cudagraph_support(cls, vllm_config: Any, kv_cache_spec: Any) -> AttentionCGSupport:
        # the Triton kernels index from persistent buffers: the stock backend's support
        # holds for them; the PyTorch path builds its gather plan eagerly each step
        raw = ((vllm_config.additional_config or {}).get("rlkv") or {}).get("kernel", "auto")
        device = torch.device(vllm_config.device_config.device)
        if resolve_kernel(raw, device) == "triton":
            return super().get_cudagraph_support(vllm_config, kv_cache_spec)
        return AttentionCGSupport.NEVER


class RLKVCudaBackend(TritonAttentionBackend):
    """Triton attention for the full heads plus RLKV's streaming pool."""

    supported_kv_cache_dtypes: ClassVar[list[str]] = ["auto"]
    # RLKV stores keys inside forward, after the ring reads (see RLKVCudaImpl)
    forward_includes_kv_cache_update: bool = True

    @staticmethod
    def get_name() -> str:
        # a member that exists in every process: new names only exist once the plugin loaded
        return "CUSTOM"

    @staticmethod
    def get_impl_cls() -> type[RLKVCudaImpl]:
        return RLKVCudaImpl

    @staticmethod
    def get_builder_cls() -> type[RLKVCudaMetadataBuilder]:
        return RLKVCudaMetadataBuilder

    @classmethod
    def supports_sliding_window(cls) -> bool:
        return False

    @classmethod
    def supports_sink(cls) -> bool:
        return False

    @classmethod
    def supports_mm_prefix(cls) -> bool:
        return False

    @classmethod
    def supports_alibi_sqrt(cls) -> bool:
        return False

    @classmethod
    def supports_batch_invariance(cls) -> bool:
        return False
