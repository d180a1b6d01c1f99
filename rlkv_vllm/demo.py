"""Quick start: a tiny model that answers, served by vLLM with RLKV and by stock vLLM, the same question to
both, and the KV capacity each has.

The model is the planted-recall fixture (benchmarks/fixtures/planted-recall, trained by
benchmarks/planted_task.py): it reads a prompt of syllables holding one number and answers the number. The
number sits beyond a streaming head's window, so RLKV answers right only if the heads its pattern keeps
full are the ones that fetch it; the pattern is the one ``rlkv train`` learned on this fixture. Each server
gets one greedy chat request through the openai client; KV capacities are vLLM's own, from /metrics.
``--build-only`` builds the random-weight tiny model the README's own ``rlkv serve`` lines use.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time


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


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PLANTED = os.path.join(REPO, "benchmarks", "fixtures", "planted-recall")
PLANTED_PATTERN = os.path.join(REPO, "benchmarks", "results", "planted-heads-pattern-correctness.json")
# one prompt of the fixture's task (benchmarks/planted_task.py): 48 words with a number among them, then "?";
# the answer is the number. It sits 39 words before the end: outside a streaming head's window (sink 4 +
# recent 8), so only a full head can fetch it
DEMO_PROMPT = ("da po pa ga ko ki na pe bo 38 pi ke pa ba ki no do ti ta ba ba me ti ka di ke ba do ki ko do do "
               "do ki ge ba pi me na de to po bo gi no ni te ke ?")
DEMO_WINDOW = {"sink": 4, "recent": 8}  # the window the fixture and its pattern were trained for


def _ask(server, prompt: str, max_tokens: int) -> tuple[str, int, int]:
    """One greedy chat request: (the answer's text, prompt tokens, completion tokens)."""
    from openai import OpenAI

    client = OpenAI(base_url=server.base_url + "/v1", api_key="none")
    reply = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": prompt}],
                                           max_tokens=max_tokens, temperature=0.0)
    return reply.choices[0].message.content or "", reply.usage.prompt_tokens, reply.usage.completion_tokens


def _capacity(metrics: dict) -> tuple[int, int]:
    """vLLM's own KV capacity from /metrics: (tokens, block size)."""
    cache = metrics.get("vllm:cache_config_info", [({}, 0)])[0][0]
    blocks, block_size = int(cache.get("num_gpu_blocks", 0)), int(cache.get("block_size", 0))
    return blocks * block_size, block_size


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="rlkv demo", description=__doc__)
    p.add_argument("--sparsity", type=float, default=0.5,
                   help="rlkv.sparsity: fraction of KV heads made streaming, in [0, 1) (default %(default)s)")
    p.add_argument("--model-dir", default=os.path.join(os.getcwd(), ".cache", "rlkv-tiny"),
                   help="where --build-only builds the random-weight tiny model (default ./.cache/rlkv-tiny)")
    p.add_argument("--kv-cache-bytes", type=int, default=32 << 20,
                   help="KV budget (--kv-cache-memory-bytes) of both the RLKV and the stock server "
                        "(default %(default)s)")
    p.add_argument("--prompt", default=DEMO_PROMPT,
                   help="the chat request's user message: the fixture's words and numbers 0-63, ending in '?'")
    p.add_argument("--max-tokens", type=int, default=1, help="tokens to generate (default %(default)s: the answer is one)")
    p.add_argument("--server-log", default=os.path.join(os.getcwd(), ".cache", "rlkv-demo-server.log"),
                   help="where the servers' output goes (the stock server's beside it, -stock.log)")
    p.add_argument("--build-only", action="store_true",
                   help="only build the random-weight tiny model and its head pattern (rlkv_pattern.json) for "
                        "your own `rlkv serve`, print their paths")
    a = p.parse_args(argv)
    if not 0.0 <= a.sparsity < 1.0:
        p.error(f"--sparsity {a.sparsity} is not allowed: must be in [0, 1)")

    from .server import parse_prometheus, start_server

    t0 = time.time()
    if a.build_only:
        from .tiny_model import TinyModelSpec, build_tiny_model, random_pattern

        spec = TinyModelSpec()
        build_tiny_model(a.model_dir, spec)
        pattern = os.path.join(a.model_dir, "rlkv_pattern.json")
        random_pattern(spec).save(pattern)
        print(f"[rlkv demo] tiny model: {a.model_dir}\n[rlkv demo] head pattern: {pattern}")
        return 0
    for path in (PLANTED, PLANTED_PATTERN):
        if not os.path.exists(path):
            print(f"[rlkv demo] {path} is missing: the demo runs from a checkout of the repository", file=sys.stderr)
            return 1
    os.makedirs(os.path.dirname(os.path.abspath(a.server_log)), exist_ok=True)
    extra = ["--dtype", "float32", "--max-model-len", "128", "--max-num-seqs", "8",
             "--kv-cache-memory-bytes", str(a.kv_cache_bytes)]
    runs: dict[str, dict] = {}
    configs = [("RLKV", {"heads": PLANTED_PATTERN, "sparsity": a.sparsity, **DEMO_WINDOW}, a.server_log),
               ("stock", None, a.server_log[:-4] + "-stock.log" if a.server_log.endswith(".log")
                else a.server_log + "-stock")]
    print(f"[rlkv demo] model: the planted-recall fixture ({PLANTED}), a 4-layer Llama trained here to recall "
          f"a number; head pattern learned by `rlkv train` on it (benchmarks/planted_heads.py)", flush=True)
    for name, rlkv, log in configs:
        print(f"[rlkv demo] starting the {name} server, log: {log}", flush=True)
        try:
            server = start_server(PLANTED, rlkv=rlkv, extra_args=extra, log_path=log)
        except (RuntimeError, TimeoutError) as e:
            reason = str(e).split(" (log:")[0]
            if isinstance(e, RuntimeError):  # it exited: one line of its log says why
                with open(log, errors="replace") as f:
                    reason = failure_reason(f.read())
            print(f"[rlkv demo] the {name} server did not start: {reason}\n[rlkv demo] its log: {log}",
                  file=sys.stderr)
            return 1
        with server:
            try:
                answer, n_prompt, n_out = _ask(server, a.prompt, a.max_tokens)
                metrics = parse_prometheus(server.get("/metrics"))
            except Exception as e:  # noqa: BLE001 - a first run: one line and where to look
                print(f"[rlkv demo] the request failed: {type(e).__name__}: {e}\n"
                      f"[rlkv demo] the server's log: {log}", file=sys.stderr)
                return 1
        tokens, block_size = _capacity(metrics)
        bpt = {lab["cache"]: int(v) for lab, v in metrics.get("rlkv:kv_bytes_per_token", [])}
        ring = int(metrics.get("rlkv:ring_bytes", [({}, 0)])[0][1])
        runs[name] = dict(answer=answer.strip(), prompt_tokens=n_prompt, completion_tokens=n_out, tokens=tokens,
                          bpt=bpt, ring=ring)
        print(f"[rlkv demo] {name}: answered {answer.strip()!r} ({time.time() - t0:.0f}s)", flush=True)
    words = a.prompt.split()
    numbers = [(i, w) for i, w in enumerate(words) if w.isdigit()]
    r, s = runs["RLKV"], runs["stock"]
    print()
    print(f"prompt : {a.prompt}")
    if len(numbers) == 1:
        i, w = numbers[0]
        print(f"         (the number {w} is word {i + 1} of {len(words)}: {len(words) - i - 1} words before the end, "
              f"outside a streaming head's window of {DEMO_WINDOW['sink']} + {DEMO_WINDOW['recent']} tokens)")
    print(f"RLKV   : {r['answer']!r}   (sparsity {a.sparsity}: {100 * a.sparsity:.0f}% of the KV heads keep only "
          f"{DEMO_WINDOW['sink']} + {DEMO_WINDOW['recent']} tokens)")
    print(f"stock  : {s['answer']!r}   (stock vLLM, every head's full KV cache)")
    if len(numbers) == 1:
        right = [n for n in ("RLKV", "stock") if runs[n]["answer"] == numbers[0][1]]
        print(f"correct: {' and '.join(right) if right else 'neither'} (the answer is {numbers[0][1]})")
    print()
    print(f"KV budget {a.kv_cache_bytes / 2**20:.0f} MiB each:")
    print(f"  RLKV  : {r['tokens']:>8,d} tokens  (vLLM's own count; {r['bpt'].get('rlkv', 0)} B/token paged "
          f"+ {r['ring'] / 2**20:.2f} MiB ring)")
    print(f"  stock : {s['tokens']:>8,d} tokens  (vLLM's own count)")
    print(f"  KV capacity gain over stock vLLM: {r['tokens'] / max(1, s['tokens']):.2f}x")
    print()
    print("Next: serve a model yourself: `source .venv/bin/activate`, then the README's `rlkv serve` and curl lines.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
