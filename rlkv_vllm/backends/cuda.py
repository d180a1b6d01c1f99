"""RLKV on CUDA: selected as ``--attention-backend rlkv`` (0.32+) or ``CUSTOM``.

The forward is ``backends.common``'s; the streaming pool it binds to is ``ops.pools``'
TritonPool by default here (``rlkv.kernel = torch``: TorchPool, piecewise graphs only).
This module picks the stock base for the full heads: vLLM's FlashAttention (fp16/bf16,
where this build and device have it, and an fp8/fp8_e4m3 KV cache with FA3 on SM90, with the
queries quantised by vLLM's layer as for stock; ``rlkv.full_kernel`` forces a choice) or Triton
unified attention (also float32, fp8_e5m2, fp8 without FA3), and declares what the base needs.

Every index the Triton pool uses is computed on the device from persistent buffers, so
the builder declares the stock backend's CUDA-graph support (FULL graphs included). A
graph captured for a decode batch holds the decode kernel; vLLM replays it only for
batches of the same kind (uniform decode), and mixed batches are captured with their real
max_query_len. Paged layout: see ``compat.paged_key_value``.

The stock base is picked per engine when vLLM resolves the backend path
(``RLKVCudaBackend`` is looked up through this module's ``__getattr__``): see
``select_backend``. One engine per process sees one choice (vLLM caches it by dtype).
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from .. import compat
from ..core.settings import RLKVConfigError, parse_settings
from ..ops.pools import pool_class
from .common import RLKVBuilderMixin, RLKVImplMixin

AttentionCGSupport = compat.cudagraph_support()
TritonAttentionBackend, TritonAttentionImpl, TritonAttentionMetadataBuilder = compat.stock_backend_classes(
    "TRITON_ATTN")
try:
    FlashAttentionBackend, FlashAttentionImpl, FlashAttentionMetadataBuilder = compat.stock_backend_classes(
        "FLASH_ATTN")
except ImportError:  # a build without vllm_flash_attn: Triton only
    FlashAttentionBackend = None  # type: ignore[assignment,misc]


class RLKVCudaImplMixin(RLKVImplMixin):
    # the backend declares forward_includes_kv_cache_update: forward stores keys itself,
    # after the ring reads (see RLKVCudaBackendMixin)
    _rlkv_writes_in_forward = True


class RLKVCudaBuilderMixin(RLKVBuilderMixin):
    @classmethod
    def get_cudagraph_support(cls, vllm_config: Any, kv_cache_spec: Any) -> AttentionCGSupport:
        # the Triton pool indexes from persistent buffers: the stock backend's support holds
        # for it; the PyTorch pool builds its gather plan eagerly each step
        settings = parse_settings(compat.rlkv_section(vllm_config))
        if pool_class(settings.kernel, torch.device(vllm_config.device_config.device)).cuda_graphs:
            return super().get_cudagraph_support(vllm_config, kv_cache_spec)
        return AttentionCGSupport.NEVER


class RLKVCudaBackendMixin:
    """What every RLKV CUDA backend declares, whatever its stock base."""

    # fp8: the paged cache and the ring hold fp8 with the layer's scales (full heads on FA3 for e4m3 on
    # SM90, else TRITON_ATTN)
    supported_kv_cache_dtypes: ClassVar[list[str]] = ["auto", "fp8", "fp8_e4m3", "fp8_e5m2"]
    # RLKV stores keys inside forward, after the ring reads (see RLKVCudaImplMixin)
    forward_includes_kv_cache_update: bool = True

    @staticmethod
    def get_name() -> str:
        # a member that exists in every process: new names only exist once the plugin loaded
        return "CUSTOM"

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


# ------------------------------------------------------------- Triton base (any dtype)
class RLKVTritonImpl(RLKVCudaImplMixin, TritonAttentionImpl):
    # TRITON_ATTN reads an fp8 cache with model-dtype queries: no query quantisation
    _rlkv_full_kernel = "triton"


class RLKVTritonBuilder(RLKVCudaBuilderMixin, TritonAttentionMetadataBuilder):
    pass


class RLKVTritonBackend(RLKVCudaBackendMixin, TritonAttentionBackend):
    """vLLM's Triton attention for the full heads plus RLKV's streaming pool."""

    @staticmethod
    def get_impl_cls() -> type[RLKVTritonImpl]:
        return RLKVTritonImpl

    @staticmethod
    def get_builder_cls() -> type[RLKVTritonBuilder]:
        return RLKVTritonBuilder


# ------------------------------------------------ FlashAttention base (fp16 / bf16)
if FlashAttentionBackend is not None:

    class RLKVFlashImpl(RLKVCudaImplMixin, FlashAttentionImpl):
        # FA3's fp8 kernel takes fp8 queries (q_descale = the layer's _q_scale): vLLM's layer quantises
        # them where the stock impl says so; the ring attends a dequantised copy
        _rlkv_fp8_query_for_full_heads = True
        _rlkv_full_kernel = "flash_attn"

    class RLKVFlashBuilder(RLKVCudaBuilderMixin, FlashAttentionMetadataBuilder):
        def _rlkv_adapt_stock_builder(self, kv_cache_spec: Any, vllm_config: Any) -> None:
            # FA3's ahead-of-time scheduler is sized by the heads the kernel really sees
            group = self.num_heads_q // self.num_heads_kv
            self.num_heads_kv = kv_cache_spec.num_kv_heads
            self.num_heads_q = kv_cache_spec.num_kv_heads * group

    class RLKVFlashBackend(RLKVCudaBackendMixin, FlashAttentionBackend):
        """vLLM's FlashAttention for the full heads plus RLKV's streaming pool."""

        @staticmethod
        def get_impl_cls() -> type[RLKVFlashImpl]:
            return RLKVFlashImpl

        @staticmethod
        def get_builder_cls() -> type[RLKVFlashBuilder]:
            return RLKVFlashBuilder


def flash_attn_unavailable_reason(vllm_config: Any) -> str | None:
    """Why the FlashAttention base cannot serve this engine (None if it can)."""
    if FlashAttentionBackend is None:
        return "this vLLM build has no vllm_flash_attn"
    import torch as _t

    dtype = vllm_config.model_config.dtype
    if dtype not in (_t.float16, _t.bfloat16):
        return f"dtype {dtype} (FlashAttention takes float16/bfloat16)"
    kv = compat.kv_cache_dtype_name(vllm_config)
    if kv.startswith("fp8") and not FlashAttentionBackend.supports_kv_cache_dtype(kv):
        # FA3 on SM90 takes e4m3 (fp8, fp8_e4m3) only; TRITON_ATTN reads the others
        return f"kv_cache_dtype {kv} (FlashAttention here takes fp8 only as fp8/fp8_e4m3 with FA3 on SM90)"
    try:
        if compat.flash_attn_version(vllm_config.model_config.get_head_size()) is None:
            return "no FlashAttention version supports this device/head size"
    except Exception as e:  # noqa: BLE001 - a probe: any failure means "not usable"
        return f"FlashAttention probe failed: {e}"
    return None


def select_backend(vllm_config: Any) -> type:
    """The RLKV backend class for this engine: FlashAttention where usable, else Triton."""
    if getattr(vllm_config, "model_config", None) is None:
        return RLKVTritonBackend  # no engine config yet (a front-end probe)
    choice = parse_settings(compat.rlkv_section(vllm_config)).full_kernel
    if choice == "triton":
        return RLKVTritonBackend
    reason = flash_attn_unavailable_reason(vllm_config)
    if reason is None:
        return RLKVFlashBackend
    if choice == "flash_attn":
        raise RLKVConfigError(f"rlkv.full_kernel = 'flash_attn' is not allowed here: {reason}; "
                              "allowed: auto, triton")
    return RLKVTritonBackend


def __getattr__(name: str) -> Any:
    # vLLM resolves the registered path "rlkv_vllm.backends.cuda.RLKVCudaBackend" while the
    # model is built, with the engine's config current
    if name == "RLKVCudaBackend":
        return select_backend(compat.current_vllm_config())
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
