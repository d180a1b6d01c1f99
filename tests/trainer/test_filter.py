"""The self-distillation filter in a run: n samples per prompt at every gate 1, graded, k of n kept,
cached for the next run (a stand-in rollout pool and tokenizer; the grading is real)."""

from __future__ import annotations

import os

import pytest

from rlkv_trainer.config import TrainConfigError, load_config
from rlkv_trainer.data import load_prompts
from rlkv_trainer.rollout import Sample
from rlkv_trainer.run import Run
from rlkv_trainer.sampling import SamplingSpec
from tests.engine_utils import ROOT

CONFIG = os.path.join(ROOT, "trainer", "configs", "tiny.yaml")


class BytesTokenizer:
    """Token ids are the text's bytes."""

    def decode(self, ids, skip_special_tokens=True):  # noqa: ANN001
        return bytes(ids).decode()


class StandInPool:
    """Prompt ``[i]``'s first ``solved[i]`` samples box the right answer, the rest a wrong one."""

    def __init__(self, answers: list[str], solved: list[int]) -> None:
        self.answers, self.solved, self.calls = answers, solved, 0

    def generate(self, prompts, spec, *, n, max_tokens, seeds):  # noqa: ANN001
        self.calls += 1
        out = []
        for i, p in enumerate(prompts):
            for j in range(n):
                text = f"so the answer is \\boxed{{{self.answers[p[0]] if j < self.solved[p[0]] else '-1'}}}"
                out.append(Sample(i, p, list(text.encode()), [-0.1] * len(text), "stop", 0))
        return out


def _run(tmp_path, k: int) -> Run:
    run = Run.__new__(Run)  # the filter alone: no Ray, no engines
    run.cfg = load_config(CONFIG, [f"data.filter_n=4", f"data.filter_k={k}", "rollout.prompts_per_step=2",
                                   "model.path=/unused"])
    run.out_dir, run.tokenizer = str(tmp_path / "out"), BytesTokenizer()
    return run


def test_filter_keeps_k_of_n_and_caches(tmp_path, grader):
    records = load_prompts(_run(tmp_path, 2).cfg.data.path)[:5]
    pool = StandInPool([r.answer for r in records], solved=[4, 1, 2, 0, 3])
    ids = {r.id: [i] for i, r in enumerate(records)}
    kept = _run(tmp_path, 2)._self_distillation(records, ids, pool, SamplingSpec(), grader)
    assert [r.id for r in kept] == [records[i].id for i in (0, 2, 4)]
    again = _run(tmp_path, 2)._self_distillation(records, ids, pool, SamplingSpec(), grader)
    assert [r.id for r in again] == [r.id for r in kept] and pool.calls == 1  # the cache answered
    assert os.path.isdir(tmp_path / ".rlkv-filter")
    with pytest.raises(TrainConfigError, match=r"filter_k = 4 .* keeps 1 prompts"):
        _run(tmp_path, 4)._self_distillation(records, ids, pool, SamplingSpec(), grader)
