"""The planted-heads benchmark (benchmarks/planted_heads.py): the committed fixture and its chat template, the
task generator, the metric helpers on hand-made inputs, the committed results file (its fields, its numbers
recomputed, the targets) and the learned pattern files; slow: the fixture served through the chat endpoint,
stock and with the learned pattern. The 20-minute training never runs here."""

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
    """The tokenizer has one token per word and the oracle model answers most prompts with every head full,
    and (nearly) none with every head streaming: the pair is outside the window."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(task.FIXTURE_DIR)
    ex = task.make_examples(1, 0)[0]
    ids = tok(ex.prompt)["input_ids"]
    assert ids[0] == tok.bos_token_id and len(ids) == task.TaskSpec().prompt_tokens
    assert tok.convert_ids_to_tokens(ids[1:]) == ex.prompt.split()  # one token per word, no <unk>
    spec = task.TaskSpec()
    ev = ph.Evaluator(task.FIXTURE_DIR, task.make_examples(200, 5), spec.sink, spec.recent)
    assert ev.shape == (4, 4)
    assert ev.accuracy(np.ones(ev.shape, dtype=bool)) >= 0.9  # 0.999 on the 1,000 held-out prompts
    assert ev.accuracy(np.zeros(ev.shape, dtype=bool)) <= 0.2


def _training_prompts(n: int) -> list[str]:
    return [json.loads(line)["prompt"] for line in open(ph.PROMPTS).read().splitlines()[:n]]


def test_chat_template_gives_the_training_ids():
    """A chat request whose user message is the prompt text gets exactly the ids the model was trained on
    (tokenizer(prompt), BOS first): rendered by the template, tokenised without special tokens (vLLM's chat
    default); a system message adds nothing; the trainer's own chat rendering agrees."""
    from transformers import AutoTokenizer

    from rlkv_trainer.data import PromptFormat, PromptRecord, render_prompts

    tok = AutoTokenizer.from_pretrained(task.FIXTURE_DIR)
    assert tok.chat_template == task.CHAT_TEMPLATE
    prompts = _training_prompts(16)
    train_ids, _ = task.encode_batch(tok, [task.Example(p, "0", 0) for p in prompts])
    for prompt, ids in zip(prompts, train_ids.tolist()):
        assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1
        for messages in ([{"role": "user", "content": prompt}],
                         [{"role": "system", "content": "be brief"}, {"role": "user", "content": prompt}]):
            text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            assert tok(text, add_special_tokens=False)["input_ids"] == ids, text
    records = [PromptRecord(id=str(i), prompt=p) for i, p in enumerate(prompts)]
    rendered = render_prompts(tok, records, PromptFormat(system_prompt="be brief"))
    assert [r.token_ids for r in rendered] == train_ids.tolist()


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


def test_ground_truth_is_the_planted_heads(results):
    """The fixture's clean ground truth (stage 3 of planted_spec.json): the critical heads are exactly the
    planted ones, and every other head costs at most 5 points made streaming alone (the layer-0 heads cost
    2-4 points each, ~17 together, in the stage-2 fixture, which pulled the ranking and kept targets apart)."""
    spec = json.load(open(os.path.join(task.FIXTURE_DIR, "planted_spec.json")))
    planted = sorted(ph.head_name(l, h) for l, h in spec["stages"][-1]["train_spec"]["planted"])
    gt = results["ground_truth"]
    assert sorted(gt["critical"]) == planted
    drops = np.asarray(gt["drops"])
    others = [drops[l, h] for l in range(4) for h in range(4) if ph.head_name(l, h) not in planted]
    assert max(others) <= 0.05, others
    assert gt["dense_accuracy"] >= 0.9
    assert results["fixture"]["stages"] == [
        {"train_spec": st["train_spec"], "init": st["init"], "train_s": st["train_s"], "log_last": st["log"][-1]}
        for st in spec["stages"]], "the results were measured on another fixture"


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
        for key, met in r["targets_met"].items():  # a miss says by how much
            assert (r["target_margins"][key] >= 0) == met, (key, r["target_margins"][key], met)


# Misses measured in the committed results, (reward, target) -> reason (target_margins in the file, the reasons in
# planted_heads.yaml): strict xfails, so a results file that meets one fails here until its entry is removed.
# None since 2026-12-03 (the stage-3 fixture): the 2026-12-02 misses, correctness kept 0.929 and agreement AUC
# 0.846, came from the stage-2 fixture's layer-0 heads.
KNOWN_MISSES: dict[tuple[str, str], str] = {}


@pytest.mark.parametrize("reward", ph.REWARDS)
@pytest.mark.parametrize("target", ["auc", "kept_fraction", "random_loss_points", "budget"])
def test_results_targets(results, reward, target, request):
    """The issue's targets; a miss fails here with the measured numbers."""
    if (reward, target) in KNOWN_MISSES:
        request.applymarker(pytest.mark.xfail(strict=True, reason=KNOWN_MISSES[reward, target]))
    r = results["runs"][reward]
    assert r["timing"]["returncode"] == 0
    assert r["targets_met"][target], {"margin": r["target_margins"][target], "auc": r["auc"],
                                      "kept": r["kept_fraction"], "random_loss": r["random_loss_points"],
                                      "wall_s": r["timing"]["wall_s"]}


def test_results_recompute_the_sparsity_numbers(results):
    """kept fraction and random loss from the stored accuracies; the full heads are the global selection of the
    stored gates at the stored sparsity; the curve's random means are the mean of 5 patterns per count."""
    from rlkv_vllm.core.patterns import select_full_heads

    dense = results["ground_truth"]["dense_accuracy"]
    for r in results["runs"].values():
        at = r["at_learned_sparsity"]
        assert r["kept_fraction"] == pytest.approx(at["learned_accuracy"] / dense)
        assert at["random_accuracy_mean"] == pytest.approx(np.mean(at["random_accuracies"]))
        assert r["random_loss_points"] == pytest.approx(100 * (dense - at["random_accuracy_mean"]))
        assert r["targets_met"]["random_loss_points"] == (r["random_loss_points"] >= ph.TARGETS["random_loss_points"])
        mask = select_full_heads(np.asarray(r["gates"]), at["sparsity"], "global")
        assert at["full_heads"] == [ph.head_name(*ij) for ij in zip(*np.nonzero(mask))]
        assert at["n_full"] == int(mask.sum())
        assert r["curve"]["n_full"] == list(ph.CURVE_COUNTS)


@pytest.mark.parametrize("reward", ph.REWARDS)
def test_learned_pattern_files(results, reward):
    """benchmarks/results/planted-heads-pattern-<reward>.json: the run's gates, loadable as a serve pattern for the
    fixture, with the sparsity to serve it at."""
    from rlkv_vllm.core.patterns import HeadPattern

    r = results["runs"][reward]
    path = os.path.join(ROOT, r["pattern_file"])
    assert path == ph.pattern_path(reward)
    pattern = HeadPattern.load(path)
    assert pattern.gates.shape == (4, 4)
    np.testing.assert_allclose(pattern.gates, np.asarray(r["gates"]), atol=1e-6)
    assert pattern.metadata["planted_heads"]["learned_sparsity"] == r["at_learned_sparsity"]["sparsity"]
    assert pattern.metadata["sink"] == 4 and pattern.metadata["recent"] == 8


def test_results_chat_check(results):
    """The benchmark's own check of the chat endpoint (stock and RLKV at the learned sparsity): every answer the
    oracle's, with the training token counts."""
    c = results["chat_check"]
    for name in ("stock", "rlkv"):
        assert c[name]["prompt_tokens_as_training"] and c[name]["matches_oracle"] == c["prompts"], c[name]
    assert c["met"]


# ---------------------------------------------------------------- the chat endpoint (slow: starts servers)


@pytest.mark.slow
@pytest.mark.parametrize("served", ["stock", "rlkv"])
def test_chat_endpoint_answers_the_number(results, served):
    """``rlkv serve`` on the fixture, stock or with the learned (correctness) pattern at its sparsity, sink 4 +
    recent 8: a chat request whose user message is the prompt text (max_tokens 1, temperature 0) answers the
    hidden number wherever the oracle with the same full heads does, and exactly as the oracle elsewhere; the
    server counts the training prompt's tokens (BOS + 48 words + ?)."""
    from rlkv_vllm.core.patterns import select_full_heads

    spec = task.TaskSpec()
    examples = task.make_examples(8, ph.EVAL_SEED, spec)
    ev = ph.Evaluator(task.FIXTURE_DIR, examples, spec.sink, spec.recent)
    sparsity = results["runs"]["correctness"]["at_learned_sparsity"]["sparsity"]
    pattern = ph.pattern_path("correctness")
    if served == "stock":
        mask, r = np.ones(ev.shape, dtype=bool), ph.serve_check(examples, None, None, spec.sink, spec.recent)
    else:
        from rlkv_vllm.core.patterns import HeadPattern

        mask = select_full_heads(HeadPattern.load(pattern).gates, sparsity, "global")
        r = ph.serve_check(examples, pattern, sparsity, spec.sink, spec.recent)
        assert mask.sum() < mask.size  # some heads do stream
    oracle = [ev.tokenizer.convert_ids_to_tokens(int(i)) for i in ev.predictions(mask)]
    assert r["prompt_tokens"] == [spec.prompt_tokens] * len(examples)
    assert r["answers"] == oracle
    assert sum(a == ex.answer for a, ex in zip(r["answers"], examples)) >= 6, r["answers"]
