"""The streaming-pool implementations: one small class per kernel path, chosen once.

A backend binds to one of them when its first RLKV layer is built (``choose_pool``):

- ``TorchPool``: the PyTorch path (``ops.torch_stream``): the CPU path, and a reference
  path on CUDA. Its per-step plan is a gather plan built eagerly, so no CUDA graphs. The
  full heads' paged KV is stored by the stock impl (``do_kv_cache_update``).
- ``TritonPool``: the Triton kernels (``ops.triton_stream``), graph-capturable. It stores
  the full heads' paged KV itself, after the ring reads. Decode batches run one
  ``decode_step`` launch per layer: Triton's, or ``csrc/rlkv_decode.cu`` (``decode="cuda"``).

Each has a per-step ``plan`` (shared by every layer of the step) and two runs: ``serve``
(streaming heads into ``out``, the pools' writes, the full heads' inputs for the stock
kernel) and ``gated_stream`` (every head's streaming branch, for the gated mix).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, ClassVar

import torch

from .. import compat
from ..core.patterns import LayerHeads
from ..core.plan import RLKVPlan, is_fp8
from ..core.settings import RLKVConfigError
from . import cuda_build, cuda_decode, triton_stream
from .torch_stream import StreamPlan, build_stream_plan, ring_stream_attention, ring_write
from .views import LayerPools, StepRows


@dataclass(frozen=True)
class HeadSplit:
    """One layer's heads on this rank as device index tensors.

    full_kv / stream_kv: [n_full] / [n_stream] local KV heads with a full / streaming cache;
    full_q / stream_q: their query heads (kv_head * group + i); paged_slots: KV-head slots the
    paged cache holds (n_full plus tensor-parallel padding); paged_src: [paged_slots] int32,
    the KV head stored in each paged slot (-1: padding); ring_src: [R] int32, the KV head of
    each ring head (serve: the streaming heads; gated: every head).
    contiguous: the layer's heads were permuted at weight load (``rlkv.permute_heads``), so
    its full heads are the first n_full (queries: n_full * group) and its streaming heads the
    rest: gathers and scatters become slices. Every index here is then a physical position.
    """

    num_kv_heads: int
    group: int
    paged_slots: int
    full_kv: torch.Tensor
    full_q: torch.Tensor
    stream_kv: torch.Tensor
    stream_q: torch.Tensor
    paged_src: torch.Tensor
    ring_src: torch.Tensor
    contiguous: bool = False

    @property
    def n_full(self) -> int:
        return int(self.full_kv.shape[0])

    @property
    def n_stream(self) -> int:
        return int(self.stream_kv.shape[0])

    @property
    def all_full(self) -> bool:
        return self.n_full == self.num_kv_heads

    @property
    def pad(self) -> int:
        """Zero heads appended to the full heads to fill the paged slots (tensor parallel)."""
        return self.paged_slots - self.n_full if self.n_full else 0


def head_split(layer: LayerHeads, num_kv_heads: int, group: int, serve: bool,
               device: torch.device, permuted: bool = False) -> HeadSplit:
    """The device index tensors of one layer's split (gated mode: every head full and ringed).

    permuted (serve mode): the layer's weights put its heads full-first (``core.head_order``):
    the split is over physical positions, full heads 0 .. n_full - 1."""
    permuted = permuted and serve
    if permuted:
        nf = layer.n_full
        full, stream, slots = tuple(range(nf)), tuple(range(nf, nf + layer.n_stream)), layer.paged_slots
    elif serve:
        full, stream, slots = layer.full, layer.stream, layer.paged_slots
    else:
        full, stream, slots = tuple(range(num_kv_heads)), (), num_kv_heads

    def q_of(kv: tuple[int, ...]) -> torch.Tensor:
        return torch.tensor([h * group + i for h in kv for i in range(group)], dtype=torch.long, device=device)

    pad = (slots - len(full)) if full else 0
    return HeadSplit(
        num_kv_heads=num_kv_heads, group=group, paged_slots=slots,
        full_kv=torch.tensor(full, dtype=torch.long, device=device), full_q=q_of(full),
        stream_kv=torch.tensor(stream, dtype=torch.long, device=device), stream_q=q_of(stream),
        paged_src=torch.tensor(list(full) + [-1] * pad, dtype=torch.int32, device=device),
        ring_src=torch.tensor(stream if serve else full, dtype=torch.int32, device=device),
        contiguous=permuted,
    )


def gather_heads(x: torch.Tensor, idx: torch.Tensor, split: HeadSplit) -> torch.Tensor:
    """x[:, idx] plus the split's zero padding heads; x: [T, H * per, D] (per = group for
    queries, 1 for keys/values)."""
    if split.all_full:
        return x
    if split.contiguous:
        # full heads first: a view (row stride unchanged, as vLLM's q/k/v split views have)
        per = x.shape[1] // split.num_kv_heads
        y = x[:, : split.n_full * per]
    else:
        y = x.index_select(1, idx)
    if split.pad:
        per = x.shape[1] // split.num_kv_heads
        y = torch.cat([y, y.new_zeros(y.shape[0], split.pad * per, *y.shape[2:])], dim=1)
    return y


def dequantize_query(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Model-dtype queries from vLLM's fp8 ones: ``q * scale`` rounded once to ``dtype``.
    q: [T, Hq, D] fp8; scale: float32 [] or [Hkv] (per KV head: one factor per query head)."""
    if scale.numel() > 1:
        scale = scale.repeat_interleave(q.shape[1] // scale.numel()).view(1, -1, 1)
    # fp8 -> fp16/bf16/fp32 is exact, and the in-place multiply rounds its float32 product once: the same
    # values as (q.float() * scale).to(dtype), in two kernels instead of three
    return q.to(dtype).mul_(scale)


@dataclass(frozen=True)
class FullHeadInputs:
    """q, k, v for the stock kernel on a layer's paged heads: [T, paged_slots * G, D] and
    [T, paged_slots, D] (or the layer's own tensors when every head is full)."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor


class StreamingPool:
    """The streaming-pool implementation a backend binds to (see the module docstring)."""

    name: ClassVar[str]
    # every index is computed on the device from persistent buffers: CUDA graphs replay it
    cuda_graphs: ClassVar[bool] = False
    # stores the full heads' paged KV itself (else the stock impl's do_kv_cache_update does)
    writes_paged: ClassVar[bool] = False

    def plan(self, rows: StepRows, num_tokens: int, scratch_slot: int, sink: int, recent: int) -> Any:
        """Per-step work shared by every layer (None: nothing to share)."""
        return None

    def serve(self, split: HeadSplit, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
              rows: StepRows, pools: LayerPools, step_plan: Any, scale: float,
              q_scale: torch.Tensor | None = None) -> FullHeadInputs | None:
        """Serve mode: the streaming heads' output into ``out`` and the pools' writes; returns
        the full heads' inputs for the stock kernel (None: the layer has no full head).
        q, out: [T, Hq, D]; k, v: [T, Hkv, D]. q_scale: only where ``takes_fp8_queries`` said yes,
        with q the fp8 queries vLLM made (the full heads' inputs then hold them as they are)."""
        raise NotImplementedError

    def takes_fp8_queries(self, rows: StepRows, q_scale: torch.Tensor, num_kv_heads: int) -> bool:
        """Whether ``serve`` takes this step's fp8 queries as they are (else the caller hands it
        ``dequantize_query``'s model-dtype ones). q_scale: float32 [] or [Hkv]."""
        return False

    def gated_stream(self, split: HeadSplit, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     rows: StepRows, pools: LayerPools, step_plan: Any, scale: float) -> torch.Tensor:
        """Gated mode: every head's streaming branch, float32 [T, Hq, D], plus the ring write
        (and the paged write where ``writes_paged``)."""
        raise NotImplementedError


def _ring_scales(pools: LayerPools) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(k_scale, v_scale) for an fp8 ring, (None, None) for a ring of the compute dtype."""
    if pools.ring_k is not None and is_fp8(pools.ring_k.dtype):
        return pools.k_scale, pools.v_scale
    return None, None


class TorchPool(StreamingPool):
    name = "torch"

    def plan(self, rows: StepRows, num_tokens: int, scratch_slot: int, sink: int, recent: int) -> StreamPlan:
        return build_stream_plan(rows.query_start_loc, rows.seq_lens, rows.slot_ids, num_tokens, sink, recent,
                                 scratch_slot)

    def serve(self, split, q, k, v, out, rows, pools, step_plan, scale, q_scale=None):  # type: ignore[no-untyped-def]
        assert q_scale is None, "the torch pool takes model-dtype queries"
        if split.n_stream:
            t, g, d = q.shape[0], split.group, q.shape[-1]
            if split.contiguous:  # streaming heads last: slices
                nf = split.n_full
                qs = q[:, nf * g:].reshape(t, split.n_stream, g, d)
                ks, vs = k[:, nf:], v[:, nf:]
            else:
                qs = q.index_select(1, split.stream_q).view(t, split.n_stream, g, d)
                ks, vs = k.index_select(1, split.stream_kv), v.index_select(1, split.stream_kv)
            o = torch.empty(t, split.n_stream, g, d, dtype=out.dtype, device=out.device)
            ring_stream_attention(qs, ks, vs, pools.ring_k, pools.ring_v, step_plan, scale, o, *_ring_scales(pools))
            ring_write(pools.ring_k, pools.ring_v, ks, vs, step_plan, *_ring_scales(pools))
            if split.contiguous:
                out[:, split.n_full * g:] = o.view(t, split.n_stream * g, d)
            else:
                out[:, split.stream_q] = o.view(t, split.n_stream * g, d)
        if not split.n_full:
            return None
        return FullHeadInputs(gather_heads(q, split.full_q, split), gather_heads(k, split.full_kv, split),
                              gather_heads(v, split.full_kv, split))

    def gated_stream(self, split, q, k, v, rows, pools, step_plan, scale):  # type: ignore[no-untyped-def]
        t, h, g, d = q.shape[0], split.num_kv_heads, split.group, q.shape[-1]
        stream = torch.empty(t, h, g, d, dtype=torch.float32, device=q.device)
        ring_stream_attention(q.view(t, h, g, d), k, v, pools.ring_k, pools.ring_v, step_plan, scale, stream,
                              *_ring_scales(pools))
        ring_write(pools.ring_k, pools.ring_v, k, v, step_plan, *_ring_scales(pools))
        return stream.view(t, h * g, d)


DecodeStep = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, "torch.Tensor | None", StepRows,
                       LayerPools, float], None]
DECODE_STEPS: dict[str, DecodeStep] = {"triton": triton_stream.decode_step, "cuda": cuda_decode.decode_step}


class TritonPool(StreamingPool):
    name = "triton"
    cuda_graphs = True
    writes_paged = True

    def __init__(self, decode: str = "triton") -> None:
        self.decode = decode
        self._decode_step = DECODE_STEPS[decode]

    def takes_fp8_queries(self, rows, q_scale, num_kv_heads):  # type: ignore[no-untyped-def]
        # decode steps of the Triton decode_step v2: the ring heads' queries dequantized in registers,
        # the paged heads' gathered as fp8 (no dequantize_query kernels); prefill chunks and the
        # CUDA decode kernel take model-dtype queries
        return (self.decode == "triton" and rows.max_query_len == 1 and triton_stream.takes_fp8_queries()
                and q_scale.numel() in (1, num_kv_heads))

    def serve(self, split, q, k, v, out, rows, pools, step_plan, scale, q_scale=None):  # type: ignore[no-untyped-def]
        # the stock kernel's input: the full heads' queries, gathered by our write kernel (fp8
        # queries: q_full is fp8 too)
        q_full = None
        if split.n_full and not split.all_full:
            q_full = q.new_empty(q.shape[0], split.paged_slots * split.group, q.shape[-1])
        if rows.max_query_len == 1:
            if q_scale is None:
                self._decode_step(q, k, v, out, q_full, rows, pools, scale)
            else:
                self._decode_step(q, k, v, out, q_full, rows, pools, scale, q_scale=q_scale)
        else:
            assert q_scale is None, "prefill chunks take model-dtype queries (takes_fp8_queries)"
            # ring reads first: a chunk longer than the window would otherwise overwrite
            # ring keys its own earlier queries still read
            if split.n_stream:
                triton_stream.ring_attention(q, k, v, out, rows, pools, scale)
            triton_stream.fused_kv_write(k, v, rows, pools, q=q, q_full=q_full)
        if not split.n_full:
            return None
        if q_full is None:
            return FullHeadInputs(q, k, v)
        # the stock decoder kernels read keys/values from the paged cache alone (their k/v
        # arguments serve encoder attention and context parallelism, both refused with RLKV):
        # shape-correct views are enough
        n = split.paged_slots
        return FullHeadInputs(q_full, k[:, :n], v[:, :n])

    def gated_stream(self, split, q, k, v, rows, pools, step_plan, scale):  # type: ignore[no-untyped-def]
        triton_stream.fused_kv_write(k, v, rows, pools.paged_only())
        stream = torch.empty(q.shape, dtype=torch.float32, device=q.device)
        triton_stream.ring_attention(q, k, v, stream, rows, pools, scale)
        triton_stream.fused_kv_write(k, v, rows, pools.ring_only())
        return stream


# ------------------------------------------------------------------- choice
KERNELS = ("triton", "torch")


def resolve_kernel(kernel: str, device: torch.device) -> str:
    """The streaming-pool path to run: "triton" or "torch" ("auto": triton on CUDA)."""
    if kernel == "auto":
        return "triton" if device.type == "cuda" else "torch"
    return kernel


def pool_class(kernel: str, device: torch.device) -> type[StreamingPool]:
    return TritonPool if resolve_kernel(kernel, device) == "triton" else TorchPool


def decode_kernel_problem(plan: RLKVPlan) -> str | None:
    """Why the CUDA decode kernel cannot serve this plan (None if it can), device aside.
    An fp8 KV cache is no problem here: ``resolve_decode_kernel`` falls back to Triton."""
    reason = cuda_decode.shape_unsupported_reason(plan.dtype, plan.shape.head_size, plan.shape.group_size,
                                                  plan.settings.window)
    if reason is not None:
        return reason
    try:
        cuda_build.locate("rlkv_decode")
    except cuda_build.CudaBuildError as e:
        return str(e)
    return None


def resolve_decode_kernel(plan: RLKVPlan, kernel: str, device: torch.device) -> str:
    """The decode-step kernel: "triton" or "cuda" (only with the Triton streaming path).

    "auto" takes Triton: the CUDA kernel is opt-in until the kernel study shows it faster
    on the device in hand (docs/RESULTS.md). "cuda" loads its module here, inside model
    loading and before any graph capture.
    """
    choice = plan.settings.decode_kernel
    if kernel != "triton" or choice in ("auto", "triton"):
        return "triton"
    if is_fp8(plan.cache_dtype):
        compat.plugin_logger().info(
            "RLKV: rlkv.decode_kernel = 'cuda' runs the Triton decode step: the CUDA kernel has no fp8 KV "
            "path (kv_cache_dtype %s)", plan.cache_dtype)
        return "triton"
    # unavailable_reason loads the module (the check and the load are one step)
    problem = decode_kernel_problem(plan) or cuda_decode.unavailable_reason(device)
    if problem is not None:
        raise RLKVConfigError(f"rlkv.decode_kernel = 'cuda' cannot run: {problem}")
    return "cuda"


def choose_pool(plan: RLKVPlan, device: torch.device) -> StreamingPool:
    """The streaming-pool implementation of one engine, chosen once when the backend binds."""
    kernel = resolve_kernel(plan.settings.kernel, device)
    if kernel == "torch":
        return TorchPool()
    return TritonPool(decode=resolve_decode_kernel(plan, kernel, device))
