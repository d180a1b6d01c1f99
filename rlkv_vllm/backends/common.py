"""Platform-independent part of the RLKV attention backend.

Serve mode, per layer:
- full heads: the platform's stock kernel on the subset of heads, over a paged
  cache that holds only those heads (vLLM's block manager sees the smaller pages);
- streaming heads: ring attention (``ops.torch_stream``) over fixed per-request slots.
Gated mode: every head is paged and full, and every head also has a ring for its
streaming branch; outputs mix with alpha from a persistent buffer.

The platform classes (``backends.cpu``, ``backends.cuda``) subclass the stock
backend, so with RLKV off they behave exactly as stock.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from .. import compat
from ..ops.torch_stream import StreamPlan, build_stream_plan, ring_stream_attention, ring_write
from ..runtime import RLKVRuntime, runtime_for
from ..core.settings import RLKVConfigError


@dataclass
class RLKVMetadata:
    """Per-step metadata for one attention group.

    full: the stock backend's metadata for the paged (full) heads (None for the group
        of layers with no full head).
    query_start_loc: [B + 1], seq_lens: [B], slot_mapping: [>= T]: vLLM's persistent
        per-step device buffers; slot_ids: [B] ring slot per batch row (our persistent
        buffer). All four keep their addresses across steps, so CUDA graphs replay.
    plan: the PyTorch path's gather plan (None when the Triton kernels run).
    max_query_len: the longest query span of a row (host int): 1 selects the decode kernels.
    """

    full: Any
    num_actual_tokens: int
    max_query_len: int
    query_start_loc: torch.Tensor
    seq_lens: torch.Tensor
    slot_ids: torch.Tensor
    slot_mapping: torch.Tensor
    plan: StreamPlan | None


class RLKVImplMixin:
    """Mixed into a subclass of the platform's stock AttentionImpl."""

    rlkv_runtime: RLKVRuntime | None = None
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
        """Learn this impl's layer (from its name) and build the head split."""
        if self._rlkv_layer is not None or self.rlkv_runtime is None:
            return
        rt = self.rlkv_runtime
        idx = compat.extract_layer_index(layer.layer_name)
        split = rt.plan.layers[idx]
        g = self.num_heads // self.num_kv_heads
        dev = rt.device

        def q_of(kv: tuple[int, ...]) -> torch.Tensor:
            return torch.tensor([h * g + i for h in kv for i in range(g)], dtype=torch.long, device=dev)

        if rt.serve:
            full, stream = split.full, split.stream
            self._paged_slots = split.paged_slots
        else:
            full, stream = tuple(range(self.num_kv_heads)), ()
            self._paged_slots = self.num_kv_heads
        self._group = g
        pad = (self._paged_slots - len(full)) if full else 0
        # the model KV head stored in each paged / ring head (-1: TP padding head)
        self._paged_src = torch.tensor(list(full) + [-1] * pad, dtype=torch.int32, device=dev)
        self._ring_src = torch.tensor(stream if rt.serve else full, dtype=torch.int32, device=dev)
        self._full_kv = torch.tensor(full, dtype=torch.long, device=dev)
        self._full_q = q_of(full)
        self._stream_kv = torch.tensor(stream, dtype=torch.long, device=dev)
        self._stream_q = q_of(stream)
        self._n_full, self._n_stream = len(full), len(stream)
        self._all_full = self._n_full == self.num_kv_heads
        self._pad = self._paged_slots - self._n_full if self._n_full else 0
        self._inner = (
            self._make_inner_impl(self._paged_slots * g, self._paged_slots) if self._n_full else None
        )
        ring = rt.ensure_ring()
        self._ring_k, self._ring_v = ring.k[idx], ring.v[idx]
        self._rlkv_layer = idx

    def rlkv_adjust_kv_spec(self, layer: Any, spec: Any) -> Any:
        """Called through the compat wrapper of Attention.get_kv_cache_spec."""
        if self.rlkv_runtime is None:
            return spec
        self.rlkv_bind(layer)
        if not self.rlkv_runtime.serve:
            return spec
        return compat.reduce_kv_spec(spec, self._paged_slots)

    # ------------------------------------------------------------- head views
    def _full_heads(self, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        if self._all_full:
            return x
        y = x.index_select(1, idx)
        if self._pad:
            per = x.shape[1] // self.num_kv_heads
            y = torch.cat([y, y.new_zeros(y.shape[0], self._pad * per, *y.shape[2:])], dim=1)
        return y

    # ---------------------------------------------------------------- forward
    def do_kv_cache_update(self, layer, key, value, kv_cache, slot_mapping):  # type: ignore[no-untyped-def]
        if self.rlkv_runtime is None:
            return super().do_kv_cache_update(layer, key, value, kv_cache, slot_mapping)
        return self._paged_update_torch(layer, key, value, kv_cache, slot_mapping)

    def _paged_update_torch(self, layer, key, value, kv_cache, slot_mapping):  # type: ignore[no-untyped-def]
        """Store the full heads through the stock impl (on their gathered subset)."""
        self.rlkv_bind(layer)
        if self._inner is None:
            return None
        return self._inner.do_kv_cache_update(
            layer, self._full_heads(key, self._full_kv), self._full_heads(value, self._full_kv),
            kv_cache, slot_mapping,
        )

    def forward(self, layer, query, key, value, kv_cache, attn_metadata, output, *args, **kwargs):  # type: ignore[no-untyped-def]
        if self.rlkv_runtime is None:
            if self._rlkv_writes_in_forward and attn_metadata is not None and key is not None:
                super().do_kv_cache_update(layer, key, value, kv_cache, attn_metadata.slot_mapping)
            return super().forward(layer, query, key, value, kv_cache, attn_metadata, output, *args, **kwargs)
        if attn_metadata is None:
            return output  # profiling warm-up
        for extra in ("output_scale", "output_block_scale"):
            if kwargs.get(extra) is not None:
                raise NotImplementedError(f"RLKV does not support fused output quantization ({extra})")
        self.rlkv_bind(layer)
        md: RLKVMetadata = attn_metadata
        n = md.num_actual_tokens
        q, k, v = query[:n], key[:n], value[:n]
        out = output[:n]
        if self._rlkv_writes_in_forward and self.rlkv_runtime.kernel == "torch":
            self._paged_update_torch(layer, k, v, kv_cache, md.slot_mapping[:n])
        if self.rlkv_runtime.serve:
            self._forward_serve(layer, q, k, v, kv_cache, md, out)
        else:
            self._forward_gated(layer, q, k, v, kv_cache, md, out)
        return output

    def _forward_full(self, layer, q, k, v, kv_cache, md, out) -> None:  # type: ignore[no-untyped-def]
        if self._all_full:
            self._inner.forward(layer, q, k, v, kv_cache, md.full, out)
            return
        qf = self._full_heads(q, self._full_q)
        of = torch.empty_like(qf)
        self._inner.forward(
            layer, qf, self._full_heads(k, self._full_kv), self._full_heads(v, self._full_kv),
            kv_cache, md.full, of,
        )
        out[:, self._full_q] = of[:, : self._n_full * self._group]

    def _forward_serve(self, layer, q, k, v, kv_cache, md, out) -> None:  # type: ignore[no-untyped-def]
        if self._n_full:
            self._forward_full(layer, q, k, v, kv_cache, md, out)
        if not self._n_stream:
            return
        t, g, d = q.shape[0], self._group, q.shape[-1]
        qs = q.index_select(1, self._stream_q).view(t, self._n_stream, g, d)
        ks = k.index_select(1, self._stream_kv)
        vs = v.index_select(1, self._stream_kv)
        os_ = torch.empty(t, self._n_stream, g, d, dtype=out.dtype, device=out.device)
        ring_stream_attention(qs, ks, vs, self._ring_k, self._ring_v, md.plan, self.scale, os_)
        ring_write(self._ring_k, self._ring_v, ks, vs, md.plan)
        out[:, self._stream_q] = os_.view(t, self._n_stream * g, d)

    def _forward_gated(self, layer, q, k, v, kv_cache, md, out) -> None:  # type: ignore[no-untyped-def]
        t, h, g, d = q.shape[0], self.num_kv_heads, self._group, q.shape[-1]
        full = torch.empty_like(out)
        self._inner.forward(layer, q, k, v, kv_cache, md.full, full)
        stream = torch.empty(t, h, g, d, dtype=torch.float32, device=out.device)
        ring_stream_attention(q.view(t, h, g, d), k, v, self._ring_k, self._ring_v, md.plan, self.scale, stream)
        ring_write(self._ring_k, self._ring_v, k, v, md.plan)
        alpha = self.rlkv_runtime.gates[self._rlkv_layer].view(1, h, 1, 1)
        mixed = alpha * full.view(t, h, g, d).float() + (1.0 - alpha) * stream
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

    def build(self, common_prefix_len: int, common_attn_metadata: Any, fast_build: bool = False) -> Any:
        if self.rlkv_runtime is None:
            return super().build(common_prefix_len, common_attn_metadata, fast_build)
        full = None
        if self._rlkv_pages_heads():
            full = super().build(common_prefix_len, common_attn_metadata, fast_build)
        return self._rlkv_wrap(common_attn_metadata, full)

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

        def step_state() -> tuple[torch.Tensor, StreamPlan | None]:
            slot_ids = rt.slot_ids_on_device(n_reqs)
            plan = None
            if rt.kernel == "torch":
                plan = build_stream_plan(
                    cm.query_start_loc[: n_reqs + 1], cm.seq_lens[:n_reqs], slot_ids, cm.num_actual_tokens,
                    rt.settings.sink, rt.settings.recent, rt.plan.max_num_seqs,
                )
            return slot_ids, plan

        slot_ids, plan = rt.cached_step_value(cm, step_state)
        return RLKVMetadata(
            full=full_md, num_actual_tokens=cm.num_actual_tokens, max_query_len=int(cm.max_query_len),
            query_start_loc=cm.query_start_loc[: n_reqs + 1], seq_lens=cm.seq_lens[:n_reqs],
            slot_ids=slot_ids, slot_mapping=cm.slot_mapping, plan=plan,
        )
