"""``rlkv eval``: one benchmark against an OpenAI-compatible endpoint (``rlkv serve``, stock vLLM, any other).

    rlkv eval --base-url URL --model NAME --task gsm8k|math500|aime24|mbpp|mmlu-pro[:category]|prompts[:math]
              [--data PATH] [--samples K] [--concurrency N] [--max-tokens M] [--temperature T]
              [--limit N] --out FILE.json

Prints a table (pass@1 with its bootstrap 95 % interval, pass@k for K > 1) and writes FILE.json (per item,
per sample: the completion, the extracted answer, the verdict). Completions are cached in FILE.json's
``.cache.jsonl`` as they arrive: run the same command again to resume. Bad input is one line,
``rlkv eval: error: ...``, exit status 2; a server that keeps failing, status 1.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import NoReturn, Sequence

PROG = "rlkv eval"


class _UsageError(Exception):
    """A bad command line (argparse's message, one line)."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # type: ignore[override]
        raise _UsageError(message)


def build_parser() -> argparse.ArgumentParser:
    from rlkv_trainer.eval_tasks import DATA_ENV, TASK_NAMES

    p = _Parser(prog=PROG, description="Accuracy of a served model on a benchmark, through its OpenAI-compatible "
                                       "chat endpoint; prints a table and writes per-sample JSON.")
    p.add_argument("--base-url", required=True, metavar="URL", help="the server's OpenAI base URL, e.g. "
                   "http://localhost:8000/v1")
    p.add_argument("--model", required=True, metavar="NAME", help="the served model name (--served-model-name)")
    p.add_argument("--task", required=True, metavar="TASK",
                   help=f"one of {', '.join(TASK_NAMES)}, or mmlu-pro:CATEGORY (e.g. mmlu-pro:law); prompts: your own "
                        "JSONL {prompt, answer} sent as it is, graded by the last number (prompts:math: math-verify)")
    p.add_argument("--data", metavar="PATH", help="the benchmark's local file in its public format (JSONL, "
                   f"parquet) or a Hugging Face dataset folder; default: ${DATA_ENV}/<task file> "
                   "(gsm8k_test.jsonl, math500_test.jsonl, aime24_test.jsonl, mbpp.jsonl, mmlu_pro_test.parquet)")
    p.add_argument("--split", metavar="NAME", help="a dataset folder's split; for mbpp: test (task ids 11-510, "
                   "the default) or full")
    p.add_argument("--samples", type=int, default=1, metavar="K", help="completions per item (default 1)")
    p.add_argument("--concurrency", type=int, default=8, metavar="N", help="requests in flight (default 8)")
    p.add_argument("--max-tokens", type=int, default=2048, metavar="M", help="per completion (default 2048)")
    p.add_argument("--temperature", type=float, default=None, metavar="T",
                   help="default 0 (greedy) for one sample, 0.6 for more (top-p then 0.95)")
    p.add_argument("--top-p", type=float, default=None, metavar="P", help="default 1 greedy, 0.95 sampled")
    p.add_argument("--seed", type=int, default=None, help="sample j is sent with seed + j (default: none sent)")
    p.add_argument("--limit", type=int, default=None, metavar="N", help="only the first N items")
    p.add_argument("--think-end", default=None, metavar="TAG", help="grade only the text after the last TAG "
                   "(e.g. '</think>' for a reasoning model served without a reasoning parser)")
    p.add_argument("--api-key", default=None, help="bearer token (default $OPENAI_API_KEY, else none)")
    p.add_argument("--retries", type=int, default=5, help="further attempts per request after a connection "
                   "error, a timeout, 429 or 5xx (default 5, with exponential backoff)")
    p.add_argument("--request-timeout", type=float, default=600.0, metavar="S", help="per request (default 600)")
    p.add_argument("--cache", default=None, metavar="FILE", help="completion cache (default: OUT with "
                   ".cache.jsonl for .json); one per server configuration")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--out", required=True, metavar="FILE.json", help="where the results go")
    return p


def default_cache_path(out: str) -> str:
    base = out[:-5] if out.endswith(".json") else out
    return base + ".cache.jsonl"


def main(argv: Sequence[str] | None = None) -> int:
    """``rlkv eval`` entry point; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # --help
        return int(e.code or 0)
    except _UsageError as e:
        return _fail(f"{e} (see {PROG} --help)", 2)
    from rlkv_trainer.data import DataError
    from rlkv_trainer.eval_client import EndpointError
    from rlkv_trainer.eval_tasks import DATA_ENV, default_data_path, get_task
    from rlkv_trainer.evaluate import evaluate
    from rlkv_trainer.sandbox import SandboxError

    cache = args.cache or default_cache_path(args.out)
    try:
        task = get_task(args.task)
        data = args.data or default_data_path(task)
        if data is None:
            raise DataError(f"--data is required (or set {DATA_ENV} to a folder holding {task.default_file})")
        result = evaluate(args.base_url, args.model, task, data=data, samples=args.samples,
                          concurrency=args.concurrency, max_tokens=args.max_tokens, temperature=args.temperature,
                          top_p=args.top_p, seed=args.seed, limit=args.limit, split=args.split, cache_path=cache,
                          api_key=args.api_key, retries=args.retries, request_timeout_s=args.request_timeout,
                          think_end=args.think_end, progress=not args.no_progress)
    except (DataError, ValueError, SandboxError) as e:
        return _fail(str(e), 2)
    except EndpointError as e:
        return _fail(f"{e}; finished completions are cached in {cache}: the same command resumes", 1, "failed")
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted; finished completions are cached in {cache}: the same command resumes",
              file=sys.stderr)
        sys.stderr.flush()
        os._exit(130)  # the requests in flight would keep the interpreter waiting at exit
    print(result.table())
    result.write(args.out)
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


def _fail(message: str, code: int, word: str = "error") -> int:
    print(f"{PROG}: {word}: {' '.join(message.split())}", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
