"""RLKV on vLLM's CPU platform: registered over CPU_ATTN (the CPU platform ignores the
selected backend), stock unless the engine selected RLKV.

Full heads run vLLM's CPU kernels (``cpu_attn_reshape_and_cache`` and
``cpu_attention_with_kv_cache``) on the paged subset; streaming heads run the
PyTorch ring path. Paged layout: [num_blocks, H, block_size, 2 * head_size].
"""

from __future__ import annotations

from typing import Any

import torch
from vllm.v1.attention.backends.cpu_attn import (
    CPUAttentionBackend,
    CPUAttentionBackendImpl,
    CPUAttentionMetadataBuilder,
)

from .common import RLKVBuilderMixin, RLKVImplMixin


class RLKVCpuImpl(RLKVImplMixin, CPUAttentionBackendImpl):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._rlkv_setup(args, kwargs)


class RLKVCpuMetadataBuilder(RLKVBuilderMixin, CPUAttentionMetadataBuilder):
    def __init__(self, kv_cache_spec: Any, layer_names: list[str], vllm_config: Any, device: torch.device) -> None:
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        self._rlkv_find_runtime(kv_cache_spec, layer_names, vllm_config)
        if self.rlkv_runtime is not None:
            # the CPU scheduler metadata is sized by the heads the kernel really sees:
            # this group's paged slots and their query heads
            group = self.num_heads // vllm_config.model_config.get_num_kv_heads(vllm_config.parallel_config)
            self.num_kv_heads = kv_cache_spec.num_kv_heads
            self.num_heads = kv_cache_spec.num_kv_heads * group

    def build(self, common_prefix_len: int, common_attn_metadata: Any, fast_build: bool = False) -> Any:
        if self.rlkv_runtime is None:
            return super().build(common_prefix_len, common_attn_metadata, fast_build)
        full = None
        if self._rlkv_pages_heads():
            full = super().build(common_prefix_len, common_attn_metadata, fast_build)
        return self._rlkv_wrap(common_attn_metadata, full)


class RLKVCpuBackend(CPUAttentionBackend):
    """CPU_ATTN with RLKV inside; identical to stock when RLKV is not selected."""

    @staticmethod
    def get_impl_cls() -> type[RLKVCpuImpl]:
        return RLKVCpuImpl

    @staticmethod
    def get_builder_cls() -> type[RLKVCpuMetadataBuilder]:
        return RLKVCpuMetadataBuilder
