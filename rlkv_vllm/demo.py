"""Quick start: a tiny local model served by vLLM with RLKV, one chat request, capacity gain.

Builds the model (random weights + a locally trained tokenizer), starts the
OpenAI-compatible server with ``--attention-backend rlkv``, sends one chat request
through the openai client, and reads vLLM's own KV capacity from /metrics.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time


def measure_stock_capacity(model: str, kv_bytes: int, max_model_len: int, max_num_seqs: int, block_size: int) -> int:
    """Start stock vLLM in this process with the same KV settings; return its own token count."""
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    from vllm import LLM

    llm = LLM(model=model, dtype="float32", kv_cache_memory_bytes=kv_bytes, max_model_len=max_model_len,
              max_num_seqs=max_num_seqs, block_size=block_size, enforce_eager=True, seed=0)
    cc = llm.llm_engine.vllm_config.cache_config
    tokens = int(cc.num_gpu_blocks) * int(cc.block_size)
    llm.llm_engine.engine_core.shutdown()
    return tokens


def failure_reason(log_text: str) -> str:
    """The line of a server log that says why it stopped: RLKV's one-line error, else the first
    ``SomethingError: ...`` line that ends a traceback (vLLM's later ones only say that an earlier
    one happened)."""
    lines = log_text.splitlines()
    for line in lines:
        if line.startswith("rlkv: error:"):
            return line
    for line in lines:
        # a traceback's last line, bare or behind vLLM's "(proc) ERROR date [file:line] " prefix
        m = re.search(r"(?:^|\] )([A-Z]\w*(?:Error|Exception): .*)", line)
        if m:
            return m.group(1)
    return lines[-1] if lines else "(the log is empty)"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="rlkv demo", description=__doc__)
    p.add_argument("--sparsity", type=float, default=0.5,
                   help="rlkv.sparsity: fraction of KV heads made streaming, in [0, 1) (default %(default)s)")
    p.add_argument("--model-dir", default=os.path.join(os.getcwd(), ".cache", "rlkv-tiny"),
                   help="where the tiny model is built (reused if present; default ./.cache/rlkv-tiny)")
    p.add_argument("--kv-cache-bytes", type=int, default=128 << 20,
                   help="KV budget (--kv-cache-memory-bytes) of both the RLKV server and stock vLLM "
                        "(default %(default)s)")
    p.add_argument("--prompt", default="Ada has 3 apples and buys 4 more. How many apples does she have?",
                   help="the chat request's user message")
    p.add_argument("--max-tokens", type=int, default=48, help="tokens to generate (default %(default)s)")
    p.add_argument("--server-log", default=os.path.join(os.getcwd(), ".cache", "rlkv-demo-server.log"),
                   help="where the server's output goes")
    p.add_argument("--build-only", action="store_true",
                   help="only build the tiny model and its head pattern (rlkv_pattern.json), print their paths")
    a = p.parse_args(argv)

    from openai import OpenAI

    from .server import parse_prometheus, start_server
    from .tiny_model import TinyModelSpec, build_tiny_model, random_pattern

    t0 = time.time()
    spec = TinyModelSpec()
    build_tiny_model(a.model_dir, spec)
    pattern = os.path.join(a.model_dir, "rlkv_pattern.json")
    random_pattern(spec).save(pattern)
    if a.build_only:
        print(f"[rlkv demo] tiny model: {a.model_dir}\n[rlkv demo] head pattern: {pattern}")
        return 0
    print(f"[rlkv demo] tiny model ready in {a.model_dir} ({time.time() - t0:.1f}s)", flush=True)
    print(f"[rlkv demo] starting server, log: {a.server_log}", flush=True)

    rlkv = {"heads": pattern, "sparsity": a.sparsity}
    max_len, max_seqs = 2048, 16
    extra = ["--dtype", "float32", "--max-model-len", str(max_len), "--max-num-seqs", str(max_seqs),
             "--kv-cache-memory-bytes", str(a.kv_cache_bytes)]
    os.makedirs(os.path.dirname(os.path.abspath(a.server_log)), exist_ok=True)
    try:
        server = start_server(a.model_dir, rlkv=rlkv, extra_args=extra, log_path=a.server_log)
    except (RuntimeError, TimeoutError) as e:
        reason = str(e).split(" (log:")[0]
        if isinstance(e, RuntimeError):  # it exited: one line of its log says why
            with open(a.server_log, errors="replace") as f:
                reason = failure_reason(f.read())
        print(f"[rlkv demo] the server did not start: {reason}\n[rlkv demo] its log: {a.server_log}",
              file=sys.stderr)
        return 1
    with server:
        print(f"[rlkv demo] server up at {server.base_url} ({time.time() - t0:.1f}s)", flush=True)
        try:
            client = OpenAI(base_url=server.base_url + "/v1", api_key="none")
            reply = client.chat.completions.create(
                model="tiny",
                messages=[{"role": "user", "content": a.prompt}],
                max_tokens=a.max_tokens,
                temperature=0.0,
            )
            answer = reply.choices[0].message.content
            metrics = parse_prometheus(server.get("/metrics"))
        except Exception as e:  # noqa: BLE001 - a first run: one line and where to look
            print(f"[rlkv demo] the request failed: {type(e).__name__}: {e}\n"
                  f"[rlkv demo] the server's log: {a.server_log}", file=sys.stderr)
            return 1

    cache = metrics.get("vllm:cache_config_info", [({}, 0)])[0][0]
    blocks, block_size = int(cache.get("num_gpu_blocks", 0)), int(cache.get("block_size", 0))
    bpt = {lab["cache"]: int(v) for lab, v in metrics.get("rlkv:kv_bytes_per_token", [])}
    ring = int(metrics.get("rlkv:ring_bytes", [({}, 0)])[0][1])
    rlkv_tokens = blocks * block_size
    print(f"[rlkv demo] measuring stock vLLM's capacity with the same KV settings...", flush=True)
    stock_tokens = measure_stock_capacity(a.model_dir, a.kv_cache_bytes, max_len, max_seqs, block_size)
    print()
    print(f"prompt : {a.prompt}")
    print(f"answer : {answer!r}   (random weights: the words are noise, the serving path is real)")
    print(f"usage  : {reply.usage.prompt_tokens} prompt + {reply.usage.completion_tokens} completion tokens")
    print()
    print(f"KV budget {a.kv_cache_bytes / 2**20:.0f} MiB, RLKV sparsity {a.sparsity}:")
    print(f"  RLKV  : {rlkv_tokens:>8,d} tokens  (vLLM's own count: {blocks} blocks x {block_size}; "
          f"{bpt['rlkv']} B/token paged + {ring / 2**20:.2f} MiB ring)")
    print(f"  stock : {stock_tokens:>8,d} tokens  (stock vLLM started with the same settings; {bpt['stock']} B/token)")
    print(f"  KV capacity gain over stock vLLM: {rlkv_tokens / max(1, stock_tokens):.2f}x")
    print()
    print("Next: serve it yourself: `source .venv/bin/activate`, then the README's `rlkv serve` and curl lines.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
