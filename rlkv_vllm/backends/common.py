"""The RLKV attention impl and metadata builder, mixed into a platform's stock classes.

Per layer and step, top to bottom (``RLKVImplMixin.forward``):

- serve mode: the bound streaming pool (``ops.pools``, chosen once per engine) attends the
  streaming heads over their ring into the output and stores what the step adds (ring
  rows; on the Triton path also the full heads' paged KV, and their queries gathered for
  the stock kernel); then the platform's stock impl runs on the full heads over a paged
  cache that holds only those heads (vLLM's block manager sees the smaller pages), and
  their output is scattered back.
- gated mode (training rollouts): every head is paged and full, and every head also has
  a ring for its streaming branch; ``alpha * full + (1 - alpha) * streaming`` per KV head,
  alpha from a persistent buffer.

The platform classes (``backends.cpu``, ``backends.cuda``) pick the stock base and say
what it needs; with RLKV off they behave exactly as stock.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch

from .. import compat
from ..core.plan import is_fp8
from ..core.settings import RLKVConfigError
from ..ops.pools import FullHeadInputs, HeadSplit, StreamingPool, dequantize_query, gather_heads, head_split
from ..ops.views import LayerPools, StepRows
from ..runtime import RLKVRuntime, runtime_for


@dataclass
class RLKVMetadata:
    """Per-step metadata for one attention group.

    full: the stock builder's metadata for the paged (full) heads (None for the group of
        layers with no full head).
    rows: the step's rows (vLLM's persistent per-step buffers plus our ring-slot buffer: their
        addresses never change, so CUDA graphs replay them).
    step_plan: the pool's per-step plan, shared by every layer (None for the Triton pool).
    """

    full: Any
    num_actual_tokens: int
    rows: StepRows
    step_plan: Any


class RLKVImplMixin:
    """Mixed into a subclass of the platform's stock AttentionImpl."""

    rlkv_runtime: RLKVRuntime | None = None
    # the stock base's fp8 kernel takes fp8 queries (FA3): keep vLLM's query quantisation on
    _rlkv_fp8_query_for_full_heads: bool = False
    # what runs the full heads, in words (runtime facts, tests)
    _rlkv_full_kernel: str = "stock"
    # True where the backend declares forward_includes_kv_cache_update: vLLM then never
    # calls do_kv_cache_update, and forward stores keys itself (after the ring reads)
    _rlkv_writes_in_forward: bool = False

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._rlkv_setup(args, kwargs)

    # ------------------------------------------------------------------ set-up
    def _rlkv_setup(self, args: tuple, kwargs: dict) -> None:
        """Decide whether this layer runs RLKV, from the stock constructor arguments."""
        cfg = compat.current_vllm_config()
        self.rlkv_runtime = None
        self._rlkv_layer: int | None = None
        if not compat.config_selects_rlkv(cfg):
            return
        given = compat.stock_impl_arguments(self._rlkv_stock_impl_cls(), args, kwargs)
        if given.get("attn_type", compat.decoder_attention_type()) != compat.decoder_attention_type():
            return  # encoder / cross attention keeps the stock path
        problems = []
        if given.get("alibi_slopes") is not None:
            problems.append("ALiBi")
        if given.get("sliding_window") is not None:
            problems.append("sliding-window attention")
        if given.get("logits_soft_cap"):
            problems.append("logit soft-capping")
        if given.get("sinks") is not None:
            problems.append("learned attention sinks")
        if given.get("kv_sharing_target_layer_name"):
            problems.append("cross-layer KV sharing")
        if problems:
            raise RLKVConfigError(
                f"model attention uses {', '.join(problems)}, which RLKV does not support; "
                "allowed: plain causal (GQA/MHA) attention"
            )
        self._rlkv_stock_kwargs = given
        self.rlkv_runtime = runtime_for(cfg)
        self.rlkv_runtime.ensure_ring()
        # With an fp8 KV cache vLLM's layer quantises the queries for an impl that says it takes fp8
        # queries (``supports_quant_query_input``, set by the stock constructor above). A base whose fp8
        # kernel needs them (FA3) keeps the stock answer: its full heads get the fp8 queries, the ring a
        # dequantised copy (``forward``). Every other base gets model-dtype queries.
        self.supports_quant_query_input = self._rlkv_takes_fp8_queries(
            bool(getattr(self, "supports_quant_query_input", False)),
            given.get("kv_cache_dtype", getattr(self, "kv_cache_dtype", None)))

    @classmethod
    def _rlkv_takes_fp8_queries(cls, stock_says: bool, kv_cache_dtype: str | None) -> bool:
        """``supports_quant_query_input`` for an RLKV layer: the stock answer where the base's fp8 kernel
        needs fp8 queries and vLLM's layer will quantise them for this cache (fp8/fp8_e4m3), else False."""
        return cls._rlkv_fp8_query_for_full_heads and stock_says and compat.query_quant_applies(kv_cache_dtype)

    def _make_inner_impl(self, num_heads: int, num_kv_heads: int) -> Any:
        """A stock impl for a subset of heads (built inside the engine's config context)."""
        kw = dict(self._rlkv_stock_kwargs)
        kw.update(num_heads=num_heads, num_kv_heads=num_kv_heads)
        stock_cls = self._rlkv_stock_impl_cls()
        with compat.vllm_config_context(self.rlkv_runtime.vllm_config):
            return stock_cls(**kw)

    @classmethod
    def _rlkv_stock_impl_cls(cls) -> type:
        for base in cls.__mro__[1:]:
            if base is not RLKVImplMixin and not issubclass(base, RLKVImplMixin) and hasattr(base, "forward"):
                return base
        raise TypeError("no stock impl base class")

    def rlkv_bind(self, layer: Any) -> None:
        """Learn this impl's layer (from its name): its head split, pools and stock impl."""
        if self._rlkv_layer is not None or self.rlkv_runtime is None:
            return
        rt = self.rlkv_runtime
        idx = compat.extract_layer_index(layer.layer_name)
        group = self.num_heads // self.num_kv_heads
        self._split: HeadSplit = head_split(rt.plan.layers[idx], self.num_kv_heads, group, rt.serve, rt.device,
                                            permuted=self._rlkv_permuted)
        self._pool: StreamingPool = rt.pool
        slots = self._split.paged_slots
        self._inner = self._make_inner_impl(slots * group, slots) if self._split.n_full else None
        rt.full_kernel = self._rlkv_full_kernel
        rt.fp8_queries = bool(self.supports_quant_query_input)
        ring = rt.ensure_ring()
        self._ring_k, self._ring_v = ring.k[idx], ring.v[idx]
        self._pools: tuple[Any, LayerPools] | None = None
        self._rlkv_layer = idx

    # ------------------------------------------------------- head permutation
    _rlkv_permuted: bool = False

    def rlkv_head_order(self, layer: Any) -> list[int] | None:
        """Serve mode with ``rlkv.permute_heads`` (``runtime.permute_heads``): this layer's KV-head
        order on this rank, full heads first (``core.head_order.head_order`` of its local mask
        row); None: the layer keeps the model's order (RLKV off, gated mode, the setting off,
        auto with sleep mode)."""
        rt = self.rlkv_runtime
        if rt is None or not rt.permute_heads:
            return None
        heads = rt.plan.layers[compat.extract_layer_index(layer.layer_name)]
        return list(heads.full) + list(heads.stream)

    def rlkv_heads_permuted(self, layer: Any) -> None:
        """The weight hook (``compat``) put this layer's heads in ``rlkv_head_order``: its full
        heads are now a contiguous prefix, served by slices instead of gathers."""
        self._rlkv_permuted = True
        if self._rlkv_layer is not None:  # bound before the hook: rebuild the split
            rt = self.rlkv_runtime
            self._split = head_split(rt.plan.layers[self._rlkv_layer], self.num_kv_heads, self._split.group,
                                     rt.serve, rt.device, permuted=True)
            self._pools = None

    def rlkv_adjust_kv_spec(self, layer: Any, spec: Any) -> Any:
        """Called through the compat wrapper of Attention.get_kv_cache_spec."""
        if self.rlkv_runtime is None:
            return spec
        self.rlkv_bind(layer)
        if not self.rlkv_runtime.serve:
            return spec
        return compat.reduce_kv_spec(spec, self._split.paged_slots)

    def _layer_pools(self, layer: Any, kv_cache: torch.Tensor) -> LayerPools:
        """This layer's pool views (built once: the cache tensor never moves; the fp8 scales
        are the layer's own tensors, which vLLM updates in place)."""
        if self._pools is not None and self._pools[0] is kv_cache:
            return self._pools[1]
        rt = self.rlkv_runtime
        s = rt.settings
        fp8 = is_fp8(rt.plan.cache_dtype)
        paged: dict[str, Any] = {}
        if self._pool.writes_paged and self._split.n_full:
            kc, vc = compat.paged_key_value(kv_cache, self.head_size)
            if fp8:  # vLLM stores fp8 pages as bytes; its readers view them as the platform's fp8
                kc, vc = kc.view(compat.paged_fp8_dtype()), vc.view(compat.paged_fp8_dtype())
            paged = dict(key_cache=kc, value_cache=vc, paged_src=self._split.paged_src)
        ring: dict[str, Any] = {}
        if self._ring_k is not None:
            ring = dict(ring_k=self._ring_k, ring_v=self._ring_v, ring_src=self._split.ring_src)
        scales: dict[str, Any] = {}
        if fp8:
            k_scale, v_scale = compat.layer_kv_scales(layer)
            scales = dict(k_scale=k_scale, v_scale=v_scale)
        pools = LayerPools(sink=s.sink, recent=s.recent, **paged, **ring, **scales)
        self._pools = (kv_cache, pools)
        return pools

    # ---------------------------------------------------------------- forward
    def do_kv_cache_update(self, layer, key, value, kv_cache, slot_mapping):  # type: ignore[no-untyped-def]
        if self.rlkv_runtime is None:
            return super().do_kv_cache_update(layer, key, value, kv_cache, slot_mapping)
        return self._write_paged(layer, key, value, kv_cache, slot_mapping)

    def _write_paged(self, layer, key, value, kv_cache, slot_mapping):  # type: ignore[no-untyped-def]
        """Store the full heads through the stock impl (on their gathered subset)."""
        self.rlkv_bind(layer)
        if self._inner is None:
            return None
        split = self._split
        return self._inner.do_kv_cache_update(
            layer, gather_heads(key, split.full_kv, split), gather_heads(value, split.full_kv, split),
            kv_cache, slot_mapping,
        )

    def fused_output_quant_supported(self, quant_key: Any) -> bool:
        # the output is assembled from two kernels' results: never let vLLM fuse a quantization
        if self.rlkv_runtime is not None:
            return False
        return super().fused_output_quant_supported(quant_key)

    def forward(self, layer, query, key, value, kv_cache, attn_metadata, output, *args, **kwargs):  # type: ignore[no-untyped-def]
        if self.rlkv_runtime is None:
            if self._rlkv_writes_in_forward and attn_metadata is not None and key is not None:
                super().do_kv_cache_update(layer, key, value, kv_cache, attn_metadata.slot_mapping)
            return super().forward(layer, query, key, value, kv_cache, attn_metadata, output, *args, **kwargs)
        if attn_metadata is None:
            return output  # profiling warm-up
        for extra in ("output_scale", "output_block_scale"):
            if kwargs.get(extra) is not None:  # fused_output_quant_supported says no: a bug if reached
                raise RuntimeError(f"RLKV got a fused output quantization ({extra}) it declared unsupported")
        self.rlkv_bind(layer)
        md: RLKVMetadata = attn_metadata
        n = md.num_actual_tokens
        q, k, v, out = query[:n], key[:n], value[:n], output[:n]
        q_fp8 = q_scale = None
        if q.dtype != out.dtype:  # vLLM quantised the queries (supports_quant_query_input): FA3 fp8
            q_scale = compat.query_scale(layer)
            if not (self.rlkv_runtime.serve and self._pool.takes_fp8_queries(md.rows, q_scale,
                                                                            self._split.num_kv_heads)):
                # the ring attends in the model dtype: a copy, the fp8 ones kept for FA3
                q_fp8, q, q_scale = q, dequantize_query(q, q_scale, out.dtype), None
        if self._rlkv_writes_in_forward and not self._pool.writes_paged:
            # vLLM will not call do_kv_cache_update, and this pool does not store paged heads
            self._write_paged(layer, k, v, kv_cache, md.rows.slot_mapping[:n])
        pools = self._layer_pools(layer, kv_cache)
        if self.rlkv_runtime.serve:
            # q_scale set: the pool takes the fp8 queries as they are (its full inputs hold them)
            full_inputs = self._pool.serve(self._split, q, k, v, out, md.rows, pools, md.step_plan, self.scale,
                                           q_scale=q_scale)
            if full_inputs is not None:
                if q_fp8 is not None:
                    # FA3 takes the fp8 queries themselves (the pool sliced or gathered its own from the copy)
                    q_full = gather_heads(q_fp8, self._split.full_q, self._split)
                    full_inputs = dataclasses.replace(full_inputs, q=q_full)
                self._full_attention(layer, full_inputs, kv_cache, md, out)
        else:
            self._gated(layer, q, k, v, kv_cache, md, pools, out, q_fp8)
        return output

    def _full_attention(self, layer, full: FullHeadInputs, kv_cache, md: RLKVMetadata, out) -> None:  # type: ignore[no-untyped-def]
        """The stock impl on the paged heads; their output scattered into ``out``."""
        split = self._split
        if split.all_full:
            self._inner.forward(layer, full.q, full.k, full.v, kv_cache, md.full, out)
            return
        of = torch.empty(full.q.shape, dtype=out.dtype, device=out.device)  # fp8 queries: the output is not
        self._inner.forward(layer, full.q, full.k, full.v, kv_cache, md.full, of)
        if split.contiguous:  # full heads first: a slice
            out[:, : split.n_full * split.group] = of[:, : split.n_full * split.group]
        else:
            out[:, split.full_q] = of[:, : split.n_full * split.group]

    def _gated(self, layer, q, k, v, kv_cache, md: RLKVMetadata, pools: LayerPools, out, q_fp8=None) -> None:  # type: ignore[no-untyped-def]
        """alpha * full + (1 - alpha) * streaming, per KV head, mixed in float32."""
        split = self._split
        t, h, g, d = q.shape[0], split.num_kv_heads, split.group, q.shape[-1]
        stream = self._pool.gated_stream(split, q, k, v, md.rows, pools, md.step_plan, self.scale)
        full = torch.empty_like(out)
        self._inner.forward(layer, q if q_fp8 is None else q_fp8, k, v, kv_cache, md.full, full)
        alpha = self.rlkv_runtime.gates[self._rlkv_layer].view(1, h, 1, 1)
        mixed = alpha * full.view(t, h, g, d).float() + (1.0 - alpha) * stream.view(t, h, g, d)
        out.copy_(mixed.view(t, h * g, d).to(out.dtype))


class RLKVBuilderMixin:
    """Mixed into a subclass of the platform's stock metadata builder."""

    rlkv_runtime: RLKVRuntime | None = None

    def __init__(self, kv_cache_spec: Any, layer_names: list[str], vllm_config: Any, device: torch.device) -> None:
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        self._rlkv_find_runtime(kv_cache_spec, layer_names, vllm_config)
        if self.rlkv_runtime is not None:
            self._rlkv_adapt_stock_builder(kv_cache_spec, vllm_config)

    def _rlkv_adapt_stock_builder(self, kv_cache_spec: Any, vllm_config: Any) -> None:
        """Platform hook: tell the stock builder the head counts its kernel really sees."""

    # True while a stock builder method runs: its own calls of self.build must build stock metadata
    _rlkv_stock_call: bool = False

    def build(self, common_prefix_len: int, common_attn_metadata: Any, fast_build: bool = False) -> Any:
        if self.rlkv_runtime is None or self._rlkv_stock_call:
            return super().build(common_prefix_len, common_attn_metadata, fast_build)
        full = None
        if self._rlkv_pages_heads():
            full = super().build(common_prefix_len, common_attn_metadata, fast_build)
        return self._rlkv_wrap(common_attn_metadata, full)

    def build_for_cudagraph_capture(self, common_attn_metadata: Any) -> Any:
        """The stock builders adjust their own metadata for capture (TRITON_ATTN sets seq_lens to
        1 after self.build): let them, on stock metadata, then wrap it."""
        if self.rlkv_runtime is None:
            return super().build_for_cudagraph_capture(common_attn_metadata)
        full = None
        if self._rlkv_pages_heads():
            self._rlkv_stock_call = True
            try:
                full = super().build_for_cudagraph_capture(common_attn_metadata)
            finally:
                self._rlkv_stock_call = False
        return self._rlkv_wrap(common_attn_metadata, full)

    def update_block_table(self, metadata: Any, blk_table: torch.Tensor, slot_mapping: torch.Tensor) -> Any:
        """vLLM reuses one group's metadata for another group of the same spec with its own block
        table (where the stock builder supports it): update the stock part and our rows."""
        if self.rlkv_runtime is None or not isinstance(metadata, RLKVMetadata):
            return super().update_block_table(metadata, blk_table, slot_mapping)
        full = None if metadata.full is None else super().update_block_table(metadata.full, blk_table, slot_mapping)
        return dataclasses.replace(metadata, full=full, rows=dataclasses.replace(metadata.rows, slot_mapping=slot_mapping))

    def _rlkv_find_runtime(self, kv_cache_spec: Any, layer_names: list[str], vllm_config: Any) -> None:
        layers = compat.attention_layers(vllm_config, layer_names)
        runtimes = {id(l.impl.rlkv_runtime): l.impl.rlkv_runtime for l in layers.values()
                    if getattr(l.impl, "rlkv_runtime", None) is not None}
        self.rlkv_runtime = next(iter(runtimes.values()), None)
        self._rlkv_spec = kv_cache_spec

    def _rlkv_pages_heads(self) -> bool:
        """False for the group of layers with no full head (their placeholder spec)."""
        return self._rlkv_spec.head_size == self.rlkv_runtime.plan.shape.head_size

    def _rlkv_wrap(self, common_attn_metadata: Any, full_md: Any) -> RLKVMetadata:
        rt = self.rlkv_runtime
        cm = common_attn_metadata
        n_reqs = cm.num_reqs

        def step_state() -> tuple[StepRows, Any]:
            rows = StepRows(
                query_start_loc=cm.query_start_loc[: n_reqs + 1], seq_lens=cm.seq_lens[:n_reqs],
                slot_ids=rt.slot_ids_on_device(n_reqs), slot_mapping=cm.slot_mapping,
                max_query_len=int(cm.max_query_len),
            )
            s = rt.settings
            return rows, rt.pool.plan(rows, cm.num_actual_tokens, rt.plan.num_slots, s.sink, s.recent)

        rows, step_plan = rt.cached_step_value(cm, step_state)
        return RLKVMetadata(full=full_md, num_actual_tokens=cm.num_actual_tokens, rows=rows, step_plan=step_plan)
