"""RLKV on vLLM's CPU platform: registered over CPU_ATTN (the CPU platform ignores the
selected backend), stock unless the engine selected RLKV.

Full heads run vLLM's CPU kernels (``cpu_attn_reshape_and_cache`` and
``cpu_attention_with_kv_cache``) on the paged subset; streaming heads run the
PyTorch ring path.
"""

from __future__ import annotations

from typing import Any

from .. import compat
from .common import RLKVBuilderMixin, RLKVImplMixin

CPUAttentionBackend, CPUAttentionBackendImpl, CPUAttentionMetadataBuilder = compat.stock_backend_classes("CPU_ATTN")


class RLKVCpuImpl(RLKVImplMixin, CPUAttentionBackendImpl):
    _rlkv_full_kernel = "cpu_attn"


class RLKVCpuMetadataBuilder(RLKVBuilderMixin, CPUAttentionMetadataBuilder):
    def _rlkv_adapt_stock_builder(self, kv_cache_spec: Any, vllm_config: Any) -> None:
        # the CPU scheduler metadata is sized by the heads the kernel really sees:
        # this group's paged slots and their query heads
        group = self.num_heads // vllm_config.model_config.get_num_kv_heads(vllm_config.parallel_config)
        self.num_kv_heads = kv_cache_spec.num_kv_heads
        self.num_heads = kv_cache_spec.num_kv_heads * group


class RLKVCpuBackend(CPUAttentionBackend):
    """CPU_ATTN with RLKV inside; identical to stock when RLKV is not selected."""

    @staticmethod
    def get_impl_cls() -> type[RLKVCpuImpl]:
        return RLKVCpuImpl

    @staticmethod
    def get_builder_cls() -> type[RLKVCpuMetadataBuilder]:
        return RLKVCpuMetadataBuilder
