"""The benchmarks ``rlkv eval`` runs: each one's public data format, its chat prompt and its grading kind.

Tasks (``--task``): ``gsm8k``, ``math500``, ``aime24``, ``mbpp``, ``mmlu-pro`` and ``mmlu-pro:CATEGORY``.
Each item becomes one user turn (no system prompt, zero-shot: the server applies the model's chat template),
following the common harnesses:

- GSM8K, MATH-500, AIME24: the problem, a newline, then ``Please reason step by step, and put your final
  answer within \\boxed{}.`` (evalscope's GSM8K / MATH-500 / AIME24 template; DeepSeek-R1's card, the
  paper's models). GSM8K grades the final number (lm-eval flexible-extract, the box first), the others with
  math-verify.
- MBPP: lm-evaluation-harness ``mbpp_instruct`` (``You are an expert Python programmer, and here is your
  task:\\n{text}\\nYour code should pass these tests:\\n{tests}``), zero-shot; the code is the answer's first
  fenced block, run with the asserts in the sandbox. The test split is task ids 11-510 (``--split``
  ``test``, the default); ``full`` takes every row of the file.
- MMLU-Pro: TIGER-AI-Lab's ``evaluate_from_api.py`` zero-shot form (the question, options ``A. ...`` to
  ``J. ...``, and the instruction to finish with ``the answer is (X)``); graded by its letter extraction.

Data is read from local files only (:func:`rlkv_trainer.data.read_rows`: JSONL, JSON list, parquet, a
Hugging Face dataset folder). Errors are :class:`rlkv_trainer.data.DataError`, one line each.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

from rlkv_trainer.data import DataError, MATH_INSTRUCTION, read_rows
from rlkv_trainer.grading import extract_gsm8k_gold, mbpp_test_program

MBPP_TEMPLATE = ("You are an expert Python programmer, and here is your task:\n{text}\n"
                 "Your code should pass these tests:\n{tests}")
MMLU_PRO_TEMPLATE = ("The following are multiple choice questions (with answers) about {category}. Think step by "
                     "step and then finish your answer with \"the answer is (X)\" where X is the correct letter "
                     "choice.\n\nQuestion: {question}\nOptions:\n{options}\nAnswer: Let's think step by step.")
MATH_TEMPLATE = "{problem}\n" + MATH_INSTRUCTION
LETTERS = "ABCDEFGHIJ"
MBPP_TEST_IDS = range(11, 511)  # the split of the MBPP paper (Austin et al. 2021): 11-510 test


@dataclass(frozen=True)
class EvalItem:
    """One benchmark question, ready to send.

    Fields: ``id`` (the record's own id, else ``file:line``), ``prompt`` (the user turn, template applied),
    ``gold`` (what :class:`rlkv_trainer.grading.GradeItem` takes: a number, LaTeX, a letter, MBPP's test
    program), ``kind`` (the grading kind), ``meta`` (subject, level, category, ...: JSON-able).
    """

    id: str
    prompt: str
    gold: str
    kind: str
    meta: Mapping[str, Any] = field(default_factory=dict, hash=False, compare=False)


@dataclass(frozen=True)
class Task:
    """A benchmark: its name, grading kind, the template stated in the output, and its row reader."""

    name: str
    kind: str
    template: str
    source: str
    default_file: str
    build: Callable[[Mapping[str, Any], str, str], EvalItem | None]
    category: str | None = None

    @property
    def label(self) -> str:
        return f"{self.name}:{self.category}" if self.category else self.name


def render(template: str, **fields: str) -> str:
    """``template`` with each ``{name}`` replaced once (one pass: a field's text holding ``{...}`` stays as it
    is; ``\\boxed{}`` is not a field)."""
    return re.sub(r"\{(\w+)\}", lambda m: str(fields[m.group(1)]) if m.group(1) in fields else m.group(0), template)


def _need(row: Mapping[str, Any], where: str, *names: str) -> list[Any]:
    if not isinstance(row, Mapping):
        raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}")
    missing = [n for n in names if row.get(n) is None]
    if missing:
        found = ", ".join(sorted(map(str, row))) or "none"
        raise DataError(f"{where}: missing field {missing[0]!r}; this task's format needs {', '.join(names)}; "
                        f"found fields: {found}")
    return [row[n] for n in names]


def _meta(row: Mapping[str, Any], *names: str) -> dict[str, Any]:
    return {n: row[n] for n in names if n in row and isinstance(row[n], (str, int, float, bool))}


def _gsm8k(row: Mapping[str, Any], where: str, default_id: str) -> EvalItem:
    question, answer = _need(row, where, "question", "answer")
    gold = extract_gsm8k_gold(str(answer))
    if gold is None:
        raise DataError(f"{where}: field 'answer' has no final number (GSM8K format: '... #### 18')")
    return EvalItem(str(row.get("id", default_id)), render(MATH_TEMPLATE, problem=question), gold, "gsm8k")


def _math(row: Mapping[str, Any], where: str, default_id: str) -> EvalItem:
    problem, answer = _need(row, where, "problem", "answer")
    rid = row.get("unique_id", row.get("id", default_id))
    return EvalItem(str(rid), render(MATH_TEMPLATE, problem=problem), str(answer), "math",
                    _meta(row, "subject", "level", "url"))


def _mbpp(row: Mapping[str, Any], where: str, default_id: str) -> EvalItem:
    task_id, text, tests = _need(row, where, "task_id", "text", "test_list")
    if not isinstance(tests, (list, tuple)) or not tests or not all(isinstance(t, str) for t in tests):
        raise DataError(f"{where}: field 'test_list' must be a non-empty list of assert strings")
    setup = row.get("test_setup_code") or ""
    prompt = render(MBPP_TEMPLATE, text=text, tests="\n".join(t.strip() for t in tests))
    return EvalItem(str(task_id), prompt, mbpp_test_program(list(tests), str(setup)), "mbpp", {"task_id": task_id})


def _mmlu_pro(row: Mapping[str, Any], where: str, default_id: str) -> EvalItem:
    question, options, answer, category = _need(row, where, "question", "options", "answer", "category")
    options = [o for o in options if o is not None] if isinstance(options, (list, tuple)) else options
    if not isinstance(options, list) or not 2 <= len(options) <= len(LETTERS):
        raise DataError(f"{where}: field 'options' must be a list of 2 to 10 choices, got {str(options)[:60]}")
    letter = str(answer).strip().strip("()").upper()
    if len(letter) != 1 or letter not in LETTERS[:len(options)]:
        raise DataError(f"{where}: field 'answer' is {answer!r}; allowed: a letter A-{LETTERS[len(options) - 1]}")
    lines = "\n".join(f"{LETTERS[i]}. {o}" for i, o in enumerate(options))
    prompt = render(MMLU_PRO_TEMPLATE, category=category, question=question, options=lines)
    rid = row.get("question_id", default_id)
    return EvalItem(str(rid), prompt, letter, "mmlu_pro", _meta(row, "category", "src"))


def _prompts(row: Mapping[str, Any], where: str, default_id: str) -> EvalItem:
    prompt, answer = _need(row, where, "prompt", "answer")
    return EvalItem(str(row.get("id", default_id)), str(prompt), str(answer), "gsm8k")


# the trainer's data format; the grading kind for ``prompts:KIND``
PROMPT_KINDS = {"number": "gsm8k", "math": "math"}

_TASKS: dict[str, Task] = {
    "gsm8k": Task("gsm8k", "gsm8k", MATH_TEMPLATE, "evalscope gsm8k (0-shot chat); answer: lm-eval flexible-extract",
                  "gsm8k_test.jsonl", _gsm8k),
    "math500": Task("math500", "math", MATH_TEMPLATE, "evalscope math_500 (0-shot chat); answer: math-verify",
                    "math500_test.jsonl", _math),
    "aime24": Task("aime24", "math", MATH_TEMPLATE, "evalscope aime24 (0-shot chat); answer: math-verify",
                   "aime24_test.jsonl", _math),
    "mbpp": Task("mbpp", "mbpp", MBPP_TEMPLATE, "lm-evaluation-harness mbpp_instruct (0-shot); first fenced "
                 "code block, run with the asserts", "mbpp.jsonl", _mbpp),
    "mmlu-pro": Task("mmlu-pro", "mmlu_pro", MMLU_PRO_TEMPLATE, "TIGER-AI-Lab MMLU-Pro (0-shot CoT); answer: its "
                     "letter extraction", "mmlu_pro_test.parquet", _mmlu_pro),
    "prompts": Task("prompts", "gsm8k", "{prompt}", "your own JSONL rows {prompt, answer} (rlkv train's data "
                    "format), each prompt sent as it is; answer: the boxed or last number (prompts:math: "
                    "math-verify)", "prompts.jsonl", _prompts),
}
TASK_NAMES: tuple[str, ...] = tuple(_TASKS)
DATA_ENV = "RLKV_EVAL_DATA"  # a folder holding the default file names (the repository's ../shared/data/eval)


def get_task(spec: str) -> Task:
    """``"gsm8k"``, ``"mmlu-pro:law"`` (category matched case-insensitively, ``_`` for a space) -> :class:`Task`."""
    name, _, category = spec.partition(":")
    name = name.strip().lower()
    if name not in _TASKS:
        raise DataError(f"--task {spec!r}: unknown task; allowed: {', '.join(TASK_NAMES)}, mmlu-pro:CATEGORY, "
                        f"prompts:{'|'.join(PROMPT_KINDS)}")
    task = _TASKS[name]
    if name == "prompts" and category:
        kind = PROMPT_KINDS.get(category.strip().lower())
        if kind is None:
            raise DataError(f"--task {spec!r}: prompts grades as {' or '.join(PROMPT_KINDS)}, not {category!r}")
        return Task(**{**task.__dict__, "kind": kind, "category": category.strip().lower(),
                       "build": lambda row, where, did: EvalItem(**{**_prompts(row, where, did).__dict__, "kind": kind})})
    if category:
        if name != "mmlu-pro":
            raise DataError(f"--task {spec!r}: only mmlu-pro takes a :CATEGORY")
        task = Task(**{**task.__dict__, "category": category.strip().replace("_", " ").lower()})
    return task


def default_data_path(task: Task) -> str | None:
    """``$RLKV_EVAL_DATA/<the task's file>`` when that variable is set, else ``None``."""
    folder = os.environ.get(DATA_ENV)
    return os.path.join(folder, task.default_file) if folder else None


def load_items(task: Task, path: str, *, split: str | None = None, limit: int | None = None) -> list[EvalItem]:
    """The task's items from ``path``, in file order; ``limit`` keeps the first N (after the split / category).

    ``split``: a dataset folder's split; for MBPP ``"test"`` (default: task ids 11-510) or ``"full"``.
    :class:`DataError` for a missing file, a bad row, a duplicate id, or no items.
    """
    if not os.path.exists(path):
        raise DataError(f"--data {path}: no such file or directory; expected {task.name}'s public format "
                        f"(e.g. {task.default_file}) as JSONL, parquet or a Hugging Face dataset folder")
    mbpp_split = None
    if task.name == "mbpp":
        mbpp_split, split = (split or "test"), None
        if mbpp_split not in ("test", "full"):
            raise DataError(f"--split {mbpp_split!r} for mbpp; allowed: test (task ids 11-510), full")
    items: list[EvalItem] = []
    seen: dict[str, str] = {}
    categories: set[str] = set()
    for row, where, default_id in read_rows(path, split):
        item = task.build(row, where, default_id)
        if mbpp_split == "test" and int(item.meta["task_id"]) not in MBPP_TEST_IDS:
            continue
        if task.category is not None and task.name == "mmlu-pro":
            category = str(item.meta.get("category", "")).lower()
            categories.add(category)
            if category != task.category:
                continue
        if item.id in seen:
            raise DataError(f"{where}: id {item.id!r} already used at {seen[item.id]}; ids must be unique")
        seen[item.id] = where
        items.append(item)
        if limit is not None and len(items) >= limit:
            break
    if not items:
        if task.category is not None and task.name == "mmlu-pro":
            raise DataError(f"--task {task.label}: no item of category {task.category!r} in {path}; categories: "
                            f"{', '.join(sorted(categories)) or 'none'}")
        raise DataError(f"{path}: no items for {task.name}")
    return items


def describe_prompts(task: Task, items: Sequence[EvalItem]) -> dict[str, Any]:
    """What the output states about the prompts: template, source, chat form, an example."""
    return {"template": task.template, "source": task.source, "format": "chat: one user turn, no system prompt, "
            "zero-shot; the server's chat template", "example": items[0].prompt if items else None}
