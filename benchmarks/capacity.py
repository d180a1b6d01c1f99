#!/usr/bin/env python3
"""KV capacity: stock vLLM vs RLKV at several sparsities, same KV budget, same run.

Each engine starts in its own process; capacity is vLLM's own count
(num_gpu_blocks x block_size). The ideal is (budget - ring bytes) / bytes per token
of the full heads. Prints a table and writes benchmarks/results/capacity-<device>-<date>.json.

  python benchmarks/capacity.py                        # tiny local model on this machine
  python benchmarks/capacity.py --model DIR --load-format dummy --pattern FILE --dtype bfloat16
  python benchmarks/capacity.py --gpu-mem 0.5          # GPU: vLLM profiles the budget itself

With --gpu-mem the budget is vLLM's profiled one; the ring is allocated while the model
loads, so vLLM counts it like weights. The budget is then read off the stock run
(its capacity x stock bytes per token).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))  # run from a checkout without installing

from rlkv_vllm.bench.config import BenchSettings, EngineConfig  # noqa: E402
from rlkv_vllm.bench.driver import device_name, engine_kwargs, rlkv_plan_figures  # noqa: E402
from rlkv_vllm.bench.study import tiny_defaults  # noqa: E402

SPARSITIES = [0.0, 0.2, 0.4, 0.5, 0.6, 0.8]


def measure_one(a: argparse.Namespace, sparsity: float | None) -> dict:
    """Start one engine (stock if sparsity is None) and report its capacity."""
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    from vllm import LLM

    s = BenchSettings(model=a.model, pattern=a.pattern, dtype=a.dtype, load_format=a.load_format,
                      kv_bytes=a.kv_bytes, gpu_mem=a.gpu_mem, max_num_seqs=a.max_num_seqs,
                      max_model_len=a.max_model_len, block_size=a.block_size, enforce_eager=True)
    cfg = EngineConfig("stock") if sparsity is None else EngineConfig("rlkv", sparsity=sparsity)
    llm = LLM(**engine_kwargs(s, cfg))
    cc = llm.llm_engine.vllm_config.cache_config
    out = {"sparsity": sparsity, "num_blocks": int(cc.num_gpu_blocks), "block_size": int(cc.block_size),
           "capacity_tokens": int(cc.num_gpu_blocks) * int(cc.block_size)}
    if sparsity is not None:
        out.update(rlkv_plan_figures())
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="model dir (default: the tiny local model)")
    p.add_argument("--pattern", default=None, help="head pattern (default: a random one for the tiny model)")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--load-format", default="auto")
    p.add_argument("--kv-bytes", type=int, default=256 << 20)
    p.add_argument("--gpu-mem", type=float, default=0.0, help="profiled budget (GPU) instead of --kv-bytes")
    p.add_argument("--max-num-seqs", type=int, default=64)
    p.add_argument("--max-model-len", type=int, default=4096)
    p.add_argument("--block-size", type=int, default=0)
    p.add_argument("--sparsities", default=",".join(map(str, SPARSITIES)))
    p.add_argument("--out", default=os.path.join(HERE, "results"))
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)
    a = p.parse_args()

    if a.model is None or a.pattern is None:
        model, pattern = tiny_defaults(os.path.join(os.path.dirname(HERE), ".cache", "bench-tiny"))
        a.model, a.pattern = a.model or model, a.pattern or pattern

    if a.one is not None:
        res = measure_one(a, None if a.one == "stock" else float(a.one))
        print("RESULT " + json.dumps(res), flush=True)
        return 0

    rows = []
    for label in ["stock"] + a.sparsities.split(","):
        cmd = [sys.executable, os.path.abspath(__file__), "--one", label, "--model", a.model, "--pattern", a.pattern,
               "--dtype", a.dtype, "--load-format", a.load_format, "--kv-bytes", str(a.kv_bytes),
               "--gpu-mem", str(a.gpu_mem),
               "--max-num-seqs", str(a.max_num_seqs), "--max-model-len", str(a.max_model_len),
               "--block-size", str(a.block_size)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        line = next((l for l in proc.stdout.splitlines() if l.startswith("RESULT ")), None)
        if proc.returncode or line is None:
            print(proc.stdout[-3000:], proc.stderr[-3000:], file=sys.stderr)
            raise SystemExit(f"engine for {label} failed")
        rows.append(json.loads(line[7:]))
        print(f"  measured {label}: {rows[-1]['capacity_tokens']:,} tokens", flush=True)

    stock = rows[0]["capacity_tokens"]
    # explicit budget, or (profiled) what the stock run got: its blocks x stock bytes per token
    budget = a.kv_bytes if not a.gpu_mem else stock * rows[1]["stock_bytes_per_token"]
    for r in rows[1:]:
        r["ideal_tokens"] = (budget - r["ring_bytes"]) / r["ideal_bytes_per_token"]
        r["ratio_to_ideal"] = r["capacity_tokens"] / r["ideal_tokens"]
    print()
    how = f"profiled, gpu_memory_utilization {a.gpu_mem}" if a.gpu_mem else "kv_cache_memory_bytes"
    print(f"KV budget {budget / 2**20:.0f} MiB ({how}), model {a.model}, dtype {a.dtype}")
    print(f"{'sparsity':>8} {'full':>9} {'capacity':>10} {'ideal':>10} {'/ideal':>7} {'vs stock':>9} {'ring MiB':>9}")
    print(f"{'stock':>8} {'':>9} {stock:>10,d} {'':>10} {'':>7} {1.0:>8.2f}x {'':>9}")
    for r in rows[1:]:
        r["gain_vs_stock"] = r["capacity_tokens"] / stock
        print(f"{r['sparsity']:>8.2f} {r['full_heads']:>4d}/{r['total_heads']:<4d} {r['capacity_tokens']:>10,d} "
              f"{r['ideal_tokens']:>10,.0f} {r['ratio_to_ideal']:>7.3f} {r['gain_vs_stock']:>8.2f}x "
              f"{r['ring_bytes'] / 2**20:>9.2f}")
    import vllm

    date = datetime.date.today().isoformat()
    dev = device_name()
    result = {"study": "capacity", "device": dev, "vllm": vllm.__version__, "date": date,
              "command": "python " + " ".join([os.path.relpath(sys.argv[0])] + sys.argv[1:]),
              "kv_bytes": budget, "budget_mode": how, "model": a.model, "pattern": a.pattern, "dtype": a.dtype,
              "stock_capacity_tokens": stock, "rows": rows[1:]}
    os.makedirs(a.out, exist_ok=True)
    tag = f"-gpumem{a.gpu_mem:g}" if a.gpu_mem else ""
    path = os.path.join(a.out, f"capacity-{dev.replace(' ', '_')}-{date}{tag}.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
    print(f"\nwrote {os.path.relpath(path)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
