#!/usr/bin/env python3
"""decode_step micro-benchmark: variant v2 (``_slot_decode_step_kernel``, the default) against
v1 (``_decode_step_kernel``, the earlier kernel), same data, one run.

Per case (model shape x batch x mode x KV dtype) a stack of layers, each with its own ring
(sink 16 + recent 64, random contents, permuted slots), queries and outputs; every request is
past the window (contexts random in [81, 32K]), one decode token each. Modes:
- ``ring``: the 4 ring heads alone (s = 0.5 of 8 KV heads): the ring part of decode_step;
- ``step``: plus the 4 paged heads' paged-cache write and query gather, as the backend runs it.
One timed call = the layer stack once, captured in a CUDA graph (vLLM replays decode that
way) and replayed many times between CUDA events; the stack holds enough layers that its
rings do not fit in L2 (at least 512 MB of data, 4 .. 256 layers).

Bytes moved per token (the traffic the kernel cannot avoid): ring K/V reads of the 79 earlier
window rows (the token's own key comes from k) and the ring write of the token, its k/v read,
the ring heads' q read and out write; ``step`` adds the paged heads' k/v read and cache write
and the query gather (read + write). TB/s = bytes / time.

v2 also runs at other settings (``V2_SWEEP``: ring heads per program, window block rows,
pipeline stages, num_warps); the best is reported next to the default
(``triton_stream.slot_config``). Each case first checks v2 against v1 on its
first layer: ring, paged-cache and q_full bytes equal, outputs within bf16 rounding. The e4m3
``step`` cases also time FA3's fp8 queries (``fp8_query_case``): v2 taking them as they are
against ``dequantize_query``'s copy first.

  source scripts/gpu/setup.sh && python3 scripts/gpu/decode_bench.py     # the GPU (H200)
  python3 scripts/gpu/decode_bench.py --smoke     # CPU, TRITON_INTERPRET=1, a tiny shape

Writes $OUT/decode_bench.json when $OUT is set (or --out). Without CUDA (and no --smoke) it
prints a message and exits 0.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time
from dataclasses import dataclass

if "--smoke" in sys.argv:  # before anything imports triton: the interpreter reads it then
    os.environ["TRITON_INTERPRET"] = "1"

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import torch  # noqa: E402


@dataclass(frozen=True)
class Shape:
    name: str
    q_heads: int
    kv_heads: int
    ring_heads: int = 4
    head_dim: int = 128
    sink: int = 16
    recent: int = 64
    block_size: int = 16

    @property
    def group(self) -> int:
        return self.q_heads // self.kv_heads


SHAPES = {
    "llama8b": Shape("llama8b", 32, 8),
    "qwen32b": Shape("qwen32b", 64, 8),
}
SMOKE_SHAPE = Shape("smoke", 8, 4, ring_heads=2, head_dim=32, sink=4, recent=8, block_size=4)
FP8 = {"e4m3": torch.float8_e4m3fn, "e5m2": torch.float8_e5m2}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    p.add_argument("--batches", nargs="+", type=int, default=[8, 64, 256, 512])
    p.add_argument("--modes", nargs="+", default=["ring", "step"], choices=["ring", "step"])
    p.add_argument("--fp8", default="e4m3", choices=[*FP8, "none"], help="KV dtype of the fp8 cases")
    p.add_argument("--fp8-shapes", nargs="+", default=["llama8b"], choices=list(SHAPES))
    p.add_argument("--fp8-batches", nargs="+", type=int, default=[256])
    p.add_argument("--iters", type=int, default=30, help="graph replays timed per measurement")
    p.add_argument("--min-mb", type=float, default=512.0, help="data per layer stack (keeps rings out of L2)")
    p.add_argument("--max-layers", type=int, default=256)
    p.add_argument("--no-graph", action="store_true", help="time plain launches (no CUDA graph)")
    p.add_argument("--no-sweep", action="store_true", help="v2 at its default setting only")
    p.add_argument("--smoke", action="store_true", help="CPU under TRITON_INTERPRET=1, a tiny shape")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="JSON path (default: $OUT/decode_bench.json when $OUT is set)")
    return p.parse_args(argv)


# ------------------------------------------------------------------ the data
class Layer:
    """One layer's decode_step arguments: q/k/v/out, q_full and the paged cache (``step``),
    the ring and its scales; rows are shared by every layer (vLLM's per-step buffers)."""

    def __init__(self, sh: Shape, batch: int, mode: str, kv_dtype: torch.dtype | None, rows, ring_src,
                 paged_src, num_slots: int, gen: torch.Generator, device: str) -> None:
        from rlkv_vllm.ops.views import LayerPools

        dt = torch.bfloat16 if device == "cuda" else torch.float32
        c = sh.sink + sh.recent
        r = ring_src.numel()
        mk = lambda *s: torch.randn(*s, generator=gen, device=device).to(dt)  # noqa: E731
        self.q = mk(batch, sh.q_heads, sh.head_dim)
        self.k = mk(batch, sh.kv_heads, sh.head_dim)
        self.v = mk(batch, sh.kv_heads, sh.head_dim)
        self.out = torch.zeros_like(self.q)
        store = kv_dtype or dt
        self.ring_k = torch.randn((num_slots + 1) * c, r, sh.head_dim, generator=gen, device=device).to(store)
        self.ring_v = torch.randn((num_slots + 1) * c, r, sh.head_dim, generator=gen, device=device).to(store)
        scales = {}
        if kv_dtype is not None:
            scales = dict(k_scale=torch.tensor(0.7, device=device), v_scale=torch.tensor(1.3, device=device))
        paged = {}
        self.q_full = None
        self.kv_cache = None
        if mode == "step":
            p = paged_src.numel()
            blocks = -(-batch // sh.block_size) + 1
            # vLLM's flash layout: [2, blocks, block_size, heads, D]
            self.kv_cache = torch.zeros(2, blocks, sh.block_size, p, sh.head_dim, device=device, dtype=store)
            paged = dict(key_cache=self.kv_cache[0], value_cache=self.kv_cache[1], paged_src=paged_src)
            self.q_full = torch.zeros(batch, p * sh.group, sh.head_dim, device=device, dtype=dt)
        self.pools = LayerPools(sink=sh.sink, recent=sh.recent, ring_k=self.ring_k, ring_v=self.ring_v,
                                ring_src=ring_src, **paged, **scales)
        self.rows = rows
        self.scale = sh.head_dim**-0.5

    def call(self, fn) -> None:
        fn(self.q, self.k, self.v, self.out, self.q_full, self.rows, self.pools, self.scale)

    def nbytes(self) -> int:
        return sum(x.numel() * x.element_size() for x in (self.q, self.k, self.v, self.out, self.ring_k, self.ring_v))


def make_rows(sh: Shape, batch: int, mode: str, gen: torch.Generator, device: str):
    """(StepRows, ring_src, paged_src, num_slots): every request past the window, permuted ring
    slots, permuted paged-cache slots (``step``)."""
    from rlkv_vllm.ops.views import StepRows

    c = sh.sink + sh.recent
    num_slots = batch + 1
    slot_ids = torch.randperm(num_slots, generator=gen)[:batch].to(torch.int32)
    seq_lens = torch.randint(c + 1, max(c + 2, 32768), (batch,), generator=gen, dtype=torch.int32)
    qsl = torch.arange(batch + 1, dtype=torch.int32)
    kv_perm = torch.randperm(sh.kv_heads, generator=gen)
    ring_src = kv_perm[: sh.ring_heads].sort().values.to(torch.int32)
    paged_src = kv_perm[sh.ring_heads:].sort().values.to(torch.int32)
    slot_mapping = None
    if mode == "step":
        blocks = -(-batch // sh.block_size) + 1
        slot_mapping = torch.randperm(blocks * sh.block_size, generator=gen)[:batch].to(torch.int64)
        slot_mapping = slot_mapping.to(device)
    rows = StepRows(qsl.to(device), seq_lens.to(device), slot_ids.to(device), slot_mapping=slot_mapping,
                    max_query_len=1)
    return rows, ring_src.to(device), paged_src.to(device), num_slots


def bytes_moved(sh: Shape, batch: int, mode: str, act_bytes: int, store_bytes: int) -> int:
    """The traffic a decode step of this layer cannot avoid (module docstring)."""
    d, r, g = sh.head_dim, sh.ring_heads, sh.group
    earlier = sh.sink + sh.recent - 1  # window rows read from the ring; the token's own from k/v
    per_tok = (r * earlier * d * 2 * store_bytes  # ring K/V reads
               + r * d * 2 * store_bytes  # ring K/V write of the token
               + r * d * 2 * act_bytes  # the token's k/v of the ring heads
               + 2 * r * g * d * act_bytes)  # q read + out write
    if mode == "step":
        p = sh.kv_heads - r
        per_tok += p * d * 2 * act_bytes + p * d * 2 * store_bytes + 2 * p * g * d * act_bytes
    return batch * per_tok


# ------------------------------------------------------------------ timing
def time_stack(step, iters: int, device: str, graph: bool) -> float:
    """Microseconds per run of ``step`` (the layer stack)."""
    if device != "cuda":  # the smoke run: wall clock of the interpreter
        step()
        t0 = time.perf_counter()
        for _ in range(iters):
            step()
        return (time.perf_counter() - t0) * 1e6 / iters
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):  # compile + warm up outside any capture
            step()
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    run = step
    if graph:
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            step()
        run = g.replay
    run()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    best = math.inf
    for _ in range(3):  # the best of three measurements
        start.record()
        for _ in range(iters):
            run()
        end.record()
        torch.cuda.synchronize()
        best = min(best, start.elapsed_time(end) * 1e3 / iters)
    return best


def read_bandwidth_gbs(device: str, nbytes: int = 2 << 30) -> float | None:
    """A read-only sum over nbytes: the practical ceiling of a read-bound kernel."""
    if device != "cuda":
        return None
    a = torch.randn(nbytes // 2, dtype=torch.float16, device="cuda")
    acc = torch.empty((), dtype=torch.float32, device="cuda")
    us = time_stack(lambda: torch.sum(a, dtype=torch.float32, out=acc), 20, device, graph=True)
    del a
    return round(nbytes / (us * 1e-6) / 1e9, 1)


# ------------------------------------------------------------------ implementations
# v2 settings timed besides the default (ring heads a program, window block rows, pipeline
# stages, num_warps): 5 stages of 16 rows hold the whole 80-row window in flight; b128 s1 holds
# it in registers instead (no pipelining); h4 covers a slot's 4 ring heads (contiguous rows)
V2_SWEEP = [(1, 16, 3, 4), (1, 16, 5, 8), (1, 32, 3, 4), (1, 128, 1, 8), (2, 16, 5, 4), (2, 16, 5, 8),
            (4, 16, 3, 8), (4, 16, 5, 8)]


def implementations(sh: Shape, sweep: bool) -> dict[str, object]:
    """name -> decode_step callable: v1, v2 (default setting), v2 at other settings."""
    import functools

    from rlkv_vllm.ops import triton_stream as ts

    impls: dict[str, object] = {
        "v1": functools.partial(ts.decode_step, variant="v1"),
        "v2": functools.partial(ts.decode_step, variant="v2"),
    }
    if sweep:
        default = ts.slot_config(sh.group, sh.ring_heads, sh.head_dim, sh.sink, sh.recent)
        for heads, block, stages, warps in V2_SWEEP:
            cfg = ts.SlotConfig(heads=heads, block=block, num_stages=stages, num_warps=warps)
            if cfg == default or heads > ts._next_pow2(sh.ring_heads) or heads * block < 16:
                continue
            impls[f"v2:h{heads}b{block}s{stages}w{warps}"] = functools.partial(ts.decode_step_v2, config=cfg)
    return impls


def check_against_v1(layer: Layer, impls: dict[str, object]) -> dict[str, float | bool]:
    """Every implementation on copies of one layer's state, against v1: stored bytes equal
    (ring, paged cache, q_full), worst output difference relative to the output's max."""

    def run(fn):
        ring_k, ring_v = layer.ring_k.clone(), layer.ring_v.clone()
        kv = layer.kv_cache.clone() if layer.kv_cache is not None else None
        pools = dataclasses.replace(layer.pools, ring_k=ring_k, ring_v=ring_v,
                                    **({} if kv is None else dict(key_cache=kv[0], value_cache=kv[1])))
        out = torch.full_like(layer.out, float("nan"))
        qf = None if layer.q_full is None else torch.full_like(layer.q_full, float("nan"))
        fn(layer.q, layer.k, layer.v, out, qf, layer.rows, pools, layer.scale)
        stored = [ring_k, ring_v] + ([kv] if kv is not None else []) + ([qf] if qf is not None else [])
        return out, stored

    ref_out, ref_stored = run(impls["v1"])
    ring_heads = layer.pools.ring_src.tolist()
    g = layer.q.shape[1] // layer.k.shape[1]
    heads = torch.tensor([h * g + i for h in ring_heads for i in range(g)], device=ref_out.device)
    ref = ref_out[:, heads].float()
    worst, same = 0.0, True
    for name, fn in impls.items():
        if name == "v1":
            continue
        out, stored = run(fn)
        worst = max(worst, float((out[:, heads].float() - ref).abs().max() / ref.abs().max().clamp(min=1e-6)))
        same &= all(torch.equal(a.view(torch.uint8), b.view(torch.uint8)) for a, b in zip(stored, ref_stored))
    return {"max_rel_diff_vs_v1": worst, "stores_equal_v1": bool(same)}


def fp8_query_case(layers: list[Layer], a: argparse.Namespace, device: str) -> dict:
    """An FA3 fp8 layer's decode step: vLLM hands the backend e4m3 queries. ``v2_fp8_queries``: v2 takes
    them with their q_scale (the ring heads' dequantised in registers, the paged heads' gathered as fp8,
    what the backend runs); ``dequantize_then_v2``: ``ops.pools.dequantize_query``'s copy (two
    elementwise kernels over every head) then v2 in bf16, what it ran before. Checked on the first
    layer: the same outputs and stores, and q_full holding the fp8 queries byte for byte."""
    from rlkv_vllm.ops import triton_stream as ts
    from rlkv_vllm.ops.pools import dequantize_query

    q_scale = torch.tensor(0.05, device=device)
    q8 = [(l.q.float() / q_scale).clamp(-448, 448).to(torch.float8_e4m3fn) for l in layers]
    qf8 = [torch.zeros(l.q_full.shape, dtype=torch.float8_e4m3fn, device=device) for l in layers]

    def copy_path(i: int, out=None, pools=None, qf=None) -> None:
        l = layers[i]
        q = dequantize_query(q8[i], q_scale, l.q.dtype)
        ts.decode_step(q, l.k, l.v, l.out if out is None else out, l.q_full if qf is None else qf, l.rows,
                       l.pools if pools is None else pools, l.scale, variant="v2")

    def fp8_path(i: int, out=None, pools=None, qf=None) -> None:
        l = layers[i]
        ts.decode_step(q8[i], l.k, l.v, l.out if out is None else out, qf8[i] if qf is None else qf, l.rows,
                       l.pools if pools is None else pools, l.scale, variant="v2", q_scale=q_scale)

    first = layers[0]
    runs = []
    for path, qf_dtype in ((copy_path, first.q.dtype), (fp8_path, torch.float8_e4m3fn)):
        kv = first.kv_cache.clone()
        pools = dataclasses.replace(first.pools, ring_k=first.ring_k.clone(), ring_v=first.ring_v.clone(),
                                    key_cache=kv[0], value_cache=kv[1])
        out = torch.full_like(first.out, float("nan"))
        qf = torch.zeros(first.q_full.shape, dtype=qf_dtype, device=device)
        path(0, out, pools, qf)
        runs.append((out, [pools.ring_k, pools.ring_v, kv], qf))
    (out_c, stored_c, _), (out_f, stored_f, qf_f) = runs
    heads = first.pools.ring_src.tolist()
    g = first.q.shape[1] // first.k.shape[1]
    ring_q = torch.tensor([h * g + i for h in heads for i in range(g)], device=device)
    paged_q = torch.tensor([h * g + i for h in first.pools.paged_src.tolist() for i in range(g)], device=device)
    same = (torch.equal(out_c[:, ring_q].view(torch.uint8), out_f[:, ring_q].view(torch.uint8))
            and all(torch.equal(x.view(torch.uint8), y.view(torch.uint8)) for x, y in zip(stored_c, stored_f))
            and torch.equal(qf_f.view(torch.uint8), q8[0][:, paged_q].contiguous().view(torch.uint8)))
    res: dict = {"same_results": bool(same)}
    n = len(layers)
    for name, path in (("dequantize_then_v2", copy_path), ("v2_fp8_queries", fp8_path)):
        us = time_stack(lambda path=path: [path(i) for i in range(n)], a.iters, device, graph=not a.no_graph) / n
        res[name] = {"us": round(us, 3)}
    res["saved_us"] = round(res["dequantize_then_v2"]["us"] - res["v2_fp8_queries"]["us"], 3)
    return res


def run_case(sh: Shape, batch: int, mode: str, kv_name: str | None, a: argparse.Namespace, device: str,
             impls: dict[str, object]) -> dict:
    gen = torch.Generator(device="cpu").manual_seed(a.seed + batch)
    kv_dtype = FP8[kv_name] if kv_name else None
    rows, ring_src, paged_src, num_slots = make_rows(sh, batch, mode, gen, device)
    first = Layer(sh, batch, mode, kv_dtype, rows, ring_src, paged_src, num_slots,
                  torch.Generator(device=device).manual_seed(a.seed), device)
    n_layers = 1 if a.smoke else max(4, min(a.max_layers, math.ceil(a.min_mb * 2**20 / first.nbytes())))
    layers = [first] + [Layer(sh, batch, mode, kv_dtype, rows, ring_src, paged_src, num_slots,
                              torch.Generator(device=device).manual_seed(a.seed + i), device)
                        for i in range(1, n_layers)]
    check = check_against_v1(first, impls)
    act = first.q.element_size()
    store = first.ring_k.element_size()
    nbytes = bytes_moved(sh, batch, mode, act, store)
    dtype_name = kv_name or str(first.q.dtype).removeprefix("torch.")
    res = {"shape": sh.name, "q_heads": sh.q_heads, "kv_heads": sh.kv_heads, "ring_heads": sh.ring_heads,
           "head_dim": sh.head_dim, "batch": batch, "mode": mode, "kv_dtype": dtype_name,
           "layers": n_layers, "bytes_per_call": nbytes, **check, "impls": {}}
    for name, fn in impls.items():
        us = time_stack(lambda fn=fn: [layer.call(fn) for layer in layers], a.iters, device,
                        graph=not a.no_graph) / n_layers
        res["impls"][name] = {"us": round(us, 3), "tb_s": round(nbytes / (us * 1e-6) / 1e12, 3)}
    t = res["impls"]
    best = min((n for n in t if n.startswith("v2")), key=lambda n: t[n]["us"])
    res["best_v2"] = best
    res["speedup_v2"] = round(t["v1"]["us"] / t["v2"]["us"], 3)
    res["speedup_best_v2"] = round(t["v1"]["us"] / t[best]["us"], 3)
    if kv_name == "e4m3" and mode == "step":
        res["fp8_queries"] = fp8_query_case(layers, a, device)
    return res


def print_row(r: dict) -> None:
    t = r["impls"]
    b = r["best_v2"]
    print(f"{r['shape']:>8} {r['kv_dtype']:>14} {r['mode']:>4} B={r['batch']:<4} {r['bytes_per_call'] / 1e6:8.2f} MB | "
          f"v1 {t['v1']['us']:9.2f} us {t['v1']['tb_s']:6.3f} TB/s | v2 {t['v2']['us']:9.2f} us "
          f"{t['v2']['tb_s']:6.3f} TB/s x{r['speedup_v2']:.2f} | best {b} {t[b]['us']:.2f} us "
          f"{t[b]['tb_s']:.3f} TB/s x{r['speedup_best_v2']:.2f} | diff {r['max_rel_diff_vs_v1']:.1e} "
          f"stores {'==' if r['stores_equal_v1'] else '!='}", flush=True)
    f = r.get("fp8_queries")
    if f:
        print(f"{'':>8} {'fp8 queries':>14} {r['mode']:>4} B={r['batch']:<4} | dequantize_query + v2 "
              f"{f['dequantize_then_v2']['us']:.2f} us | v2 taking them {f['v2_fp8_queries']['us']:.2f} us | "
              f"saved {f['saved_us']:.2f} us a layer | results {'==' if f['same_results'] else '!='}", flush=True)


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    if a.smoke:
        device = "cpu"
        cases = [(SMOKE_SHAPE, b, m, None) for b in (3,) for m in a.modes]
        cases.append((SMOKE_SHAPE, 3, "step", "e4m3"))
        a.iters = 1
    else:
        if not torch.cuda.is_available():
            print("decode_bench: CUDA is not available; skipping (use --smoke for the CPU check)")
            return 0
        device = "cuda"
        cases = [(SHAPES[s], b, m, None) for s in a.shapes for b in a.batches for m in a.modes]
        if a.fp8 != "none":
            cases += [(SHAPES[s], b, m, a.fp8) for s in a.fp8_shapes for b in a.fp8_batches for m in a.modes]
    import triton

    from rlkv_vllm.ops import triton_stream as ts

    if not ts.HAVE_TRITON:
        print("decode_bench: Triton is not installed; skipping")
        return 0
    info = {"device": torch.cuda.get_device_name(0) if device == "cuda" else "cpu (TRITON_INTERPRET=1)",
            "torch": torch.__version__, "triton": triton.__version__, "smoke": a.smoke,
            "graph": device == "cuda" and not a.no_graph,
            "iters": a.iters, "default_variant": ts.DECODE_STEP_VARIANT}
    try:
        import vllm

        info["vllm"] = vllm.__version__
    except Exception:  # noqa: BLE001 - optional: the kernels need Triton only
        info["vllm"] = None
    info["read_bw_gbs"] = read_bandwidth_gbs(device)
    print(json.dumps(info), flush=True)
    results = []
    t0 = time.time()
    for sh, batch, mode, kv in cases:
        impls = implementations(sh, sweep=not a.no_sweep)
        r = run_case(sh, batch, mode, kv, a, device, impls)
        results.append(r)
        print_row(r)
    print(f"decode_bench: {len(results)} cases in {time.time() - t0:.0f} s", flush=True)
    bad = [r for r in results if not r["stores_equal_v1"] or r["max_rel_diff_vs_v1"] > 2e-2
           or not r.get("fp8_queries", {}).get("same_results", True)]
    for r in bad:
        print(f"MISMATCH v2 vs v1: {r['shape']} B={r['batch']} {r['mode']} {r['kv_dtype']}: "
              f"stores equal {r['stores_equal_v1']}, max rel diff {r['max_rel_diff_vs_v1']:.2e}", flush=True)
    out = a.out or (os.path.join(os.environ["OUT"], "decode_bench.json") if os.environ.get("OUT") else None)
    if out:
        with open(out, "w") as f:
            json.dump({**info, "cases": results}, f, indent=1)
        print(f"wrote {out}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
