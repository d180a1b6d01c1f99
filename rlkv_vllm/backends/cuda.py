"""RLKV on CUDA: selected as ``--attention-backend rlkv`` (0.32+) or ``CUSTOM``.

Full heads run vLLM's Triton unified attention (and its cache write) on the paged
subset; streaming heads run the PyTorch ring path on the GPU. This is the correct
reference path; fused kernels replace it where they measure faster.
Paged layout: vLLM's Triton layout, logical [num_blocks, H, block_size, 2 * head_size].
"""

from __future__ import annotations

from typing import ClassVar

from vllm.v1.attention.backend import AttentionCGSupport
from vllm.v1.attention.backends.triton_attn import (
    TritonAttentionBackend,
    TritonAttentionImpl,
    TritonAttentionMetadataBuilder,
)

from .common import RLKVBuilderMixin, RLKVImplMixin


class RLKVCudaImpl(RLKVImplMixin, TritonAttentionImpl):
    pass


class RLKVCudaMetadataBuilder(RLKVBuilderMixin, TritonAttentionMetadataBuilder):
    # the ring path builds its gather plan eagerly each step: no full CUDA graphs yet
    # (vLLM then captures piecewise graphs around attention)
    _cudagraph_support: ClassVar[AttentionCGSupport] = AttentionCGSupport.NEVER


class RLKVCudaBackend(TritonAttentionBackend):
    """Triton attention for the full heads plus RLKV's streaming pool."""

    supported_kv_cache_dtypes: ClassVar[list[str]] = ["auto"]

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
