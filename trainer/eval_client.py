"""Completions from an OpenAI-compatible server for ``rlkv eval``: the openai client, bounded concurrency,
retries with backoff, a progress bar, and a cache on disk so an interrupted run resumes.

The cache is a JSONL file, one line per finished completion, keyed by a hash of everything that decides it:
the model name, the base URL, the messages, the sampling parameters and the sample's index (sample j of an
item is its own request, with seed ``seed + j`` when a seed is given). Lines are appended (and flushed) as
completions arrive, so a killed run loses at most the requests in flight; a torn last line is skipped.
The cache belongs to one server configuration: a server restarted at the same URL with other settings (a
sparsity sweep) needs another cache file (``rlkv eval`` keeps one per ``--out`` file).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import time
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import asdict, dataclass
from typing import Any, Sequence

logger = logging.getLogger(__name__)


class EndpointError(RuntimeError):
    """The server refused a request (bad model name, bad request) or kept failing past the retries; one line."""


@dataclass(frozen=True)
class Sampling:
    """Sampling parameters of every request: ``max_tokens``, ``temperature``, ``top_p``, and ``seed`` (sample j
    is sent with ``seed + j``; ``None`` sends none)."""

    max_tokens: int
    temperature: float
    top_p: float = 1.0
    seed: int | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Request:
    """One completion to get: the chat messages and the sample index."""

    messages: tuple[tuple[str, str], ...]
    sample: int

    def as_messages(self) -> list[dict[str, str]]:
        return [{"role": role, "content": content} for role, content in self.messages]


@dataclass(frozen=True)
class Completion:
    """A finished completion: ``text`` (the message content), ``finish_reason``, ``completion_tokens``, whether
    it came from the cache, and the attempts it took (1 = no retry; 0 = cached)."""

    text: str
    finish_reason: str | None
    completion_tokens: int | None
    cached: bool
    attempts: int


def request_key(model: str, base_url: str, request: Request, sampling: Sampling) -> str:
    """sha256 of what decides a completion (see the module docstring)."""
    payload = {"model": model, "base_url": base_url.rstrip("/"), "messages": request.as_messages(),
               "sample": request.sample, **sampling.to_json()}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


class CompletionCache:
    """Finished completions on disk (JSONL, appended); ``path=None`` keeps them in memory only."""

    def __init__(self, path: str | None) -> None:
        self.path = path
        self._entries: dict[str, dict[str, Any]] = {}
        self._lock = threading.Lock()
        if path and os.path.exists(path):
            with open(path, encoding="utf-8") as f:
                for line in f:
                    try:
                        entry = json.loads(line)
                        self._entries[entry["key"]] = entry
                    except (json.JSONDecodeError, KeyError, TypeError):
                        continue  # a line torn by a kill mid-write
        self._file = None
        if path:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            self._file = open(path, "a", encoding="utf-8")

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: str) -> Completion | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        return Completion(entry["text"], entry.get("finish_reason"), entry.get("completion_tokens"), True, 0)

    def put(self, key: str, completion: Completion) -> None:
        entry = {"key": key, "text": completion.text, "finish_reason": completion.finish_reason,
                 "completion_tokens": completion.completion_tokens}
        with self._lock:
            self._entries[key] = entry
            if self._file is not None:
                self._file.write(json.dumps(entry, ensure_ascii=False) + "\n")
                self._file.flush()

    def close(self) -> None:
        with self._lock:
            if self._file is not None:
                self._file.close()
                self._file = None


# status codes worth another try: timeouts, conflicts, rate limits, server errors
_RETRY_STATUS = {408, 409, 425, 429, 500, 502, 503, 504}


def _one_line(text: str, limit: int = 300) -> str:
    return " ".join(str(text).split())[:limit]


class ChatSampler:
    """Sends chat requests to ``base_url`` (``http://host:port/v1``) for ``model``.

    Args:
        concurrency: requests in flight at once.
        retries: further attempts after a failed one (connection errors, timeouts, 408/409/425/429/5xx),
            waiting ``backoff_s * 2**attempt`` (at most 30 s) in between; other errors (400, 401, 404) stop.
        timeout_s: per request.
        api_key: sent as the bearer token (``EMPTY`` when the server wants none).
    """

    def __init__(self, base_url: str, model: str, *, concurrency: int = 8, retries: int = 5,
                 backoff_s: float = 1.0, timeout_s: float = 600.0, api_key: str | None = None) -> None:
        import openai

        self.base_url, self.model = base_url, model
        self.concurrency, self.retries, self.backoff_s = concurrency, retries, backoff_s
        self._openai = openai
        self._client = openai.OpenAI(base_url=base_url, api_key=api_key or os.environ.get("OPENAI_API_KEY") or "EMPTY",
                                     timeout=timeout_s, max_retries=0)
        self.retried = 0  # attempts that failed and were tried again, over all requests
        self._lock = threading.Lock()

    def _create(self, request: Request, sampling: Sampling) -> Completion:
        params: dict[str, Any] = {"model": self.model, "messages": request.as_messages(),
                                  "max_tokens": sampling.max_tokens, "temperature": sampling.temperature,
                                  "top_p": sampling.top_p, "n": 1}
        if sampling.seed is not None:
            params["seed"] = sampling.seed + request.sample
        oa = self._openai
        for attempt in range(self.retries + 1):
            try:
                reply = self._client.chat.completions.create(**params)
                choice = reply.choices[0]
                tokens = reply.usage.completion_tokens if reply.usage is not None else None
                return Completion(choice.message.content or "", choice.finish_reason, tokens, False, attempt + 1)
            except (oa.APIConnectionError, oa.APIStatusError) as e:  # APITimeoutError is a connection error
                status = getattr(e, "status_code", None)
                retryable = status is None or status in _RETRY_STATUS
                what = f"HTTP {status}: {_one_line(getattr(e, 'message', e))}" if status else _one_line(
                    f"{type(e).__name__}: {e}")
                if not retryable:
                    raise EndpointError(f"{self.base_url} refused the request ({what})") from None
                if attempt == self.retries:
                    raise EndpointError(f"{self.base_url}: request failed {attempt + 1} times, last: {what}") from None
                with self._lock:
                    self.retried += 1
                logger.info("request failed (%s); retry %d of %d", what, attempt + 1, self.retries)
                time.sleep(min(30.0, self.backoff_s * 2 ** attempt))
        raise AssertionError("unreachable")

    def complete(self, requests: Sequence[Request], sampling: Sampling, cache: CompletionCache, *,
                 progress: bool = True, desc: str = "") -> list[Completion]:
        """One completion per request, in order: cached ones first, the rest sent ``concurrency`` at a time.

        The first request that fails for good stops the run (``EndpointError``); what finished is cached.
        """
        from tqdm import tqdm

        keys = [request_key(self.model, self.base_url, r, sampling) for r in requests]
        results: list[Completion | None] = [cache.get(k) for k in keys]
        todo = [i for i, c in enumerate(results) if c is None]
        bar = tqdm(total=len(requests), initial=len(requests) - len(todo), desc=desc, unit="req",
                   disable=None if progress else True, dynamic_ncols=True, leave=False)  # None: off unless a tty

        def run(i: int) -> None:
            completion = self._create(requests[i], sampling)
            cache.put(keys[i], completion)
            results[i] = completion
            bar.update(1)

        pool = ThreadPoolExecutor(max_workers=max(1, self.concurrency), thread_name_prefix="rlkv-eval")
        futures = []
        finished = False
        try:
            futures = [pool.submit(run, i) for i in todo]
            done, _ = wait(futures, return_when=FIRST_EXCEPTION)
            for f in done:
                error = f.exception()
                if error is not None:
                    raise error
            finished = True
        finally:
            for f in futures:
                f.cancel()
            # after a failure or Ctrl-C, do not wait for the requests in flight (they may take minutes)
            pool.shutdown(wait=finished, cancel_futures=True)
            bar.close()
        return [r for r in results if r is not None]
