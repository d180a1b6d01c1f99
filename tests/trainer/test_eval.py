"""rlkv eval: statistics against hand-computed values, the tasks' data and templates, and the run itself
against a local fake OpenAI server (answers chosen per prompt, injected failures): retries, the bound on
concurrency, caching and resume, the JSON and the table, the command line."""

from __future__ import annotations

import json
import math
import os
import re
from typing import Any, Iterator

import pytest

from rlkv_trainer.data import DataError
from rlkv_trainer.eval_client import EndpointError
from rlkv_trainer.eval_stats import bootstrap_interval, ks_for, pass_at_k, summarize
from rlkv_trainer.eval_tasks import MBPP_TEMPLATE, MMLU_PRO_TEMPLATE, get_task, load_items
from rlkv_trainer.evaluate import SCHEMA, evaluate
from rlkv_trainer.grading import Grader
from rlkv_vllm import cli
from tests.trainer import EVAL
from tests.trainer.fake_openai import FakeOpenAI

pytestmark = pytest.mark.timeout(180)
GSM8K = os.path.join(EVAL, "gsm8k_test.jsonl")


# --- statistics --------------------------------------------------------------------------------------------


def test_pass_at_k_matches_the_binomial_formula() -> None:
    # 1 - C(n-c, k) / C(n, k), by hand: n=5, c=2, k=2: 1 - C(3,2)/C(5,2) = 1 - 3/10
    assert pass_at_k(5, 2, 2) == pytest.approx(0.7)
    assert pass_at_k(5, 2, 1) == pytest.approx(0.4)  # k=1 is c/n
    assert pass_at_k(10, 3, 5) == pytest.approx(1 - math.comb(7, 5) / math.comb(10, 5))  # 1 - 21/252
    assert pass_at_k(4, 0, 4) == 0.0 and pass_at_k(4, 1, 4) == 1.0 and pass_at_k(3, 2, 2) == 1.0
    for n, c, k in [(20, 7, 3), (16, 1, 8), (100, 50, 10)]:
        assert pass_at_k(n, c, k) == pytest.approx(1 - math.comb(n - c, k) / math.comb(n, k))
    with pytest.raises(ValueError, match="k <= n"):
        pass_at_k(2, 1, 3)


def test_bootstrap_interval_is_seeded_and_brackets_the_mean() -> None:
    values = [1.0] * 12 + [0.0] * 18  # an AIME24-sized run at 40 %
    lo, hi = bootstrap_interval(values, seed=0)
    assert (lo, hi) == bootstrap_interval(values, seed=0)
    assert lo < 0.4 < hi
    # the normal approximation: 0.4 +- 1.96 * sqrt(0.24 / 30) = +- 17.5 points; the bootstrap agrees within ~2
    assert hi - lo == pytest.approx(2 * 1.96 * math.sqrt(0.24 / 30), abs=0.04)
    assert bootstrap_interval([1.0, 1.0, 1.0]) == (1.0, 1.0)


def test_summarize_averages_samples_per_item() -> None:
    correct = [[True, True, False, False], [True, False, False, False], [False] * 4]
    s = summarize(correct, [[True] * 4, [True, True, False, False], [False] * 4])
    assert s.items == 3 and s.samples == 4
    assert s.pass_at_1 == pytest.approx((0.5 + 0.25 + 0) / 3)
    assert s.pass_at_k[2] == pytest.approx((pass_at_k(4, 2, 2) + pass_at_k(4, 1, 2)) / 3)  # (5/6 + 1/2) / 3
    assert s.pass_at_k[4] == pytest.approx(2 / 3)
    assert s.answered == pytest.approx(6 / 12)
    assert ks_for(1) == [1] and ks_for(8) == [1, 2, 4, 8] and ks_for(6) == [1, 2, 4, 6]
    with pytest.raises(ValueError, match="same number"):
        summarize([[True], [True, False]])


# --- tasks and data ----------------------------------------------------------------------------------------


def test_the_shared_files_load_in_their_public_formats() -> None:
    gsm8k = load_items(get_task("gsm8k"), GSM8K)
    assert len(gsm8k) == 1319 and gsm8k[0].kind == "gsm8k" and gsm8k[0].gold == "18"
    assert gsm8k[0].prompt.endswith("\nPlease reason step by step, and put your final answer within \\boxed{}.")
    math500 = load_items(get_task("math500"), os.path.join(EVAL, "math500_test.jsonl"))
    assert len(math500) == 500 and math500[0].id.startswith("test/") and "subject" in math500[0].meta
    aime = load_items(get_task("aime24"), os.path.join(EVAL, "aime24_test.jsonl"), limit=5)
    assert len(aime) == 5 and aime[0].kind == "math"
    mbpp = load_items(get_task("mbpp"), os.path.join(EVAL, "mbpp.jsonl"))
    assert len(mbpp) == 500 and mbpp[0].id == "11" and mbpp[-1].id == "510"  # the test split
    assert len(load_items(get_task("mbpp"), os.path.join(EVAL, "mbpp.jsonl"), split="full")) == 974
    first = mbpp[0]
    assert first.prompt.startswith("You are an expert Python programmer, and here is your task:\n")
    assert "Your code should pass these tests:\nassert remove_Occ(" in first.prompt
    assert first.gold.count("assert ") == 3 and first.kind == "mbpp"


MMLU_ROWS = [
    {"question_id": 70, "question": "Which is a prime?", "options": ["4", "6", "7", "8", "9", "10", "12", "14",
     "15", "16"], "answer": "C", "answer_index": 2, "cot_content": "", "category": "math", "src": "made-up"},
    {"question_id": 71, "question": "Who wrote the Republic?", "options": ["Plato", "Kant", "Hume", "Locke"],
     "answer": "A", "answer_index": 0, "cot_content": "", "category": "philosophy", "src": "made-up"},
    {"question_id": 72, "question": "Big-O of binary search?", "options": ["O(n)", "O(log n)", "O(1)"],
     "answer": "B", "answer_index": 1, "cot_content": "", "category": "computer science", "src": "made-up"},
]


@pytest.fixture
def mmlu_files(tmp_path) -> dict[str, str]:
    """A made-up MMLU-Pro test set as JSONL and as parquet (the hub's format)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    jsonl = tmp_path / "mmlu_pro.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in MMLU_ROWS))
    parquet = tmp_path / "test-00000-of-00001.parquet"
    pq.write_table(pa.Table.from_pylist(MMLU_ROWS), str(parquet))
    return {"jsonl": str(jsonl), "parquet": str(parquet)}


def test_mmlu_pro_format_template_and_categories(mmlu_files) -> None:
    for path in mmlu_files.values():
        items = load_items(get_task("mmlu-pro"), path)
        assert [i.gold for i in items] == ["C", "A", "B"] and [i.id for i in items] == ["70", "71", "72"]
        first = items[0].prompt
        assert first.startswith("The following are multiple choice questions (with answers) about math. Think "
                                "step by step and then finish your answer with \"the answer is (X)\"")
        assert "\nOptions:\nA. 4\nB. 6\nC. 7\n" in first and "\nJ. 16\nAnswer: Let's think step by step." in first
    law = load_items(get_task("mmlu-pro:Computer_Science"), mmlu_files["parquet"])
    assert [i.id for i in law] == ["72"]
    with pytest.raises(DataError, match=r"no item of category 'law' .* categories: computer science, math, "
                                        r"philosophy"):
        load_items(get_task("mmlu-pro:law"), mmlu_files["jsonl"])
    assert MMLU_PRO_TEMPLATE.count("{") == 3 and MBPP_TEMPLATE.count("{") == 2


def test_prompts_task_reads_the_trainer_format_and_sends_prompts_as_they_are(tmp_path, pool) -> None:
    f = tmp_path / "p.jsonl"
    rows = [{"prompt": "ba ko 42 te ?", "answer": "42"}, {"id": "x", "prompt": "What is 1/2 + 1/4?", "answer": "3/4"}]
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    items = load_items(get_task("prompts"), str(f))
    assert [(i.id, i.prompt, i.gold, i.kind) for i in items] == [
        ("p.jsonl:1", "ba ko 42 te ?", "42", "gsm8k"), ("x", "What is 1/2 + 1/4?", "3/4", "gsm8k")]
    math = load_items(get_task("prompts:math"), str(f))
    assert [i.kind for i in math] == ["math", "math"] and get_task("prompts:math").label == "prompts:math"
    # the last number grades the first; math-verify the fraction
    from rlkv_trainer.grading import GradeItem

    verdicts = pool.grade([GradeItem("42", "42", "gsm8k"), GradeItem("\\boxed{0.75}", "3/4", "math"),
                           GradeItem("41", "42", "gsm8k")])
    assert [v.correct for v in verdicts] == [True, True, False]
    with pytest.raises(DataError, match=r"prompts grades as number or math, not 'code'"):
        get_task("prompts:code")


def test_data_errors_are_one_line(tmp_path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"question": "q", "options": ["a", "b"], "answer": "E", "category": "x"}) + "\n")
    cases = [
        (lambda: get_task("gsm9k"), r"--task 'gsm9k': unknown task; allowed: gsm8k, math500, aime24, mbpp"),
        (lambda: get_task("gsm8k:law"), r"only mmlu-pro takes a :CATEGORY"),
        (lambda: load_items(get_task("mmlu-pro"), str(bad)), r"bad\.jsonl:1: field 'answer' is 'E'; allowed: a "
                                                             r"letter A-B"),
        (lambda: load_items(get_task("mbpp"), GSM8K), r"gsm8k_test\.jsonl:1: missing field 'task_id'; this task's "
                                                      r"format needs task_id, text, test_list"),
        (lambda: load_items(get_task("gsm8k"), str(tmp_path / "none.jsonl")), r"no such file or directory"),
        (lambda: load_items(get_task("mbpp"), os.path.join(EVAL, "mbpp.jsonl"), split="train"),
         r"--split 'train' for mbpp; allowed: test"),
    ]
    for call, pattern in cases:
        with pytest.raises(DataError, match=pattern) as e:
            call()
        assert "\n" not in str(e.value)


# --- runs against a fake server ----------------------------------------------------------------------------


def _gold_by_prompt(task: str, path: str, limit: int) -> dict[str, str]:
    return {i.prompt: i.gold for i in load_items(get_task(task), path, limit=limit)}


@pytest.fixture
def fake() -> Iterator[FakeOpenAI]:
    golds = _gold_by_prompt("gsm8k", GSM8K, 6)
    order = list(golds)

    def reply(body: dict[str, Any]) -> str:
        prompt = body["messages"][-1]["content"]
        i = order.index(prompt)
        # items 0-2 right every time, item 3 right on even seeds only, items 4-5 wrong; item 5 answers nothing
        right = i < 3 or (i == 3 and body.get("seed", 0) % 2 == 0)
        if i == 5:
            return "I am not sure."
        return f"Let me think. The answer is \\boxed{{{golds[prompt] if right else int(golds[prompt]) + 1}}}."

    server = FakeOpenAI(reply)
    yield server
    server.close()


@pytest.fixture(scope="module")
def pool() -> Iterator[Grader]:
    with Grader(2) as g:
        yield g


def test_run_grades_per_sample_and_writes_the_schema(fake, pool, tmp_path) -> None:
    result = evaluate(fake.base_url, "fake", "gsm8k", data=GSM8K, samples=2, limit=6, seed=0, concurrency=3,
                      max_tokens=64, cache_path=str(tmp_path / "c.jsonl"), grader=pool, progress=False)
    s = result.summary
    assert (s.items, s.samples) == (6, 2)
    assert s.pass_at_1 == pytest.approx((3 * 1.0 + 0.5) / 6)  # item 3: seed 0 right, seed 1 wrong
    assert s.pass_at_k[2] == pytest.approx(4 / 6) and s.answered == pytest.approx(10 / 12)
    assert s.ci95[0] < s.pass_at_1 < s.ci95[1]
    sent = sorted((b["messages"][-1]["content"][:30], b["seed"]) for b in fake.requests)
    assert len(sent) == 12 and {seed for _, seed in sent} == {0, 1}
    assert {(b["temperature"], b["top_p"], b["max_tokens"]) for b in fake.requests} == {(0.6, 0.95, 64)}
    out = str(tmp_path / "r.json")
    result.write(out)
    doc = json.load(open(out))
    assert doc["schema"] == SCHEMA and doc["task"] == "gsm8k" and doc["model"] == "fake"
    assert doc["prompts"]["template"].endswith("within \\boxed{}.") and "evalscope" in doc["prompts"]["source"]
    assert doc["sampling"] == {"max_tokens": 64, "temperature": 0.6, "top_p": 0.95, "seed": 0}
    assert doc["summary"]["pass_at_k"].keys() == {"1", "2"} and len(doc["summary"]["ci95"]) == 2
    assert doc["grading"] == {"kind": "gsm8k", "statuses": {"ok": 10, "no_answer": 2}, "sandbox": None}
    item3 = doc["items"][3]
    assert item3["correct"] == 1 and item3["pass_at_1"] == 0.5 and item3["gold"] == doc["items"][3]["gold"]
    assert [(x["sample"], x["correct"], x["status"]) for x in item3["samples"]] == [(0, True, "ok"), (1, False, "ok")]
    assert item3["samples"][0]["extracted"] == item3["gold"] and item3["samples"][0]["text"].startswith("Let me")
    assert doc["items"][5]["samples"][0]["extracted"] is None
    table = result.table().splitlines()
    assert table[0].split() == ["task", "model", "items", "samples", "pass@1", "95%", "CI", "pass@2", "answered"]
    assert table[1].split()[:5] == ["gsm8k", "fake", "6", "2", "58.3%"] and "66.7%" in table[1]
    assert table[2].startswith("verdicts: no_answer 2, ok 10; requests: 12 sent, 0 from the cache, 0 retried")


def test_retries_ride_out_a_flaky_server_and_concurrency_is_bounded(fake, pool) -> None:
    fake.fail_first = 2  # every prompt: two 503s, then an answer
    fake.delay_s = 0.05
    result = evaluate(fake.base_url, "fake", "gsm8k", data=GSM8K, samples=1, limit=6, concurrency=2,
                      max_tokens=16, backoff_s=0.01, grader=pool, progress=False)
    assert result.requests["retried"] == 12 and result.requests["sent"] == 6 and len(fake.requests) == 18
    assert result.summary.pass_at_1 == pytest.approx(4 / 6)  # greedy sends no seed: item 3 is right
    assert fake.max_in_flight == 2


def test_an_interrupted_run_resumes_from_the_cache(fake, pool, tmp_path) -> None:
    cache = str(tmp_path / "run.cache.jsonl")
    fake.fail_prompts = set(list(_gold_by_prompt("gsm8k", GSM8K, 6))[3:])  # items 3-5 never answer
    fake.fail_first = 1  # the others: one 503, then an answer
    with pytest.raises(EndpointError, match=r"request failed 2 times, last: HTTP 503"):
        evaluate(fake.base_url, "fake", "gsm8k", data=GSM8K, limit=6, concurrency=1, retries=1, backoff_s=0.01,
                 cache_path=cache, grader=pool, progress=False)
    cached = [json.loads(line) for line in open(cache)]
    assert 1 <= len(cached) <= 3  # what finished before the failure (concurrency 1: in order)
    fake.fail_prompts.clear()
    fake.fail_first = 0
    before = len(fake.requests)
    result = evaluate(fake.base_url, "fake", "gsm8k", data=GSM8K, limit=6, concurrency=4, cache_path=cache,
                      grader=pool, progress=False)
    prompts = list(_gold_by_prompt("gsm8k", GSM8K, 6))
    resent = {prompts.index(b["messages"][-1]["content"]) for b in fake.requests[before:]}
    assert resent == set(range(len(cached), 6))  # only the missing ones were sent (and a straggler of run 1)
    assert result.requests["cached"] == len(cached) and result.summary.pass_at_1 == pytest.approx(4 / 6)
    with open(cache, "a") as f:
        f.write('{"key": "torn')  # a kill mid-write
    again = evaluate(fake.base_url, "fake", "gsm8k", data=GSM8K, limit=6, cache_path=cache, grader=pool,
                     progress=False)
    assert again.requests["sent"] == 0 and again.summary.pass_at_1 == result.summary.pass_at_1
    # other sampling parameters are other requests
    other = evaluate(fake.base_url, "fake", "gsm8k", data=GSM8K, limit=6, max_tokens=17, cache_path=cache,
                     grader=pool, progress=False)
    assert other.requests["cached"] == 0


def test_mbpp_through_the_sandbox(pool, tmp_path) -> None:
    rows = {str(r["task_id"]): r for r in map(json.loads, open(os.path.join(EVAL, "mbpp.jsonl")))}
    items = load_items(get_task("mbpp"), os.path.join(EVAL, "mbpp.jsonl"), limit=4)
    by_prompt = {i.prompt: i.id for i in items}

    def reply(body: dict[str, Any]) -> str:
        task_id = by_prompt[body["messages"][-1]["content"]]
        code = rows[task_id]["code"] if task_id != "12" else "def wrong(): pass"
        return f"Here you go:\n```python\n{code}\n```"

    server = FakeOpenAI(reply)
    try:
        result = evaluate(server.base_url, "fake", "mbpp", data=os.path.join(EVAL, "mbpp.jsonl"), limit=4,
                          grader=pool, progress=False)
    finally:
        server.close()
    assert [r.correct for r in result.items] == [1, 0, 1, 1]
    doc = result.to_json()
    assert doc["grading"]["sandbox"]["mode"] in ("bwrap", "unshare", "rlimits")
    assert "NameError" in doc["items"][1]["samples"][0]["detail"]
    assert doc["items"][0]["samples"][0]["extracted"].startswith("def remove_Occ")


def _with(argv: list[str], *pairs: str) -> list[str]:
    """``argv`` with each option of ``pairs`` (option, value, ...) set: replaced where present, else added."""
    out = list(argv)
    for option, value in zip(pairs[::2], pairs[1::2]):
        if option in out:
            out[out.index(option) + 1] = value
        else:
            out += [option, value]
    return out


def test_command_line_end_to_end(fake, tmp_path, capsys, monkeypatch) -> None:
    out = str(tmp_path / "eval" / "gsm8k.json")
    argv = ["eval", "--base-url", fake.base_url, "--model", "fake", "--task", "gsm8k", "--data", GSM8K,
            "--limit", "4", "--max-tokens", "32", "--concurrency", "2", "--no-progress", "--out", out]
    assert cli.main(argv) == 0
    printed, err = capsys.readouterr()
    assert printed.splitlines()[1].split()[:5] == ["gsm8k", "fake", "4", "1", "100.0%"]
    assert f"wrote {out}" in err and os.path.exists(out[:-5] + ".cache.jsonl")
    assert json.load(open(out))["summary"]["items"] == 4
    assert cli.main(argv) == 0 and "4 from the cache" in capsys.readouterr()[0]
    # one-line errors: an unknown model (404), a missing --data, an unreachable server
    for args, code, pattern in [
        (["--model", "nope"], 1, r"refused the request \(HTTP 404: .*does not exist"),
        (["--data", str(tmp_path / "missing.jsonl")], 2, r"missing\.jsonl: no such file or directory"),
        (["--samples", "0"], 2, r"--samples must be >= 1, got 0"),
        (["--base-url", "http://127.0.0.1:9/v1", "--retries", "0"], 1, r"request failed 1 times, last: "
                                                                     r"APIConnectionError"),
    ]:
        assert cli.main(_with(argv, *args)) == code, args
        err = capsys.readouterr()[1]
        assert err.count("\n") == 1 and err.startswith("rlkv eval: "), err
        assert re.search(pattern, err), err
    monkeypatch.delenv("RLKV_EVAL_DATA", raising=False)
    no_data = [a for a in argv if a not in ("--data", GSM8K)]
    assert cli.main(no_data) == 2 and "--data is required (or set RLKV_EVAL_DATA" in capsys.readouterr()[1]
    monkeypatch.setenv("RLKV_EVAL_DATA", EVAL)
    assert cli.main(no_data) == 0
