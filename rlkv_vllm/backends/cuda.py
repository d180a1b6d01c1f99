"""RLKV on CUDA: selected as ``--attention-backend rlkv`` (0.32+) or ``CUSTOM``.

Per layer and step (serve mode, kernel "triton", the default here):
- decode batches (one query token per row, ``max_query_len == 1``): ``decode_step``, one
  launch that stores the full heads' keys/values in the paged cache, gathers their
  queries, runs the streaming heads' window attention into the output and stores their
  keys/values in the ring (Triton, or ``csrc/rlkv_decode.cu`` with decode_kernel "cuda");
- other batches: ``ring_attention`` (the Lambda window over ring + chunk), then
  ``fused_kv_write`` (paged write, query gather, ring write; after the ring reads);
- then vLLM's FlashAttention (fp16/bf16, where this build has it) or Triton unified
  attention (also float32) on the gathered full-head queries, scattered back.
Every index is computed on the device from persistent buffers, so the builder declares
the stock backend's CUDA-graph support (FULL graphs included). A graph captured for a
decode batch holds the decode kernel; vLLM replays it only for batches of the same kind
(uniform decode), and mixed batches are captured with their real max_query_len.
Gated mode: paged write, full attention into the output, ring attention mixing in
place with alpha, ring write.
Kernel "torch" keeps the PyTorch ring path (piecewise graphs only).
Paged layout: vLLM's, logical [num_blocks, H, block_size, 2 * head_size] in 0.26+
(older FlashAttention: [2, num_blocks, block_size, H, head_size]).

The stock base is picked per engine when vLLM resolves the backend path
(``RLKVCudaBackend`` is looked up through this module's ``__getattr__``): see
``select_backend``. One engine per process sees one choice (vLLM caches it by dtype).
"""

from __future__ import annotations

import os
from typing import Any, ClassVar

import torch

from .. import compat
from ..core.settings import parse_settings
from ..ops import cuda_decode
from ..ops.triton_stream import decode_step, fused_kv_write, ring_attention
from ..runtime import resolve_kernel
from .common import RLKVBuilderMixin, RLKVImplMixin, RLKVMetadata

AttentionCGSupport = compat.cudagraph_support()
TritonAttentionBackend, TritonAttentionImpl, TritonAttentionMetadataBuilder = compat.stock_backend_classes(
    "TRITON_ATTN")
try:
    FlashAttentionBackend, FlashAttentionImpl, FlashAttentionMetadataBuilder = compat.stock_backend_classes(
        "FLASH_ATTN")
except ImportError:  # a build without vllm_flash_attn: Triton only
    FlashAttentionBackend = None  # type: ignore[assignment,misc]


# gated mode: mix alpha inside the ring kernel (one pass) or in PyTorch after it; the fused
# mix disagreed with the oracle in the engine test on the H100 (not root-caused yet)
_FUSED_GATED_MIX = os.environ.get("RLKV_FUSED_GATED_MIX", "0") == "1"


class RLKVCudaImplMixin(RLKVImplMixin):
    """The Triton-kernel forward paths, over any stock impl that reads the paged cache."""

    _rlkv_writes_in_forward = True

    def _forward_serve(self, layer, q, k, v, kv_cache, md: RLKVMetadata, out) -> None:  # type: ignore[no-untyped-def]
        rt = self.rlkv_runtime
        if rt.kernel != "triton":
            return super()._forward_serve(layer, q, k, v, kv_cache, md, out)
        sink, recent = rt.settings.sink, rt.settings.recent
        rows = (md.query_start_loc, md.seq_lens, md.slot_ids)
        if self._n_full:
            kc, vc = compat.paged_key_value(kv_cache, self.head_size)
            paged = (kc, vc, md.slot_mapping, self._paged_src)
        else:
            paged = (None, None, None, None)
        ring = (self._ring_k, self._ring_v, self._ring_src) if self._n_stream else (None, None, None)
        # the stock kernel's input: the full heads' queries, gathered by our write kernel
        qf = None
        if self._n_full and not self._all_full:
            qf = q.new_empty(q.shape[0], self._paged_slots * self._group, q.shape[-1])
        if md.max_query_len == 1:
            step = cuda_decode.decode_step if rt.decode_kernel == "cuda" else decode_step
            step(q, k, v, out, *paged, qf, *ring, *rows, sink, recent, self.scale)
        else:
            if self._n_stream:
                ring_attention(q, k, v, out, *ring, *rows, sink, recent, self.scale)
            fused_kv_write(k, v, *paged, *ring, *rows, sink, recent, q=q, q_full=qf)
        if self._n_full:
            self._forward_full_heads(layer, q if qf is None else qf, k, v, kv_cache, md, out)

    def _forward_full_heads(self, layer, qf, k, v, kv_cache, md, out) -> None:  # type: ignore[no-untyped-def]
        """The stock impl on the full heads, over the paged cache our write kernel filled.

        qf: all of q for a layer without streaming heads (q and out pass untouched), else
        the gathered [T, P * G, D] full-head queries; their output is scattered back.
        The stock decoder kernels read keys and values from the paged cache alone (their
        key/value arguments serve encoder attention and context parallelism, both refused
        with RLKV), so k and v are passed as shape-correct views.
        """
        n = self._paged_slots
        if self._all_full:
            self._inner.forward(layer, qf, k, v, kv_cache, md.full, out)
            return
        of = torch.empty_like(qf)
        self._inner.forward(layer, qf, k[:, :n], v[:, :n], kv_cache, md.full, of)
        out[:, self._full_q] = of[:, : self._n_full * self._group]

    def _forward_gated(self, layer, q, k, v, kv_cache, md: RLKVMetadata, out) -> None:  # type: ignore[no-untyped-def]
        rt = self.rlkv_runtime
        if rt.kernel != "triton":
            return super()._forward_gated(layer, q, k, v, kv_cache, md, out)
        sink, recent = rt.settings.sink, rt.settings.recent
        rows = (md.query_start_loc, md.seq_lens, md.slot_ids)
        kc, vc = compat.paged_key_value(kv_cache, self.head_size)
        fused_kv_write(k, v, kc, vc, md.slot_mapping, self._paged_src, None, None, None, *rows, sink, recent)
        alpha = rt.gates[self._rlkv_layer]
        if _FUSED_GATED_MIX:
            self._inner.forward(layer, q, k, v, kv_cache, md.full, out)
            ring_attention(q, k, v, out, self._ring_k, self._ring_v, self._ring_src, *rows, sink, recent,
                           self.scale, alpha=alpha)
        else:
            t, h, g, d = q.shape[0], self.num_kv_heads, self._group, q.shape[-1]
            stream = torch.empty(t, h * g, d, dtype=torch.float32, device=out.device)
            ring_attention(q, k, v, stream, self._ring_k, self._ring_v, self._ring_src, *rows, sink, recent,
                           self.scale)
            full = torch.empty_like(out)
            self._inner.forward(layer, q, k, v, kv_cache, md.full, full)
            a = alpha.view(1, h, 1, 1)
            mixed = a * full.view(t, h, g, d).float() + (1.0 - a) * stream.view(t, h, g, d)
            out.copy_(mixed.view(t, h * g, d))
        fused_kv_write(k, v, None, None, None, None, self._ring_k, self._ring_v, self._ring_src,
                       *rows, sink, recent)


class RLKVCudaBuilderMixin(RLKVBuilderMixin):
    @classmethod
    def get_cudagraph_support(cls, vllm_config: Any, kv_cache_spec: Any) -> AttentionCGSupport:
        # the Triton kernels index from persistent buffers: the stock backend's support
        # holds for them; the PyTorch path builds its gather plan eagerly each step
        if _rlkv_setting(vllm_config, "kernel") == "triton":
            return super().get_cudagraph_support(vllm_config, kv_cache_spec)
        return AttentionCGSupport.NEVER


def _rlkv_setting(vllm_config: Any, key: str) -> str:
    value = getattr(parse_settings(compat.rlkv_section(vllm_config)), key)
    if key == "kernel":
        return resolve_kernel(value, torch.device(vllm_config.device_config.device))
    return value


class RLKVCudaBackendMixin:
    """What every RLKV CUDA backend declares, whatever its stock base."""

    supported_kv_cache_dtypes: ClassVar[list[str]] = ["auto"]
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
    pass


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
        pass

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
    choice = _rlkv_setting(vllm_config, "full_kernel")
    if choice == "triton":
        return RLKVTritonBackend
    reason = flash_attn_unavailable_reason(vllm_config)
    if reason is None:
        return RLKVFlashBackend
    if choice == "flash_attn":
        raise RuntimeError(f"rlkv.full_kernel = 'flash_attn' cannot run: {reason}")
    return RLKVTritonBackend


def __getattr__(name: str) -> Any:
    # vLLM resolves the registered path "rlkv_vllm.backends.cuda.RLKVCudaBackend" while the
    # model is built, with the engine's config current
    if name == "RLKVCudaBackend":
        return select_backend(compat.current_vllm_config())
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
