"""The planted-heads benchmark (benchmarks/planted_heads.py): the committed fixture, the task generator, the
metric helpers on hand-made inputs, and the committed results file (its fields and the targets, met or
reported). The 20-minute training never runs here."""

from __future__ import annotations

import glob
import json
import os
import sys

import numpy as np
import pytest

from tests.engine_utils import ROOT

sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import planted_heads as ph  # noqa: E402
import planted_task as task  # noqa: E402

RESULTS = sorted(glob.glob(os.path.join(ROOT, "benchmarks", "results", "planted-heads-cpu-*.json")))


# ---------------------------------------------------------------- fixture


def test_fixture_is_small_and_complete():
    names = set(os.listdir(task.FIXTURE_DIR))
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
            "generation_config.json", "planted_spec.json"} <= names
    size = sum(os.path.getsize(os.path.join(task.FIXTURE_DIR, n)) for n in names)
    assert size <= 5 * 1024 * 1024, f"fixture is {size / 1e6:.1f} MB"


def test_fixture_loads_and_solves_the_task():
    """The tokenizer round-trips a prompt and the oracle model answers (nearly) every prompt with every head full,
    and (nearly) none with every head streaming: the pair is outside the window."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(task.FIXTURE_DIR)
    ex = task.make_examples(1, 0)[0]
    ids = tok(ex.prompt)["input_ids"]
    assert ids[0] == tok.bos_token_id and len(ids) == task.TaskSpec().prompt_tokens
    assert tok.decode(ids[1:]) == ex.prompt
    spec = task.TaskSpec()
    ev = ph.Evaluator(task.FIXTURE_DIR, task.make_examples(200, 5), spec.sink, spec.recent)
    assert ev.shape == (4, 4)
    assert ev.accuracy(np.ones(ev.shape, dtype=bool)) >= 0.9
    assert ev.accuracy(np.zeros(ev.shape, dtype=bool)) <= 0.2


# ---------------------------------------------------------------- task


def test_task_generator_is_deterministic():
    a, b = task.make_examples(50, 7), task.make_examples(50, 7)
    assert a == b and a != task.make_examples(50, 8)
    words = a[0].prompt.split()
    assert words[-1] == task.QUERY and len(words) == task.TaskSpec().words + 1
    numbers = [w for w in words if w.isdigit()]
    assert numbers == [a[0].answer] and words[a[0].position - 1] == a[0].answer


def test_number_is_outside_the_streaming_window():
    """The number is neither a sink token nor within reach of the answer position through streaming heads,
    even relayed through every layer (each reaches recent - 1 further back)."""
    for spec in (task.TaskSpec(), task.TaskSpec(words=40), task.TaskSpec(words=80, sink=16, recent=12)):
        last = spec.prompt_tokens - 1
        seen = set()
        for ex in task.make_examples(300, 3, spec):
            assert spec.sink <= ex.position < last - spec.layers * (spec.recent - 1)
            seen.add(ex.position)
        assert seen == set(spec.query_range())  # every allowed position occurs


def test_prompt_file_matches_the_generator(tmp_path):
    path = task.write_prompts(str(tmp_path / "p.jsonl"), 20, ph.TRAIN_SEED)
    assert open(path).read().splitlines() == open(ph.PROMPTS).read().splitlines()[:20]
    rec = json.loads(open(path).readline())
    assert rec["kind"] == "gsm8k" and rec["answer"] == task.make_examples(1, ph.TRAIN_SEED)[0].answer


# ---------------------------------------------------------------- helpers


def test_roc_auc_by_hand():
    assert ph.roc_auc([0.9, 0.8, 0.1, 0.2], [True, True, False, False]) == 1.0
    assert ph.roc_auc([0.1, 0.2, 0.9, 0.8], [True, True, False, False]) == 0.0
    assert ph.roc_auc([0.5, 0.5, 0.5], [True, False, False]) == 0.5  # ties count one half
    # positives 0.9, 0.3; negatives 0.5, 0.1: pairs won 0.9>0.5, 0.9>0.1, 0.3>0.1; lost 0.3<0.5 -> 3/4
    assert ph.roc_auc([0.9, 0.3, 0.5, 0.1], [True, True, False, False]) == 0.75
    assert ph.roc_auc([0.3, 0.4], [False, False]) is None
    assert ph.roc_auc(np.array([[1.0, 0.0], [0.0, 0.0]]), np.array([[True, False], [False, False]])) == 1.0


def test_accuracy_and_sparsity_by_hand():
    assert ph.accuracy([1, 2, 3, 4], [1, 2, 0, 4]) == 0.75
    with pytest.raises(ValueError):
        ph.accuracy([1, 2], [1])
    # two gates well above a cluster near 0: 14 of 16 closed
    gates = np.array([[0.0] * 4, [0.02, 0.9, 0.05, 0.0], [0.0, 0.01, 0.0, 0.8], [0.1, 0.0, 0.0, 0.0]])
    assert ph.natural_sparsity(gates) == 14 / 16
    assert ph.natural_sparsity(np.ones((2, 2))) == 0.0
    assert ph.natural_sparsity(np.array([[1.5, -1.0]])) == 0.5  # clipped to [0, 1] first


def test_random_masks_are_seeded_and_sized():
    a, b = ph.random_masks((4, 4), 3), ph.random_masks((4, 4), 3)
    assert len(a) == 5 and all((x == y).all() for x, y in zip(a, b))
    assert all(int(m.sum()) == 3 for m in a) and len({m.tobytes() for m in a}) > 1


def test_natural_sparsity_selects_the_open_heads():
    from rlkv_vllm.core.patterns import select_full_heads

    gates = np.array([[0.0] * 4, [0.02, 0.9, 0.05, 0.0], [0.0, 0.01, 0.0, 0.8], [0.1, 0.0, 0.0, 0.0]])
    mask = select_full_heads(gates, ph.natural_sparsity(gates), "global")
    assert sorted(zip(*np.nonzero(mask))) == [(1, 1), (2, 3)]


# ---------------------------------------------------------------- committed results


@pytest.fixture(scope="module")
def results() -> dict:
    assert RESULTS, "no committed benchmarks/results/planted-heads-cpu-*.json"
    return json.load(open(RESULTS[-1]))


def test_results_file_has_the_fields(results):
    assert results["benchmark"] == "planted-heads" and results["device"].startswith("cpu-")
    name = os.path.basename(RESULTS[-1])
    assert name == f"planted-heads-{results['device']}-vllm{results['vllm']}-{results['date']}.json"
    assert os.path.isfile(RESULTS[-1][:-5] + ".png")
    gt = results["ground_truth"]
    assert np.asarray(gt["drops"]).shape == (4, 4) and gt["critical"]
    for reward in ph.REWARDS:
        r = results["runs"][reward]
        assert np.asarray(r["gates"]).shape == (4, 4)
        assert set(r["auc_by_threshold"]) == {f"{t:g}" for t in ph.THRESHOLDS}
        assert len(r["at_learned_sparsity"]["random_accuracies"]) == 5
        assert r["timing"]["command"].startswith("python -m rlkv_vllm.cli train")
        assert set(r["targets_met"]) == {"auc", "kept_fraction", "random_loss_points", "budget"}


def test_results_agree_with_their_own_numbers(results):
    """Recompute the AUCs, labels and target verdicts from the stored gates and drops."""
    drops = np.asarray(results["ground_truth"]["drops"])
    dense = results["ground_truth"]["dense_accuracy"]
    for r in results["runs"].values():
        gates = np.asarray(r["gates"])
        assert r["auc"] == ph.roc_auc(gates, drops > results["critical_drop"])
        at = r["at_learned_sparsity"]
        assert at["sparsity"] == ph.natural_sparsity(gates)
        assert r["targets_met"]["auc"] == (r["auc"] >= ph.TARGETS["auc"])
        assert r["targets_met"]["kept_fraction"] == (at["learned_accuracy"] >= ph.TARGETS["kept_fraction"] * dense)
        assert r["targets_met"]["budget"] == (r["timing"]["wall_s"] <= ph.BUDGET_S)


@pytest.mark.parametrize("reward", ph.REWARDS)
def test_results_targets(results, reward):
    """The issue's targets; a miss fails here with the measured numbers (docs of the run say why)."""
    r = results["runs"][reward]
    assert r["timing"]["returncode"] == 0
    assert all(r["targets_met"].values()), {k: v for k, v in r["targets_met"].items() if not v} | {
        "auc": r["auc"], "kept": r["kept_fraction"], "random_loss": r["random_loss_points"],
        "wall_s": r["timing"]["wall_s"]}
