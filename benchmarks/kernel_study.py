#!/usr/bin/env python3
"""Decode attention kernel study: RLKV's split pools vs stock vLLM kernels, same data.

One layer of the Llama-8B-R1 shape (32 query / 8 KV heads, head_dim 128, bf16,
block 16, randomly permuted block tables), one decode token per request, every request
at the same context. Per (context, batch):
- stock, for FLASH_ATTN and TRITON_ATTN: the kernel alone (``K``), and what vLLM runs
  per layer for a decode step (``K+write``: reshape_and_cache_flash, then the kernel);
- RLKV at each sparsity s, what the backend runs per layer for a decode batch
  (``RLKV+K``): ``decode_step`` (the step's paged write of round(8 (1 - s)) full heads,
  their query gather, the streaming heads' window attention over 80 ring slots and their
  ring write, one launch), the stock kernel on the gathered full heads, the scatter of
  their output. ``decode`` names the decode_step implementation: ``triton``, or ``cuda``
  (csrc/rlkv_decode.cu) where it loads;
- ``ring[...]``: decode_step with the streaming heads alone (its fixed cost).
RLKV's ratios are taken against ``K+write`` (the same per-layer work in stock vLLM).

Measured: each sequence is captured in a CUDA graph (vLLM replays decode that way)
and timed over many replays with CUDA events. Bandwidth = bytes the kernels must read
(KV of the heads attended, plus q and out) / time, against the largest of three
measured memory bandwidths (a device-to-device copy, an elementwise SM kernel, a
read-only sum; ``bw_frac``). The first H200 run (2026-12-01) had only the copy probe.

  python benchmarks/kernel_study.py                       # the full grid (GPU)
  python benchmarks/kernel_study.py --contexts 1024 4096 --batches 1 8

Writes benchmarks/results/kernel-<device>-vllm<version>-<date>.json; plot it with
benchmarks/plot_study.py.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
from dataclasses import dataclass
from typing import Callable

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
SPARSITIES = [0.0, 0.2, 0.4, 0.5, 0.6, 0.8]


@dataclass
class Shape:
    q_heads: int = 32
    kv_heads: int = 8
    head_dim: int = 128
    block_size: int = 16
    sink: int = 16
    recent: int = 64
    dtype: torch.dtype = torch.bfloat16


def time_graph(fn: Callable[[], None], iters: int) -> float:
    """Median-free mean microseconds per call of fn, replayed from a CUDA graph."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):  # compile + warm up outside the capture
            fn()
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    g.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        g.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1e3 / iters


def memory_bandwidth_gbs(nbytes: int = 4 << 30) -> dict[str, float]:
    """The device's memory bandwidth three ways, GB/s of bytes moved (read + written):
    ``copy`` (tensor.copy_, a device-to-device memcpy), ``elementwise`` (an SM kernel
    reading one tensor and writing another), ``read`` (a sum: reads only). The study's
    ceiling is the largest: a decode kernel's traffic is almost all reads."""
    a = torch.randn(nbytes // 2, dtype=torch.float16, device="cuda")
    b = torch.empty_like(a)
    acc = torch.empty((), dtype=torch.float32, device="cuda")
    out = {
        "copy": 2 * nbytes / (time_graph(lambda: b.copy_(a), 20) * 1e-6) / 1e9,
        "elementwise": 2 * nbytes / (time_graph(lambda: torch.mul(a, 1.5, out=b), 20) * 1e-6) / 1e9,
        "read": nbytes / (time_graph(lambda: torch.sum(a, dtype=torch.float32, out=acc), 20) * 1e-6) / 1e9,
    }
    del a, b
    return {k: round(v, 1) for k, v in out.items()}


class PagedKV:
    """A paged cache for `heads` KV heads, every request at context `ctx`, block table
    randomly permuted. k/v views are [num_blocks, block_size, heads, D]."""

    def __init__(self, sh: Shape, batch: int, ctx: int, heads: int, gen: torch.Generator) -> None:
        blocks_per = (ctx + sh.block_size - 1) // sh.block_size
        n = batch * blocks_per + 1
        self.kv = torch.empty(2, n, sh.block_size, heads, sh.head_dim, dtype=sh.dtype, device="cuda")
        self.kv.normal_(generator=gen)
        perm = torch.randperm(n - 1, generator=gen, device="cuda")[: batch * blocks_per] + 1
        self.block_table = perm.view(batch, blocks_per).to(torch.int32)
        self.seq_lens = torch.full((batch,), ctx, dtype=torch.int32, device="cuda")
        self.k, self.v = self.kv[0], self.kv[1]
        self.block_size, self.ctx = sh.block_size, ctx

    def last_slots(self) -> torch.Tensor:
        """slot_mapping of each request's newest token (position ctx - 1)."""
        last = (self.ctx - 1) // self.block_size
        return (self.block_table[:, last].to(torch.int64) * self.block_size + (self.ctx - 1) % self.block_size)


def stock_kernels() -> dict[str, Callable[..., Callable[[], None]]]:
    """name -> make(q, out, paged, qsl, ctx) returning a zero-argument launch."""
    from rlkv_vllm.compat import stock_decode_kernels

    kernels = stock_decode_kernels()
    for name, why in kernels["errors"].items():
        print(f"{name} unavailable: {why}", file=sys.stderr)
    made: dict[str, Callable[..., Callable[[], None]]] = {}
    if "flash_attn_varlen_func" in kernels:
        flash_attn_varlen_func, fa_version = kernels["flash_attn_varlen_func"], kernels["fa_version"]

        def make_fa(q, out, paged, qsl, ctx, scale):
            return lambda: flash_attn_varlen_func(
                q=q, k=paged.k, v=paged.v, out=out, cu_seqlens_q=qsl, max_seqlen_q=1,
                seqused_k=paged.seq_lens, max_seqlen_k=ctx, softmax_scale=scale, causal=True,
                block_table=paged.block_table, fa_version=fa_version)

        made["FLASH_ATTN"] = make_fa
    if "unified_attention" in kernels:
        unified_attention = kernels["unified_attention"]

        def make_triton(q, out, paged, qsl, ctx, scale):
            b, hq, d = q.shape[0], q.shape[1], q.shape[2]
            hk = paged.k.shape[2]
            thr = kernels["triton_min_launch_grid_2d"] // hk  # as vLLM's builder sets it (no graph rounding)
            seg = kernels["triton_softmax_segments"]
            so = torch.empty(max(thr, b), hq, seg, d, dtype=torch.float32, device="cuda")
            sm = torch.empty(max(thr, b), hq, seg, dtype=torch.float32, device="cuda")
            se = torch.empty_like(sm)
            return lambda: unified_attention(
                q=q, k=paged.k, v=paged.v, out=out, cu_seqlens_q=qsl, max_seqlen_q=1,
                seqused_k=paged.seq_lens, max_seqlen_k=ctx, softmax_scale=scale, causal=True,
                window_size=(-1, -1), block_table=paged.block_table, softcap=0, q_descale=None,
                k_descale=None, v_descale=None, seq_threshold_3D=thr, num_par_softmax_segments=seg,
                softmax_segm_output=so, softmax_segm_max=sm, softmax_segm_expsum=se)

        made["TRITON_ATTN"] = make_triton
    return made


def stock_with_write(q, out, paged: PagedKV, qsl, ctx, scale, make) -> Callable[[], None]:
    """vLLM's per-layer decode work: store the step's keys/values, then attend."""
    from rlkv_vllm.compat import stock_decode_kernels

    reshape_and_cache_flash = stock_decode_kernels()["reshape_and_cache_flash"]
    b, hk, d = q.shape[0], paged.k.shape[2], q.shape[2]
    k_tok = torch.randn(b, hk, d, dtype=q.dtype, device="cuda")
    v_tok = torch.randn_like(k_tok)
    slots = paged.last_slots()
    one = torch.ones((), dtype=torch.float32, device="cuda")
    attend = make(q, out, paged, qsl, ctx, scale)

    def run() -> None:
        reshape_and_cache_flash(k_tok, v_tok, paged.k, paged.v, slots, "auto", one, one)
        attend()

    return run


def rlkv_launch(sh: Shape, q, out, full_paged: PagedKV | None, stream_kv: list[int], ring, slot_ids, qsl,
                ctx: int, scale: float, make_full, decode_fn) -> Callable[[], None]:
    """What the backend runs per layer for a decode batch: decode_step (paged write, query
    gather, ring attention, ring write), the stock kernel on the gathered full heads, the
    scatter of their output. make_full None: decode_step's ring heads alone."""
    g = sh.q_heads // sh.kv_heads
    full_kv = [h for h in range(sh.kv_heads) if h not in stream_kv]
    full_q = torch.tensor([h * g + i for h in full_kv for i in range(g)], device="cuda")
    ring_src = torch.tensor(stream_kv, dtype=torch.int32, device="cuda") if stream_kv else None
    b = q.shape[0]
    seq_lens = torch.full((b,), ctx, dtype=torch.int32, device="cuda")
    k_tok = torch.randn(b, sh.kv_heads, sh.head_dim, dtype=sh.dtype, device="cuda")
    v_tok = torch.randn_like(k_tok)
    from rlkv_vllm.ops.views import LayerPools, StepRows

    pool_views: dict = {}
    if stream_kv:
        pool_views.update(ring_k=ring[0], ring_v=ring[1], ring_src=ring_src)
    slot_mapping = None
    if make_full is not None and full_paged is not None:
        slot_mapping = full_paged.last_slots()
        pool_views.update(key_cache=full_paged.k, value_cache=full_paged.v,
                          paged_src=torch.tensor(full_kv, dtype=torch.int32, device="cuda"))
    pools = LayerPools(sink=sh.sink, recent=sh.recent, **pool_views)
    rows = StepRows(qsl, seq_lens, slot_ids, slot_mapping=slot_mapping, max_query_len=1)
    all_full = not stream_kv
    qf = of = full = None
    if make_full is not None and full_kv:
        qf = q if all_full else torch.empty(b, len(full_q), sh.head_dim, dtype=sh.dtype, device="cuda")
        of = out if all_full else torch.empty_like(qf)
        full = make_full(qf, of, full_paged, qsl, ctx, scale)

    def run() -> None:
        decode_fn(q, k_tok, v_tok, out, None if all_full else qf, rows, pools, scale)
        if full is not None:
            full()
            if not all_full:
                out[:, full_q] = of

    return run


def decode_impls() -> dict[str, Callable[..., None]]:
    """decode_step implementations to time: Triton always, CUDA where it loads."""
    from rlkv_vllm.ops import cuda_decode, triton_stream

    impls: dict[str, Callable[..., None]] = {"triton": triton_stream.decode_step}
    reason = cuda_decode.unavailable_reason("cuda")
    if reason is None:
        impls["cuda"] = cuda_decode.decode_step
    else:
        print(f"CUDA decode kernel unavailable: {reason}", file=sys.stderr)
    return impls


def study(a: argparse.Namespace) -> dict:
    sh = Shape()
    gen = torch.Generator(device="cuda").manual_seed(0)
    probes = memory_bandwidth_gbs()
    bw = max(probes.values())
    print(f"device memory bandwidth (GB/s): {probes}; ceiling {bw:.0f}", flush=True)
    kernels = stock_kernels()
    impls = decode_impls()
    scale = sh.head_dim**-0.5
    elt = torch.finfo(sh.dtype).bits // 8
    rows = []
    end = time.time() + a.deadline_s if a.deadline_s else float("inf")
    skipped: list[dict[str, int]] = []

    def record(**r) -> None:
        r["us"] = round(r["us"], 2)
        r["gbs"] = round(r["bytes"] / r["us"] / 1e3, 1)
        r["bw_frac"] = round(r["bytes"] / r["us"] / 1e3 / bw, 3)
        rows.append(r)

    for ctx in a.contexts:
        for batch in a.batches:
            if batch * ctx > a.max_tokens:
                continue
            if time.time() > end:  # a bounded device call: keep what was measured
                skipped.append(dict(context=ctx, batch=batch))
                continue
            q = torch.randn(batch, sh.q_heads, sh.head_dim, dtype=sh.dtype, device="cuda", generator=gen)
            out = torch.empty_like(q)
            qsl = torch.arange(batch + 1, dtype=torch.int32, device="cuda")
            qo_bytes = 2 * q.numel() * elt
            stock_paged = PagedKV(sh, batch, ctx, sh.kv_heads, gen)
            stock_bytes = 2 * batch * ctx * sh.kv_heads * sh.head_dim * elt + qo_bytes
            base: dict[str, float] = {}
            for name, make in kernels.items():
                us = time_graph(make(q, out, stock_paged, qsl, ctx, scale), a.iters)
                record(context=ctx, batch=batch, kernel=name, sparsity=None, us=us, bytes=stock_bytes)
                us = time_graph(stock_with_write(q, out, stock_paged, qsl, ctx, scale, make), a.iters)
                base[name] = us
                record(context=ctx, batch=batch, kernel=f"{name}+write", sparsity=None, us=us, bytes=stock_bytes)
            del stock_paged
            c = sh.sink + sh.recent
            slot_ids = torch.randperm(batch, device="cuda", generator=gen).to(torch.int32)
            line = []
            for s in a.sparsities:
                n_full = round(sh.kv_heads * (1 - s))
                stream_kv = sorted(torch.randperm(sh.kv_heads, generator=torch.Generator().manual_seed(1))
                                   [: sh.kv_heads - n_full].tolist())
                full_paged = PagedKV(sh, batch, ctx, n_full, gen) if n_full else None
                ring = tuple(torch.randn((batch + 1) * c, max(len(stream_kv), 1), sh.head_dim, dtype=sh.dtype,
                                         device="cuda", generator=gen) for _ in range(2))
                nbytes = (2 * batch * ctx * n_full * sh.head_dim * elt
                          + 2 * batch * c * len(stream_kv) * sh.head_dim * elt + qo_bytes)
                for dname, decode_fn in impls.items():
                    for name, make in kernels.items():
                        if dname != "triton" and name != "FLASH_ATTN":
                            continue  # the CUDA decode kernel against the default base only
                        run = rlkv_launch(sh, q, out, full_paged, stream_kv, ring, slot_ids, qsl, ctx, scale,
                                          make, decode_fn)
                        us = time_graph(run, a.iters)
                        record(context=ctx, batch=batch, kernel=f"RLKV+{name}", decode=dname, sparsity=s,
                               full_heads=n_full, us=us, bytes=nbytes,
                               speedup_vs_stock_same_kernel=round(base[name] / us, 3),
                               speedup_vs_flash_attn=round(base.get("FLASH_ATTN", float("nan")) / us, 3))
                        line.append(f"{dname}+{name} {us:.1f}")
                    if stream_kv:  # the streaming pool alone: decode_step's fixed cost
                        run = rlkv_launch(sh, q, out, None, stream_kv, ring, slot_ids, qsl, ctx, scale, None,
                                          decode_fn)
                        rb = (2 * batch * c * len(stream_kv) * sh.head_dim * elt
                              + qo_bytes * len(stream_kv) // sh.kv_heads)
                        us = time_graph(run, a.iters)
                        record(context=ctx, batch=batch, kernel=f"ring[{dname}]", decode=dname, sparsity=s,
                               us=us, bytes=rb)
                        line.append(f"ring[{dname}] {us:.1f}")
                del full_paged, ring
                print(f"ctx {ctx:>6} batch {batch:>4} s {s:.1f}: stock+write "
                      + " ".join(f"{k} {v:.1f}" for k, v in base.items()) + " | " + "  ".join(line), flush=True)
                line = []
            torch.cuda.empty_cache()
    return dict(copy_bandwidth_gbs=probes["copy"], bandwidth_probes_gbs=probes, bandwidth_ceiling_gbs=bw,
                rows=rows, skipped_for_deadline=skipped)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--contexts", type=int, nargs="+", default=[1024, 4096, 16384, 32768])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8, 64])
    p.add_argument("--sparsities", type=float, nargs="+", default=SPARSITIES)
    p.add_argument("--iters", type=int, default=50)
    p.add_argument("--max-tokens", type=int, default=1 << 21, help="skip batch x context above this")
    p.add_argument("--deadline-s", type=float, default=0.0,
                   help="start no new (context, batch) cell after this many seconds (0: no limit)")
    p.add_argument("--out", default=None)
    a = p.parse_args()
    if not torch.cuda.is_available():
        print("kernel_study needs a CUDA GPU", file=sys.stderr)
        return 2
    import vllm

    t0 = time.time()
    res = study(a)
    dev = torch.cuda.get_device_name(0)
    date = datetime.date.today().isoformat()
    res.update(study="kernel", device=dev, vllm=vllm.__version__, torch=torch.__version__, date=date,
               command=" ".join([os.path.basename(sys.argv[0])] + sys.argv[1:]), seconds=round(time.time() - t0, 1),
               shape=dict(q_heads=32, kv_heads=8, head_dim=128, dtype="bfloat16", block_size=16, sink=16, recent=64))
    out = a.out or os.path.join(HERE, "results", f"kernel-{dev.replace(' ', '_')}-vllm{vllm.__version__}-{date}.json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        json.dump(res, f, indent=1)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
