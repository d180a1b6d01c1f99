"""rlkv_trainer.rewards: correctness and label-free agreement through a real Grader, reference answers from
dense samples, and plug-ins resolved by dotted path with one-line errors."""

from __future__ import annotations

import os
from typing import Any

import pytest

from tests.trainer import EVAL
from rlkv_trainer.data import PromptRecord, load_prompts, with_reference_answers
from rlkv_trainer.grading import Grader
from rlkv_trainer.rewards import (
    AgreementReward,
    CorrectnessReward,
    PluginReward,
    RewardBatch,
    RewardError,
    RewardResult,
    SampleInfo,
    build_reward,
    check_result,
    reference_answers,
)

HERE = "tests.trainer.test_rewards"


def test_correctness_is_raw_binary_per_sample(grader: Grader) -> None:
    math500 = load_prompts(os.path.join(EVAL, "math500_test.jsonl"))[:2]  # answers (3, pi/2) and p - q
    gsm = load_prompts(os.path.join(EVAL, "gsm8k_test.jsonl"))[:1]  # 18
    batch: RewardBatch = [
        (math500[0], ["so \\boxed{(3, \\frac{\\pi}{2})}", "\\boxed{(3, \\pi)}", "I do not know"]),
        (math500[1], ["\\boxed{-q + p}"]),
        (gsm[0], ["She makes $18.", "She makes 16 dollars"]),
        (PromptRecord(id="u", prompt="unlabelled"), ["\\boxed{1}", "\\boxed{2}"]),
    ]
    result = CorrectnessReward(grader)(batch)
    assert result.rewards == [[1.0, 0.0, 0.0], [1.0], [1.0, 0.0], [0.0, 0.0]]
    assert [i.status for i in result.info[0]] == ["ok", "ok", "no_answer"]
    assert result.info[2][0].extracted == "18"
    assert result.info[3] == [SampleInfo("skipped", flag="no_gold")] * 2
    assert result.flat() == [1.0, 0.0, 0.0, 1.0, 1.0, 0.0, 0.0, 0.0] and result.flags() == {"no_gold": 2}


def test_agreement_compares_with_the_dense_models_answer(grader: Grader) -> None:
    records = [PromptRecord(id=f"p{i}", prompt=f"q{i}") for i in range(3)]  # no gold labels at all
    dense = [["\\boxed{\\frac{1}{2}}", "\\boxed{0.5}", "\\boxed{3}"],  # majority 1/2 (0.5 normalises to it)
             ["no answer", "still none"],
             ["\\boxed{7}"]]
    refs = reference_answers(grader, records, dense)
    assert refs == ["\\frac{1}{2}", None, "7"]
    records = with_reference_answers(records, refs)
    batch = [(records[0], ["\\boxed{1/2}", "\\boxed{\\dfrac{2}{4}}", "\\boxed{2}"]),
             (records[1], ["\\boxed{5}"]),
             (records[2], ["\\boxed{7.0}", "nothing"])]
    result = AgreementReward(grader)(batch)
    assert result.rewards == [[1.0, 1.0, 0.0], [0.0], [1.0, 0.0]]
    assert result.info[1] == [SampleInfo("skipped", flag="no_reference")]
    assert result.flags() == {"no_reference": 1}


def test_agreement_on_gsm8k_kind_uses_its_numbers(grader: Grader) -> None:
    [record] = load_prompts(os.path.join(EVAL, "gsm8k_test.jsonl"))[:1]
    [ref] = reference_answers(grader, [record], [["so she makes $1,018.", "total 1018", "maybe 12"]])
    assert ref == "1018"  # the gold (18) plays no part: label-free
    result = AgreementReward(grader)([(with_reference_answers([record], [ref])[0], ["it is 1018.00", "18"])])
    assert result.rewards == [[1.0, 0.0]]


# --- plug-ins ----------------------------------------------------------------------------------------------


def length_reward(batch: RewardBatch) -> list[list[float]]:
    """A plug-in for the tests: shorter is better."""
    return [[1.0 / (1 + len(c)) for c in completions] for _, completions in batch]


def wrong_shape(batch: RewardBatch) -> list[list[float]]:
    return [[1.0] for _ in batch]


def not_finite(batch: RewardBatch) -> Any:
    return [[float("nan")] * len(c) for _, c in batch]


NOT_CALLABLE = 3


def test_plugin_by_dotted_path() -> None:
    reward = build_reward(f"{HERE}:length_reward")
    assert isinstance(reward, PluginReward) and reward.name == f"{HERE}:length_reward"
    batch = [(PromptRecord(id="a", prompt="p"), ["x", "xxx"])]
    result = reward(batch)
    assert result.rewards == [[0.5, 0.25]] and result.info == [[SampleInfo("plugin")] * 2]


@pytest.mark.parametrize("spec,expected", [
    ("no_such_module_xyz:f", r"reward plug-in 'no_such_module_xyz:f': cannot import 'no_such_module_xyz'"),
    (f"{HERE}:missing", rf"reward plug-in '{HERE}:missing': '{HERE}' has no attribute 'missing'"),
    (f"{HERE}:NOT_CALLABLE", rf"reward plug-in '{HERE}:NOT_CALLABLE': 'NOT_CALLABLE' is not callable \(it is a int\)"),
    ("correctnes", r"reward 'correctnes': not one of correctness, agreement nor a plug-in"),
    ("correctness", r"reward 'correctness' needs a Grader"),
])
def test_unresolvable_rewards_are_one_line_naming_the_path(spec: str, expected: str) -> None:
    with pytest.raises(RewardError, match=expected) as e:
        build_reward(spec)
    assert "\n" not in str(e.value)


def test_plugin_results_are_checked() -> None:
    batch = [(PromptRecord(id="a", prompt="p"), ["x", "y"])]
    with pytest.raises(RewardError, match=r"prompt 0 \(a\) has 2 completions but 1 rewards"):
        build_reward(f"{HERE}:wrong_shape")(batch)
    with pytest.raises(RewardError, match="non-finite reward"):
        build_reward(f"{HERE}:not_finite")(batch)
    with pytest.raises(RewardError, match="returned a float for a batch of 1 prompts"):
        check_result(1.0, batch, "r")
    passed = RewardResult([[1, 0]], [[SampleInfo("ok"), SampleInfo("ok")]])
    assert check_result(passed, batch, "r").rewards == [[1.0, 0.0]]


def test_builtins_build_with_a_grader(grader: Grader) -> None:
    assert isinstance(build_reward("correctness", grader), CorrectnessReward)
    assert isinstance(build_reward("agreement", grader), AgreementReward)
