"""Answer extraction and grading, shared by the trainer's rewards and ``rlkv eval``.

Two layers:

- **Pure functions** (no time bound, safe in any thread): :func:`last_boxed`, :func:`extract_gsm8k_gold`,
  :func:`extract_gsm8k_answer`, :func:`gsm8k_equal`, :func:`extract_mmlu_pro_letter`, and
  :func:`grade_one`, which also runs math-verify and therefore belongs in a process that bounds its time.
- **:class:`Grader`**: a pool of worker processes (fresh interpreters, nothing forked) that runs
  :func:`grade_one` with a soft and a hard timeout per item. A timed-out or crashed grading comes back as a
  :class:`Verdict` with status ``"timeout"`` or ``"error"`` and score 0; the pool replaces a dead or killed
  worker. It never raises a grading failure into the caller and never runs math-verify in the caller's
  process, so it works inside a threaded Ray actor (``max_concurrency > 1``), where math-verify's
  ``signal.alarm`` timeouts fail.

Kinds and their conventions:

- ``"math"``: math-verify 0.9 (``verify(gold, pred)``, gold first). The gold is wrapped as
  ``\\boxed{gold}`` unless it already holds ``\\boxed`` (verl's ``reward_score/math_verify.py`` does the
  same) and parsed with LaTeX then plain-expression extraction. The completion is parsed with
  ``LatexExtractionConfig(boxed_match_priority=0)`` then ``ExprExtractionConfig()``: the last ``\\boxed{}``
  wins (only its content is parsed: math-verify alone would read every box of the text as one set), else
  math-verify's "final answer is" anchors, else the last LaTeX / expression. math-verify's own
  timeouts are off (``parsing_timeout=None``, ``timeout_seconds=None``): they use ``signal.alarm``, which
  would clobber the worker's own timer.
- ``"gsm8k"``: lm-evaluation-harness ``gsm8k.yaml`` "flexible-extract": regex
  ``(-?[$0-9.,]{2,})|(-?[0-9]+)``, last match; then its ``regexes_to_ignore`` (``,``, ``$``,
  ``(?s).*#### ``, a trailing ``.``). Four deviations, each towards the intended number: the content of
  the last ``\\boxed{}`` is searched first when there is one (reasoning models box their answer); matches
  without a digit (``..``, ``$,``) are skipped; all trailing periods go (``12...`` is 12); and gold and
  prediction compare as decimals, so ``18.00`` equals ``18`` (the harness compares strings). The gold may be
  GSM8K's full ``... #### 18`` answer or a bare number.
- ``"mmlu_pro"``: the MMLU-Pro harness (TIGER-AI-Lab/MMLU-Pro, ``compute_accuracy.py``): the first
  ``answer is \\(?([A-J])\\)?``, else ``.*[aA]nswer:\\s*([A-J])``, else the last standalone letter A-J. When
  all fail the harness guesses at random; here the sample has no answer (score 0).
- ``"mbpp"``: the gold is the test program (MBPP's ``test_setup_code`` and ``test_list`` asserts, one per
  line: :func:`mbpp_test_program`); the completion's code is its first fenced block (lm-evaluation-harness
  ``mbpp/utils.py`` ``extract_code_blocks``), else the text between ``[BEGIN]`` and ``[DONE]`` (the
  original few-shot format, evalscope), else the whole text when it holds a ``def``. The code, then the
  tests, run as one program in :mod:`rlkv_trainer.sandbox` (never in the grading worker itself): correct
  when it exits with status 0. The verdict's ``detail`` says what the run did (``"failed, exit 1 (bwrap):
  AssertionError"``); a run killed at the sandbox's timeout is status ``"timeout"``, a sandbox that cannot
  start ``"error"``. An MBPP item's soft and hard timeouts stretch to cover the sandbox's own.
"""

from __future__ import annotations

import functools
import importlib
import json
import logging
import multiprocessing.connection
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import deque
import dataclasses
from dataclasses import dataclass, replace
from decimal import Decimal, InvalidOperation
from typing import Any, Callable, Iterable, Sequence

from rlkv_trainer.sandbox import SandboxLimits, run_python

logger = logging.getLogger(__name__)

KINDS: tuple[str, ...] = ("math", "gsm8k", "mmlu_pro", "mbpp")

# statuses a Verdict can carry; only "ok" can be correct
OK, NO_ANSWER, BAD_GOLD, TIMEOUT, ERROR = "ok", "no_answer", "bad_gold", "timeout", "error"


@dataclass(frozen=True)
class GradeItem:
    """One thing to grade.

    Fields:
        completion: the model's text (the generated part only, not the prompt).
        gold: the reference answer (``"\\\\frac{1}{2}"``, ``"#### 18"``, ``"C"``, MBPP's test program);
            ``None`` asks for extraction only (the verdict then says what was extracted, and is never correct).
        kind: one of :data:`KINDS` (or any name a custom ``worker_fn`` understands).
    """

    completion: str
    gold: str | None
    kind: str = "math"


@dataclass(frozen=True)
class Verdict:
    """The result of grading one item.

    Fields:
        status: ``"ok"`` (both sides extracted and compared), ``"no_answer"`` (nothing extractable in the
            completion), ``"bad_gold"`` (the gold did not parse: a data problem), ``"timeout"`` (soft or
            hard timeout), ``"error"`` (an exception, or the worker process died).
        correct: the completion's answer equals the gold; only ever true with status ``"ok"``.
        extracted: the completion's answer as text (math: math-verify's normalised LaTeX, gsm8k: the
            normalised number, mmlu_pro: the letter, mbpp: the code); ``None`` when none was found.
        gold: the gold as the grader read it (same forms as ``extracted``), ``None`` when absent or unparsable.
        detail: a short human-readable note for the non-ok statuses.
        seconds: wall time spent on this item in the worker (or until it was killed).
    """

    status: str
    correct: bool = False
    extracted: str | None = None
    gold: str | None = None
    detail: str = ""
    seconds: float = 0.0

    @property
    def score(self) -> float:
        """1.0 when correct, else 0.0 (timeouts and errors included)."""
        return 1.0 if self.correct else 0.0


# ---------------------------------------------------------------------------------------------------------
# pure extraction functions


def last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` (or ``\\fbox{...}``) in ``text``, braces balanced; ``None`` if none."""
    starts = [m.end() for m in re.finditer(r"\\(?:boxed|fbox)\s*\{", text)]
    for start in reversed(starts):
        depth = 1
        for i in range(start, len(text)):
            if text[i] == "{":
                depth += 1
            elif text[i] == "}":
                depth -= 1
                if depth == 0:
                    return text[start:i].strip()
    return None


_GSM8K_FLEX = re.compile(r"(-?[$0-9.,]{2,})|(-?[0-9]+)")  # lm-eval gsm8k.yaml, flexible-extract
_GSM8K_IGNORE = [re.compile(p) for p in (r",", r"\$", r"(?s).*#### ", r"\.$")]  # its regexes_to_ignore


def normalize_gsm8k_number(text: str) -> str:
    """lm-eval's GSM8K ``regexes_to_ignore`` (``,``, ``$``, ``.*#### ``, a trailing ``.``), then every trailing
    ``.`` (an ellipsis after the number); stripped, lower case."""
    for pattern in _GSM8K_IGNORE:
        text = pattern.sub("", text)
    return text.strip().rstrip(".").lower()


def _last_number(text: str) -> str | None:
    numbers = [a or b for a, b in _GSM8K_FLEX.findall(text)]
    numbers = [n for n in numbers if any(c.isdigit() for c in n)]
    return normalize_gsm8k_number(numbers[-1]) if numbers else None


def extract_gsm8k_gold(answer: str) -> str | None:
    """The final number of a GSM8K gold answer (after its last ``####``), normalised; a bare number works too."""
    tail = answer.rsplit("####", 1)[-1]
    return _last_number(tail)


def extract_gsm8k_answer(completion: str) -> str | None:
    """The completion's final number: the last ``\\boxed{}``'s if it holds one, else the last (flexible-extract)."""
    boxed = last_boxed(completion)
    if boxed is not None:
        number = _last_number(boxed)
        if number is not None:
            return number
    return _last_number(completion)


def gsm8k_equal(gold: str, pred: str) -> bool:
    """Normalised numbers equal as decimals (``18.00 == 18``), else as strings."""
    gold, pred = normalize_gsm8k_number(gold), normalize_gsm8k_number(pred)
    try:
        return Decimal(gold) == Decimal(pred)
    except InvalidOperation:
        return gold == pred


def extract_mmlu_pro_letter(completion: str, letters: str = "ABCDEFGHIJ") -> str | None:
    """MMLU-Pro's three-step letter extraction (``answer is (X)``, ``Answer: X``, last standalone letter)."""
    cls = f"[{letters}]"
    match = re.search(rf"answer is \(?({cls})\)?", completion)
    if match is None:
        match = re.search(rf".*[aA]nswer:\s*({cls})", completion)
    if match is not None:
        return match.group(1)
    match = re.search(rf"\b{cls}\b(?!.*\b{cls}\b)", completion, re.DOTALL)
    return match.group(0) if match else None


def _mmlu_gold(gold: str) -> str | None:
    match = re.fullmatch(r"\s*\(?([A-Za-z])\)?\s*", gold)
    return match.group(1).upper() if match else None


_FENCED = re.compile(r"```(?:\w+)?\n?(.*?)\n?```", re.DOTALL)  # lm-eval mbpp/utils.py extract_code_blocks
_BEGIN_DONE = re.compile(r"\[BEGIN\]\s*(.*?)\s*(?:\[DONE\]|$)", re.DOTALL)
MBPP_MAX_CODE_CHARS = 20000  # what a verdict keeps of the extracted code


def extract_code(completion: str) -> str | None:
    """The completion's program: the first fenced block, else ``[BEGIN] ... [DONE]``, else the whole text
    when it holds a ``def``; ``None`` when none of these (or only blank text) is there."""
    for pattern in (_FENCED, _BEGIN_DONE):
        match = pattern.search(completion)
        if match and match.group(1).strip():
            return match.group(1)
    return completion if re.search(r"^\s*def\s", completion, re.MULTILINE) else None


def mbpp_test_program(test_list: Sequence[str], test_setup_code: str = "") -> str:
    """MBPP's tests as the program that follows the code: the setup code, then one assert per line."""
    lines = ([test_setup_code] if test_setup_code.strip() else []) + [t.strip() for t in test_list]
    return "\n".join(lines) + "\n"


def _grade_mbpp(completion: str, gold: str | None, limits: SandboxLimits | None) -> Verdict:
    code = extract_code(completion)
    extracted = code[:MBPP_MAX_CODE_CHARS] if code is not None else None
    if code is None:
        return Verdict(NO_ANSWER, gold=gold)
    if gold is None:
        return Verdict(OK, extracted=extracted)
    if not gold.strip():
        return Verdict(BAD_GOLD, extracted=extracted, detail="the test program is empty")
    result = run_python(f"{code}\n\n{gold}", limits or SandboxLimits())
    status = {"timeout": TIMEOUT, "error": ERROR}.get(result.outcome, OK)
    return Verdict(status, correct=result.passed, extracted=extracted, gold=gold, detail=result.summary())


# ---------------------------------------------------------------------------------------------------------
# math-verify (imported lazily: only the worker processes load sympy)


def _math_configs() -> tuple[list[Any], list[Any]]:
    from math_verify import ExprExtractionConfig, LatexExtractionConfig

    gold = [LatexExtractionConfig(), ExprExtractionConfig()]
    pred = [LatexExtractionConfig(boxed_match_priority=0), ExprExtractionConfig()]
    return gold, pred


def _parsed_text(parsed: list[Any]) -> str | None:
    """math-verify's parse returns ``[sympy_expr, normalised_latex]`` (or ``[str]``); report the text."""
    texts = [p for p in parsed if isinstance(p, str)]
    if texts:
        return texts[-1]
    return str(parsed[0]) if parsed else None


def _grade_math(completion: str, gold: str | None) -> Verdict:
    from math_verify import parse, verify

    gold_cfg, pred_cfg = _math_configs()
    # math-verify reads every \boxed{} of the text as one answer ("\boxed{11} ... \boxed{12}" -> {11, 12});
    # the harnesses (lm-eval minerva, Qwen2.5-Math) take the last one, and so does this
    boxed = last_boxed(completion)
    target = "\\boxed{" + boxed + "}" if boxed else completion
    pred = parse(target, extraction_config=pred_cfg, parsing_timeout=None)
    extracted = _parsed_text(pred)
    if gold is None:
        return Verdict(OK if pred else NO_ANSWER, extracted=extracted)
    gold_text = gold if "\\boxed" in gold else "\\boxed{" + gold + "}"
    gold_parsed = parse(gold_text, extraction_config=gold_cfg, parsing_timeout=None)
    if not gold_parsed:
        return Verdict(BAD_GOLD, extracted=extracted, detail=f"gold does not parse: {gold[:80]!r}")
    if not pred:
        return Verdict(NO_ANSWER, gold=_parsed_text(gold_parsed))
    correct = bool(verify(gold_parsed, pred, timeout_seconds=None))
    return Verdict(OK, correct=correct, extracted=extracted, gold=_parsed_text(gold_parsed))


def _grade_extracted(
    extracted: str | None, gold: str | None, gold_norm: str | None, equal: Callable[[str, str], bool]
) -> Verdict:
    """Shared tail of the regex kinds: gold absent / unreadable / no answer / compare."""
    if gold is None:
        return Verdict(OK if extracted is not None else NO_ANSWER, extracted=extracted)
    if gold_norm is None:
        return Verdict(BAD_GOLD, extracted=extracted, detail=f"gold is not readable: {gold[:80]!r}")
    if extracted is None:
        return Verdict(NO_ANSWER, gold=gold_norm)
    return Verdict(OK, correct=equal(gold_norm, extracted), extracted=extracted, gold=gold_norm)


def grade_one(item: GradeItem, think_end: str | None = None, *, sandbox: SandboxLimits | None = None) -> Verdict:
    """Grade one item in this process, with no time bound (math-verify can hang on some inputs: use :class:`Grader`).

    ``think_end`` (e.g. ``"</think>"``): when set and present, only the text after its last occurrence is
    graded, so answers tried inside a reasoning trace do not count; a completion without it is graded whole.
    ``sandbox``: the limits of an MBPP run (default :class:`SandboxLimits`). Raises ``ValueError`` for an
    unknown kind.
    """
    text = item.completion
    if think_end and think_end in text:
        text = text.rsplit(think_end, 1)[1]
    if item.kind == "math":
        return _grade_math(text, item.gold)
    if item.kind == "gsm8k":
        gold_norm = extract_gsm8k_gold(item.gold) if item.gold is not None else None
        return _grade_extracted(extract_gsm8k_answer(text), item.gold, gold_norm, gsm8k_equal)
    if item.kind == "mmlu_pro":
        gold_norm = _mmlu_gold(item.gold) if item.gold is not None else None
        return _grade_extracted(extract_mmlu_pro_letter(text), item.gold, gold_norm, str.__eq__)
    if item.kind == "mbpp":
        return _grade_mbpp(text, item.gold, sandbox)
    raise ValueError(f"unknown grading kind {item.kind!r}; known: {', '.join(KINDS)}")


# ---------------------------------------------------------------------------------------------------------
# the worker process


class _SoftTimeout(BaseException):
    """Raised by the worker's SIGALRM handler. A BaseException, and not math-verify's TimeoutException, so
    neither math-verify's ``except Exception`` nor its own timeout handling swallows it."""


def _on_alarm(signum: int, frame: Any) -> None:
    raise _SoftTimeout()


def resolve_callable(path: str) -> Callable[..., Any]:
    """Resolve ``"package.module:attr.sub"`` to a callable; ``ValueError`` with one line naming ``path`` otherwise."""
    module_name, sep, attr = path.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"{path!r}: expected 'package.module:function'")
    try:
        obj: Any = importlib.import_module(module_name)
    except Exception as e:  # ImportError, or whatever the module raises at import
        raise ValueError(f"{path!r}: cannot import {module_name!r} ({type(e).__name__}: {e})") from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"{path!r}: {module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ValueError(f"{path!r}: {attr!r} is not callable (it is a {type(obj).__name__})")
    return obj


def _worker_entry() -> None:
    """``python -c`` entry of a worker: argv = [sys.path JSON, socket fd, options JSON]."""
    options = json.loads(sys.argv[3])
    conn = multiprocessing.connection.Connection(int(sys.argv[2]))
    if options["max_memory_mb"]:
        _limit_memory(options["max_memory_mb"])
    sandbox = SandboxLimits(**options["sandbox"]) if options.get("sandbox") else None
    _worker_main(conn, options["think_end"], options["soft_timeout_s"], options["worker_fn"], sandbox)


def _limit_memory(megabytes: int) -> None:
    """Cap the worker's address space, so an answer like ``2^{2^{34}}`` fails with MemoryError (scored
    ``"error"``) instead of taking the host's memory from the rollout engine."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    want = megabytes << 20
    if hard != resource.RLIM_INFINITY:
        want = min(want, hard)
    resource.setrlimit(resource.RLIMIT_AS, (want, hard))


def item_timeout_s(kind: str, timeout_s: float, sandbox: SandboxLimits | None) -> float:
    """An item's soft time budget: ``timeout_s``, stretched for MBPP to the sandbox's timeout plus 5 s (its
    start and its final sweep), so the worker's alarm never cuts a run the sandbox would have ended."""
    if kind != "mbpp":
        return timeout_s
    return max(timeout_s, (sandbox or SandboxLimits()).timeout_s + 5.0)


def _worker_main(conn: multiprocessing.connection.Connection, think_end: str | None, soft_timeout_s: float,
                 worker_fn: str | None, sandbox: SandboxLimits | None = None) -> None:
    """Worker loop: receive ``(index, GradeItem)``, send back ``("result", index, Verdict)``; ``None`` stops it.

    It exits on EOF too, so workers never outlive a parent that died without closing the pool.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C belongs to the parent, which closes the pool
    for name in ("math_verify", "latex2sympy2_extended"):
        logging.getLogger(name).setLevel(logging.ERROR)  # one "timeout is disabled" warning per process
    try:
        fn: Callable[[GradeItem, str | None], Verdict] = (
            resolve_callable(worker_fn) if worker_fn else functools.partial(grade_one, sandbox=sandbox))
        grade_one(GradeItem("\\boxed{1}", "1"))  # warm-up: import sympy and the LaTeX parser before timing
    except BaseException as e:
        conn.send(("failed", f"{type(e).__name__}: {e}"))
        return
    signal.signal(signal.SIGALRM, _on_alarm)
    conn.send(("ready", os.getpid()))
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            return
        if msg is None:
            return
        index, item = msg
        start = time.perf_counter()
        budget_s = item_timeout_s(getattr(item, "kind", ""), soft_timeout_s, sandbox)
        try:
            try:
                signal.setitimer(signal.ITIMER_REAL, budget_s)
                verdict = fn(item, think_end)
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
        except _SoftTimeout:  # also when the alarm lands in the finally above
            verdict = Verdict(TIMEOUT, detail=f"soft timeout after {budget_s:g} s")
        except Exception as e:
            verdict = Verdict(ERROR, detail=f"{type(e).__name__}: {e}"[:300])
        conn.send(("result", index, replace(verdict, seconds=time.perf_counter() - start)))


# ---------------------------------------------------------------------------------------------------------
# the pool

_STARTING, _IDLE, _BUSY = "starting", "idle", "busy"


class _Worker:
    """Parent-side handle: the process, its pipe, its state and (when busy) the item index and deadline."""

    def __init__(self, proc: subprocess.Popen, conn: multiprocessing.connection.Connection, deadline: float) -> None:
        self.proc = proc
        self.conn = conn
        self.state = _STARTING
        self.index: int | None = None
        self.started = time.monotonic()
        self.deadline = deadline

    def exitcode(self, wait_s: float = 0.0) -> int | None:
        try:
            return self.proc.wait(timeout=wait_s)
        except subprocess.TimeoutExpired:
            return None

    def stop(self, kill: bool) -> None:
        if kill:
            self.proc.kill()
        else:
            try:
                self.conn.send(None)
            except (OSError, ValueError):
                pass
        if self.exitcode(2.0) is None:
            self.proc.kill()
            self.exitcode(2.0)
        self.conn.close()


def default_num_workers() -> int:
    """min(4, usable CPUs): grading is milliseconds per sample, so a few processes keep up with rollouts."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(4, cpus))


class Grader:
    """Grade batches of :class:`GradeItem` in worker processes, each item under a soft and a hard timeout.

    Args:
        num_workers: worker processes (default :func:`default_num_workers`).
        timeout_s: soft limit per item: the worker's SIGALRM interrupts the grading (which is scored
            ``"timeout"``) and the worker lives on.
        hard_timeout_s: the parent kills a worker whose item is not back by then (C code the alarm cannot
            interrupt, a wedged process) and starts a replacement; default ``timeout_s + 5``: 15 s with the
            defaults, AReaL's bound, which scores a timed-out reward 0 as this does.
        think_end: passed to :func:`grade_one` (``"</think>"`` grades only the text after the reasoning).
        worker_fn: ``"module:function"`` replacing :func:`grade_one` in the workers (custom kinds; tests),
            called as ``fn(item, think_end) -> Verdict``.
        start_timeout_s: how long a new worker may take to import math-verify and report ready.
        max_memory_mb: address-space limit of each worker (``RLIMIT_AS``); ``None`` for none.
        sandbox: the limits of each MBPP run (:class:`rlkv_trainer.sandbox.SandboxLimits`; default its
            defaults); an MBPP item's soft timeout is :func:`item_timeout_s`, its hard one 5 s more.

    Workers start on first use (or :meth:`start`). Calls from several threads are serialised by a lock: one
    batch at a time uses all workers. Use as a context manager or call :meth:`close`. A Grader does not
    pickle: create it where it grades (inside the Ray actor, not in the driver).
    """

    # consecutive failed starts, within one call, after which the remaining items are scored "error"
    MAX_START_FAILURES = 3

    def __init__(
        self,
        num_workers: int | None = None,
        *,
        timeout_s: float = 10.0,
        hard_timeout_s: float | None = None,
        think_end: str | None = None,
        worker_fn: str | None = None,
        start_timeout_s: float = 120.0,
        max_memory_mb: int | None = 4096,
        sandbox: SandboxLimits | None = None,
    ) -> None:
        self.num_workers = num_workers if num_workers is not None else default_num_workers()
        if self.num_workers < 1:
            raise ValueError(f"Grader: num_workers must be >= 1, got {num_workers}")
        if timeout_s <= 0:
            raise ValueError(f"Grader: timeout_s must be > 0, got {timeout_s}")
        self.timeout_s = float(timeout_s)
        self.hard_timeout_s = float(hard_timeout_s) if hard_timeout_s is not None else self.timeout_s + 5.0
        if self.hard_timeout_s < self.timeout_s:
            raise ValueError(f"Grader: hard_timeout_s ({self.hard_timeout_s}) must be >= timeout_s ({self.timeout_s})")
        self.think_end = think_end
        if worker_fn is not None:
            resolve_callable(worker_fn)  # fail here, in one line, not three times in the workers
        self.worker_fn = worker_fn
        self.start_timeout_s = float(start_timeout_s)
        self.max_memory_mb = max_memory_mb
        self.sandbox = sandbox
        self._workers: list[_Worker | None] = [None] * self.num_workers
        self._lock = threading.Lock()
        self._closed = False
        self._start_failures = 0
        self.last_start_error = ""
        self.restarts = 0  # workers replaced after a crash, a kill or a failed start

    # --- lifecycle ---------------------------------------------------------------------------------------

    def start(self) -> None:
        """Start all workers and wait until they are ready; ``RuntimeError`` (one line) if they cannot start."""
        with self._lock:
            self._check_open()
            self._start_failures = 0
            self._fill()
            while any(w is not None and w.state == _STARTING for w in self._workers):
                self._poll({})
                if self._start_failures >= self.MAX_START_FAILURES:
                    raise RuntimeError(f"grading workers fail to start: {self.last_start_error}")

    def close(self) -> None:
        """Stop the workers (politely, then by SIGKILL). Idempotent."""
        with self._lock:
            self._closed = True
            for i, w in enumerate(self._workers):
                if w is not None:
                    w.stop(kill=w.state != _IDLE)
                    self._workers[i] = None

    def __enter__(self) -> "Grader":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass

    def worker_pids(self) -> list[int]:
        """PIDs of the live worker processes (started or starting)."""
        return [w.proc.pid for w in self._workers if w is not None]

    # --- grading -----------------------------------------------------------------------------------------

    def grade(self, items: Iterable[GradeItem]) -> list[Verdict]:
        """Grade ``items``; one :class:`Verdict` per item, in order. Never raises a grading failure.

        Raises ``ValueError`` before any work for an unknown kind (without a custom ``worker_fn``) and
        ``RuntimeError`` after :meth:`close`.
        """
        items = list(items)
        if self.worker_fn is None:
            for item in items:
                if item.kind not in KINDS:
                    raise ValueError(f"unknown grading kind {item.kind!r}; known: {', '.join(KINDS)}")
        if not items:
            return []
        with self._lock:
            self._check_open()
            return self._run(items)

    def extract(self, completions: Sequence[str], kind: str = "math") -> list[Verdict]:
        """Extract the final answers only (``Verdict.extracted``; status ``"ok"`` or ``"no_answer"``)."""
        return self.grade(GradeItem(c, None, kind) for c in completions)

    def equivalent(self, pairs: Sequence[tuple[str, str]], kind: str = "math") -> list[bool]:
        """For ``(reference_answer, completion)`` pairs: does the completion's answer equal the reference?"""
        return [v.correct for v in self.grade(GradeItem(c, ref, kind) for ref, c in pairs)]

    # --- the dispatch loop -------------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("Grader is closed")

    def _spawn(self, slot: int) -> None:
        """Start a fresh interpreter (spawn semantics: nothing forked from the caller's threads or locks).

        Through subprocess rather than multiprocessing's spawn context, which re-imports the caller's
        ``__main__`` in every worker: that fails for scripts without a ``__main__`` guard and costs a
        Ray worker's whole entry module.
        """
        parent, child = socket.socketpair()
        options = {"think_end": self.think_end, "soft_timeout_s": self.timeout_s, "worker_fn": self.worker_fn,
                   "max_memory_mb": self.max_memory_mb,
                   "sandbox": dataclasses.asdict(self.sandbox) if self.sandbox else None}
        code = (f"import sys, json; sys.path[:0] = json.loads(sys.argv[1]); "
                f"from {__name__} import _worker_entry; _worker_entry()")
        try:
            proc = subprocess.Popen(
                [sys.executable, "-c", code, json.dumps([p for p in sys.path if p]), str(child.fileno()),
                 json.dumps(options)],
                pass_fds=[child.fileno()], stdin=subprocess.DEVNULL, close_fds=True,
            )
        finally:
            child.close()  # the parent keeps one end only, so the worker's death reads as EOF
        conn = multiprocessing.connection.Connection(parent.detach())
        self._workers[slot] = _Worker(proc, conn, time.monotonic() + self.start_timeout_s)

    def _hard_timeout(self, item: GradeItem) -> float:
        """``hard_timeout_s``, or for MBPP the item's stretched soft budget plus the same margin."""
        soft = item_timeout_s(item.kind, self.timeout_s, self.sandbox)
        return self.hard_timeout_s + (soft - self.timeout_s)

    def _fill(self) -> None:
        for slot, w in enumerate(self._workers):
            if w is None and self._start_failures < self.MAX_START_FAILURES:
                self._spawn(slot)

    def _replace(self, slot: int, kill: bool = True) -> None:
        w = self._workers[slot]
        if w is not None:
            w.stop(kill=kill)
        self._workers[slot] = None
        self.restarts += 1
        if self._start_failures < self.MAX_START_FAILURES:
            self._spawn(slot)

    def _finish(self, slot: int, results: dict[int, Verdict], verdict: Verdict) -> None:
        w = self._workers[slot]
        assert w is not None and w.index is not None
        results[w.index] = verdict
        w.index, w.state = None, _IDLE

    def _run(self, items: list[GradeItem]) -> list[Verdict]:
        results: dict[int, Verdict] = {}
        pending = deque(range(len(items)))
        self._start_failures = 0
        self._fill()
        while len(results) < len(items):
            for slot, w in enumerate(self._workers):
                if w is not None and w.state == _IDLE and pending:
                    index = pending.popleft()
                    try:
                        w.conn.send((index, items[index]))
                    except (OSError, ValueError):  # died while idle: not this item's fault
                        pending.appendleft(index)
                        self._replace(slot)
                        continue
                    w.state, w.index, w.started = _BUSY, index, time.monotonic()
                    w.deadline = w.started + self._hard_timeout(items[index])
            if pending and all(w is None for w in self._workers):  # every slot gave up starting
                detail = f"grading workers fail to start: {self.last_start_error}"
                for index in pending:
                    results[index] = Verdict(ERROR, detail=detail)
                pending.clear()
                continue
            self._poll(results)
        return [results[i] for i in range(len(items))]

    def _poll(self, results: dict[int, Verdict]) -> None:
        """Wait for the next message or deadline; handle results, deaths, starts and expired items."""
        live = [(slot, w) for slot, w in enumerate(self._workers) if w is not None and w.state != _IDLE]
        if not live:
            return
        wait_s = max(0.0, min(w.deadline for _, w in live) - time.monotonic())
        ready = multiprocessing.connection.wait([w.conn for _, w in live], timeout=wait_s)
        for slot, w in live:
            if w.conn in ready:
                self._receive(slot, w, results)
        now = time.monotonic()
        for slot, w in live:
            if self._workers[slot] is not w or w.state == _IDLE or now < w.deadline:
                continue
            if w.conn.poll(0):  # arrived just now: take it rather than call it a timeout
                self._receive(slot, w, results)
            elif w.state == _BUSY:
                hard_s = w.deadline - w.started
                logger.warning("grading worker %s killed: item %s not back after %.1f s", w.proc.pid, w.index, hard_s)
                self._finish(slot, results, Verdict(TIMEOUT, detail=f"hard timeout: worker killed after "
                                                    f"{hard_s:g} s", seconds=now - w.started))
                self._replace(slot)
            else:
                self._start_failed(slot, f"not ready after {self.start_timeout_s:g} s")

    def _receive(self, slot: int, w: _Worker, results: dict[int, Verdict]) -> None:
        try:
            msg = w.conn.recv()
        except (EOFError, OSError) as e:  # the worker died
            code = w.exitcode(1.0)
            if w.state == _BUSY:
                logger.warning("grading worker %s died (exit code %s) on item %s", w.proc.pid, code, w.index)
                self._finish(slot, results, Verdict(ERROR, detail=f"worker process died (exit code {code})",
                                                    seconds=time.monotonic() - w.started))
                self._replace(slot)
            else:
                self._start_failed(slot, f"exited during start-up (exit code {code}; {type(e).__name__})")
            return
        except Exception as e:  # an unpicklable reply: score the item, keep the worker
            if w.state == _BUSY:
                self._finish(slot, results, Verdict(ERROR, detail=f"bad reply: {type(e).__name__}: {e}"[:300]))
            return
        if msg[0] == "ready":
            w.state = _IDLE
            self._start_failures = 0
        elif msg[0] == "failed":
            self._start_failed(slot, msg[1])
        elif msg[0] == "result" and w.state == _BUSY and msg[1] == w.index:
            self._finish(slot, results, msg[2])

    def _start_failed(self, slot: int, why: str) -> None:
        self._start_failures += 1
        self.last_start_error = why
        logger.warning("grading worker failed to start (%d in a row): %s", self._start_failures, why)
        self._replace(slot)
