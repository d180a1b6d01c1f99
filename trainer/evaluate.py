"""``evaluate()``: one benchmark against one OpenAI-compatible endpoint, graded, with its statistics.

A sparsity sweep calls it once per server configuration (each with its own cache file). The result holds
per item, per sample, the completion, the extracted answer and the verdict; :meth:`EvalResult.table` is
what ``rlkv eval`` prints and :meth:`EvalResult.to_json` what it writes.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from rlkv_trainer.eval_client import ChatSampler, Completion, CompletionCache, Request, Sampling
from rlkv_trainer.eval_stats import Summary, summarize
from rlkv_trainer.eval_tasks import EvalItem, Task, describe_prompts, get_task, load_items
from rlkv_trainer.grading import GradeItem, Grader, Verdict

SCHEMA = "rlkv-eval/1"


@dataclass(frozen=True)
class SampleResult:
    """One sample of one item: the completion and its verdict."""

    completion: Completion
    verdict: Verdict

    def to_json(self, index: int) -> dict[str, Any]:
        c, v = self.completion, self.verdict
        return {"sample": index, "text": c.text, "finish_reason": c.finish_reason,
                "completion_tokens": c.completion_tokens, "cached": c.cached, "extracted": v.extracted,
                "correct": v.correct, "status": v.status, "detail": v.detail}


@dataclass(frozen=True)
class ItemResult:
    """An item and its samples."""

    item: EvalItem
    samples: tuple[SampleResult, ...]

    @property
    def correct(self) -> int:
        return sum(s.verdict.correct for s in self.samples)

    def to_json(self) -> dict[str, Any]:
        return {"id": self.item.id, "gold": self.item.gold, "kind": self.item.kind, "meta": dict(self.item.meta),
                "prompt": self.item.prompt, "correct": self.correct,
                "pass_at_1": self.correct / len(self.samples),
                "samples": [s.to_json(j) for j, s in enumerate(self.samples)]}


@dataclass
class EvalResult:
    """Everything about one run (see :meth:`to_json` for the file's layout)."""

    task: Task
    model: str
    base_url: str
    data: str
    sampling: Sampling
    summary: Summary
    items: list[ItemResult]
    prompts: dict[str, Any]
    requests: dict[str, Any]
    seconds: float
    started_at: str
    sandbox: dict[str, Any] | None = None
    options: dict[str, Any] = field(default_factory=dict)

    def statuses(self) -> dict[str, int]:
        return dict(Counter(s.verdict.status for r in self.items for s in r.samples))

    def to_json(self) -> dict[str, Any]:
        """``{"schema", "task", "model", "base_url", "data", "sampling", "prompts", "grading", "summary",
        "requests", "seconds", "started_at", "options", "items": [{"id", "gold", ..., "samples": [...]}]}``."""
        return {
            "schema": SCHEMA, "task": self.task.label, "model": self.model, "base_url": self.base_url,
            "data": self.data, "sampling": self.sampling.to_json(), "prompts": self.prompts,
            "grading": {"kind": self.task.kind, "statuses": self.statuses(), "sandbox": self.sandbox},
            "summary": self.summary.to_json(), "requests": self.requests, "seconds": round(self.seconds, 3),
            "started_at": self.started_at, "options": self.options,
            "items": [r.to_json() for r in self.items],
        }

    def table(self) -> str:
        """The printed summary: one row of numbers, then the verdict statuses and what was sent."""
        s = self.summary
        head = ["task", "model", "items", "samples", "pass@1", "95% CI"] + [f"pass@{k}" for k in s.pass_at_k if k > 1]
        head.append("answered")
        row = [self.task.label, self.model, str(s.items), str(s.samples), _pct(s.pass_at_1),
               f"[{_pct(s.ci95[0])}, {_pct(s.ci95[1])}]"] + [_pct(v) for k, v in s.pass_at_k.items() if k > 1]
        row.append(_pct(s.answered))
        widths = [max(len(h), len(c)) for h, c in zip(head, row)]
        lines = ["  ".join(x.ljust(w) for x, w in zip(line, widths)).rstrip() for line in (head, row)]
        statuses = ", ".join(f"{k} {v}" for k, v in sorted(self.statuses().items()))
        r = self.requests
        lines.append(f"verdicts: {statuses}; requests: {r['sent']} sent, {r['cached']} from the cache, "
                     f"{r['retried']} retried; {self.seconds:.1f} s")
        return "\n".join(lines)

    def write(self, path: str) -> None:
        """Write :meth:`to_json` atomically (a temporary file, then rename)."""
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        tmp = f"{path}.tmp-{os.getpid()}"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(self.to_json(), f, indent=1, ensure_ascii=False)
            f.write("\n")
        os.replace(tmp, path)


def _pct(x: float) -> str:
    return "n/a" if x != x else f"{100 * x:.1f}%"


def default_sampling(samples: int, max_tokens: int, temperature: float | None, top_p: float | None,
                     seed: int | None) -> Sampling:
    """Greedy for one sample; with K > 1, DeepSeek-R1's recommended temperature 0.6, top-p 0.95 unless given."""
    if temperature is None:
        temperature = 0.0 if samples == 1 else 0.6
    if top_p is None:
        top_p = 1.0 if temperature == 0.0 else 0.95
    return Sampling(max_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=seed)


def evaluate(base_url: str, model: str, task: str | Task, *, data: str, samples: int = 1, concurrency: int = 8,
             max_tokens: int = 2048, temperature: float | None = None, top_p: float | None = None,
             seed: int | None = None, limit: int | None = None, split: str | None = None,
             cache_path: str | None = None, api_key: str | None = None, retries: int = 5, backoff_s: float = 1.0,
             request_timeout_s: float = 600.0, think_end: str | None = None, grader: Grader | None = None,
             progress: bool = True, bootstrap_seed: int = 0) -> EvalResult:
    """Run ``task`` (``"gsm8k"``, ``"mmlu-pro:law"``, or a :class:`Task`) on ``data`` against ``base_url``.

    ``samples`` completions per item (pass@1 is their mean per item, averaged over items); ``limit`` keeps
    the first N items; ``cache_path`` (JSONL) makes an interrupted run resume; ``think_end`` grades only
    the text after it; ``grader`` reuses a pool (default: a fresh one, closed at the end). Raises
    ``DataError`` (data), ``EndpointError`` (the server), ``ValueError`` (arguments), each one line.
    """
    if samples < 1:
        raise ValueError(f"--samples must be >= 1, got {samples}")
    if concurrency < 1:
        raise ValueError(f"--concurrency must be >= 1, got {concurrency}")
    if max_tokens < 1:
        raise ValueError(f"--max-tokens must be >= 1, got {max_tokens}")
    if limit is not None and limit < 1:
        raise ValueError(f"--limit must be >= 1, got {limit}")
    spec = get_task(task) if isinstance(task, str) else task
    started_at = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    start = time.monotonic()
    items = load_items(spec, data, split=split, limit=limit)
    sampling = default_sampling(samples, max_tokens, temperature, top_p, seed)
    requests = [Request((("user", it.prompt),), j) for it in items for j in range(samples)]
    sampler = ChatSampler(base_url, model, concurrency=concurrency, retries=retries, backoff_s=backoff_s,
                          timeout_s=request_timeout_s, api_key=api_key)
    cache = CompletionCache(cache_path)
    try:
        completions = sampler.complete(requests, sampling, cache, progress=progress, desc=f"{spec.label} {model}")
    finally:
        cache.close()
    own = grader is None
    pool = grader or Grader(think_end=think_end)
    sandbox = None
    if spec.kind == "mbpp":
        from rlkv_trainer.sandbox import describe

        sandbox = describe(limits=pool.sandbox)  # the mode and limits the runs get (fails early if none works)
    try:
        verdicts = pool.grade(GradeItem(c.text, it.gold, it.kind) for c, it in
                              zip(completions, (it for it in items for _ in range(samples))))
    finally:
        if own:
            pool.close()
    results = [ItemResult(it, tuple(SampleResult(completions[i * samples + j], verdicts[i * samples + j])
                                    for j in range(samples))) for i, it in enumerate(items)]
    summary = summarize([[s.verdict.correct for s in r.samples] for r in results],
                        [[s.verdict.extracted is not None for s in r.samples] for r in results], seed=bootstrap_seed)
    cached = sum(c.cached for c in completions)
    return EvalResult(
        task=spec, model=model, base_url=base_url, data=os.path.abspath(data), sampling=sampling, summary=summary,
        items=results, prompts=describe_prompts(spec, items),
        requests={"total": len(requests), "sent": len(requests) - cached, "cached": cached,
                  "retried": sampler.retried, "concurrency": concurrency, "cache": cache_path},
        seconds=time.monotonic() - start, started_at=started_at, sandbox=sandbox,
        options={"limit": limit, "split": split, "think_end": think_end, "bootstrap_seed": bootstrap_seed,
                 "samples": samples})

