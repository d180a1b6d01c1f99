#!/usr/bin/env python3
"""Engine study: offline vLLM throughput and latency, stock vs RLKV, same workload, same run.

Each config (stock:BACKEND or rlkv:S) starts its own engine in its own process, so GPU
memory is freed between them. The engine core runs in-process and is stepped by hand,
which gives per-request token times (TPOT) and the scheduler's running count per batch.

Throughput (default): --num-prompts random prompts of --input-len tokens, --output-len
tokens each (ignore_eos, temperature 1 unless --temperature), all submitted at once.
Reported per config: engine start, generation seconds, output and total tok/s, KV
capacity (num_gpu_blocks x block_size), mean running requests, TPOT mean/p50/p90,
preemptions; and each config's tok/s, TPOT and capacity over the first stock config.

Latency (--latency): for each --batches x --contexts cell (contexts clipped to
max_model_len), TPOT of --latency-output-len generated tokens, and the decode-only step time
(steps in which every request decoded: a request's TPOT also holds the steps that prefill others).

Steady state (--steady): a closed loop keeps --concurrency requests in the engine (default max_num_seqs +
25%), prompts uniform in --input-range, outputs from --output-dist (reasoning: R1-distill MATH-500 traces,
modelled, see rlkv_vllm/bench/workload.py); output tok/s, mean running, TPOT and step times over --window-s
after --warmup-s, without the ramp or the tail (scripts/gpu/steady_call.sh runs it on the GPU).

  python benchmarks/engine_study.py --configs stock:CPU_ATTN rlkv:0.5 --num-prompts 32 \\
      --input-len 128 --output-len 128 --kv-bytes 33554432 --max-num-seqs 64     # CPU, tiny model
  python3 benchmarks/engine_study.py --model /tmp/llama8b --load-format dummy --pattern P.tsv \\
      --dtype bfloat16 --gpu-mem 0.9 --configs stock:FLASH_ATTN rlkv:0 rlkv:0.5 \\
      --num-prompts 384 --input-len 1024 --output-len 2048 --max-model-len 4096 --deadline-s 560

--deadline-s bounds the whole run (a 10-minute device call): a config is skipped, and
recorded as skipped, when less time is left than the last config took. Results go to
benchmarks/results/<engine|latency>-<device>-vllm<version>-<date>[-tag].json; when the
file exists the new configs are merged into it (same-named ones replaced), so several
device calls build one study. Plot it with benchmarks/plot_study.py.
"""

from __future__ import annotations

import os
import shlex
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))  # run from a checkout without installing

from rlkv_vllm.bench.config import BenchError, OneLineParser, add_bench_args  # noqa: E402
from rlkv_vllm.bench.study import run_from_args  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = OneLineParser(prog="engine_study.py", description=__doc__,
                      formatter_class=__import__("argparse").RawDescriptionHelpFormatter)
    add_bench_args(p, dict(configs=["stock", "rlkv:0", "rlkv:0.5"], num_prompts=64, input_len=512,
                           output_len=1024, max_num_seqs=1024, deadline_s=3600.0, config_timeout_s=1800.0))
    args = sys.argv[1:] if argv is None else argv
    a = p.parse_args(args)
    command = "python " + " ".join([os.path.relpath(os.path.abspath(__file__))] + [shlex.quote(x) for x in args])
    try:
        run_from_args(a, cache_dir=os.path.join(os.path.dirname(HERE), ".cache", "bench-tiny"),
                      results_dir=os.path.join(HERE, "results"), command=command)
    except BenchError as e:
        print(f"engine_study.py: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
