"""Reward functions, all with one interface.

A reward function takes a batch of groups, ``[(PromptRecord, [completion, ...]), ...]`` (the prompts of one
step, each with its samples), and returns a :class:`RewardResult`: ``rewards[i][j]`` for completion ``j`` of
prompt ``i`` and the matching :class:`SampleInfo`.

- ``correctness`` (:class:`CorrectnessReward`): 1.0 when the grader finds the completion's answer equal to the
  record's gold ``answer``, else 0.0 (timeouts and errors included). Raw 0/1: the paper's +-5 (reward
  scaling 10, bias -0.5) belongs to the objective, which also normalises advantages.
- ``agreement`` (:class:`AgreementReward`): label-free. 1.0 when the completion's answer is equivalent
  (the grader's check, with the reference in the gold's place) to ``record.reference_answer``, the answer the
  uncompressed model (all gates 1) gave to the same prompt. The caller computes it once per prompt
  (:func:`reference_answers` over the dense model's samples, attached with
  ``data.with_reference_answers``); this module runs no model. A prompt without a reference answer gets
  0.0 for every sample, flagged ``"no_reference"`` (the caller should count and report these, or drop the
  prompts beforehand).
- a plug-in: ``"package.module:function"``, resolved when the config is read (:func:`build_reward`), called
  like the built-ins; it may return a :class:`RewardResult` or the bare ``[[float, ...], ...]``.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable, Protocol, Sequence

from rlkv_trainer.data import PromptRecord
from rlkv_trainer.grading import GradeItem, Grader, resolve_callable

RewardBatch = Sequence[tuple[PromptRecord, Sequence[str]]]

BUILTIN_REWARDS = ("correctness", "agreement")


class RewardError(ValueError):
    """A reward that cannot be built or returned something malformed; one line naming the reward."""


@dataclass(frozen=True)
class SampleInfo:
    """Why a sample got its reward.

    Fields:
        status: the grader's verdict status (``ok``, ``no_answer``, ``bad_gold``, ``timeout``, ``error``), or
            ``"skipped"`` when the prompt had nothing to compare with, or ``"plugin"``.
        extracted: the sample's final answer as the grader read it, if any.
        flag: set when the reward is 0 whatever the sample says: ``"no_gold"`` (correctness, the record has no
            ``answer``), ``"no_reference"`` (agreement, no reference answer).
    """

    status: str
    extracted: str | None = None
    flag: str | None = None


@dataclass(frozen=True)
class RewardResult:
    """``rewards``: ``[num_prompts][num_samples of that prompt]`` floats; ``info``: the same shape."""

    rewards: list[list[float]]
    info: list[list[SampleInfo]]

    def flat(self) -> list[float]:
        """Rewards in batch order, prompt by prompt: ``[total samples]``."""
        return [r for group in self.rewards for r in group]

    def flags(self) -> Counter[str]:
        """How many samples carry each flag (for the step's log line)."""
        return Counter(i.flag for group in self.info for i in group if i.flag)


class RewardFn(Protocol):
    """The interface: ``reward(batch) -> RewardResult``."""

    name: str

    def __call__(self, batch: RewardBatch) -> RewardResult: ...


class _GradedReward:
    """Grade every sample against one string per prompt (``_target``); no target: 0 and ``missing_flag``."""

    name = ""
    missing_flag = ""

    def __init__(self, grader: Grader) -> None:
        self.grader = grader

    def _target(self, record: PromptRecord) -> str | None:
        raise NotImplementedError

    def __call__(self, batch: RewardBatch) -> RewardResult:
        items = [GradeItem(c, self._target(rec), rec.kind)
                 for rec, completions in batch if self._target(rec) is not None for c in completions]
        verdicts = iter(self.grader.grade(items))  # one call: the whole step's samples share the pool
        rewards: list[list[float]] = []
        info: list[list[SampleInfo]] = []
        for rec, completions in batch:
            if self._target(rec) is None:
                rewards.append([0.0] * len(completions))
                info.append([SampleInfo("skipped", flag=self.missing_flag)] * len(completions))
                continue
            group = [next(verdicts) for _ in completions]
            rewards.append([v.score for v in group])
            info.append([SampleInfo(v.status, v.extracted) for v in group])
        return RewardResult(rewards, info)


class CorrectnessReward(_GradedReward):
    """1.0 when a sample's answer equals the record's gold ``answer``, else 0.0."""

    name = "correctness"
    missing_flag = "no_gold"

    def _target(self, record: PromptRecord) -> str | None:
        return record.answer


class AgreementReward(_GradedReward):
    """1.0 when a sample's answer is equivalent to ``record.reference_answer`` (the dense model's), else 0.0."""

    name = "agreement"
    missing_flag = "no_reference"

    def _target(self, record: PromptRecord) -> str | None:
        return record.reference_answer


def reference_answers(grader: Grader, records: Sequence[PromptRecord],
                      dense_completions: Sequence[Sequence[str]]) -> list[str | None]:
    """Each prompt's reference answer from the uncompressed model's samples (one or more per prompt).

    The answer extracted most often wins, compared as extracted text (math-verify's normalised LaTeX, the
    normalised number, the letter), ties to the earliest sample; ``None`` when no sample has an extractable
    answer. Text, not equivalence, so ``0.5`` and ``\\frac{1}{2}`` written differently split a vote, rarely
    with math-verify's normalisation and a handful of samples.
    """
    if len(dense_completions) != len(records):
        raise RewardError(f"reference answers: {len(dense_completions)} sample groups for {len(records)} prompts")
    items = [GradeItem(c, None, rec.kind) for rec, group in zip(records, dense_completions) for c in group]
    verdicts = iter(grader.grade(items))
    out: list[str | None] = []
    for group in dense_completions:
        answers = [v.extracted for v in (next(verdicts) for _ in group) if v.status == "ok" and v.extracted]
        out.append(Counter(answers).most_common(1)[0][0] if answers else None)  # Counter keeps first-seen order
    return out


# ---------------------------------------------------------------------------------------------------------
# plug-ins


def check_result(result: Any, batch: RewardBatch, name: str) -> RewardResult:
    """``result`` as a :class:`RewardResult` of the batch's shape with finite rewards; :class:`RewardError` if not."""
    if isinstance(result, RewardResult):
        rewards, info = result.rewards, result.info
    else:
        rewards, info = result, None
    if not isinstance(rewards, (list, tuple)) or len(rewards) != len(batch):
        got = f"{len(rewards)} groups" if isinstance(rewards, (list, tuple)) else f"a {type(rewards).__name__}"
        raise RewardError(f"reward {name!r}: returned {got} for a batch of {len(batch)} prompts; expected one list "
                          "of floats per prompt")
    out: list[list[float]] = []
    for i, (group, (record, completions)) in enumerate(zip(rewards, batch)):
        if not isinstance(group, (list, tuple)) or len(group) != len(completions):
            got = len(group) if isinstance(group, (list, tuple)) else type(group).__name__
            raise RewardError(f"reward {name!r}: prompt {i} ({record.id}) has {len(completions)} completions but "
                              f"{got} rewards")
        try:
            values = [float(r) for r in group]
        except (TypeError, ValueError):
            raise RewardError(f"reward {name!r}: prompt {i} ({record.id}): rewards must be numbers, got "
                              f"{[type(r).__name__ for r in group]}") from None
        if not all(math.isfinite(v) for v in values):
            raise RewardError(f"reward {name!r}: prompt {i} ({record.id}): non-finite reward in {values}")
        out.append(values)
    if info is None:
        info = [[SampleInfo("plugin")] * len(g) for g in out]
    return RewardResult(out, [list(g) for g in info])


class PluginReward:
    """A user function ``fn(batch) -> RewardResult | [[float, ...], ...]``, its results checked."""

    def __init__(self, path: str, fn: Callable[[RewardBatch], Any]) -> None:
        self.name = path
        self.fn = fn

    def __call__(self, batch: RewardBatch) -> RewardResult:
        return check_result(self.fn(batch), batch, self.name)


def resolve_reward_plugin(path: str) -> PluginReward:
    """Resolve ``"package.module:function"``; :class:`RewardError` (one line naming the path) if it does not
    resolve or is not callable."""
    try:
        return PluginReward(path, resolve_callable(path))
    except ValueError as e:
        raise RewardError(f"reward plug-in {e}") from None


def build_reward(spec: str, grader: Grader | None = None) -> RewardFn:
    """``"correctness"``, ``"agreement"`` (both need ``grader``) or a plug-in path; call it when reading the config."""
    if spec in BUILTIN_REWARDS:
        if grader is None:
            raise RewardError(f"reward {spec!r} needs a Grader")
        return CorrectnessReward(grader) if spec == "correctness" else AgreementReward(grader)
    if ":" not in spec:
        raise RewardError(f"reward {spec!r}: not one of {', '.join(BUILTIN_REWARDS)} nor a plug-in "
                          "'package.module:function'")
    return resolve_reward_plugin(spec)
