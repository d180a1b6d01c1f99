"""rlkv_trainer.data: loading (JSONL, the public formats, a JSON list, a dataset folder) and its one-line
errors, the chat template, the resumable iterator and the self-distillation filter's cache."""

from __future__ import annotations

import json
import os
from typing import Any, Mapping, Sequence

import pytest

from tests.trainer import EVAL
from rlkv_trainer.data import (
    MATH_INSTRUCTION,
    DataError,
    FilterKey,
    PromptFormat,
    PromptIterator,
    PromptRecord,
    chat_messages,
    data_fingerprint,
    load_prompts,
    render_prompts,
    select_solved,
    self_distill_filter,
    with_reference_answers,
)



def _write(path: Any, lines: Sequence[str]) -> str:
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def _records(n: int) -> list[PromptRecord]:
    return [PromptRecord(id=f"p{i}", prompt=f"question {i}", answer=str(i)) for i in range(n)]


# --- loading -----------------------------------------------------------------------------------------------


def test_generic_jsonl_with_optional_fields(tmp_path: Any) -> None:
    path = _write(tmp_path / "d.jsonl", [
        json.dumps({"prompt": "What is 1+1?", "answer": 2}),
        "",
        json.dumps({"prompt": "Name a colour.", "id": "c1", "kind": "mmlu_pro", "extra": [1]}),
    ])
    a, b = load_prompts(path)
    assert (a.id, a.prompt, a.answer, a.kind, a.source) == ("d.jsonl:1", "What is 1+1?", "2", "math", f"{path}:1")
    assert (b.id, b.answer, b.kind, dict(b.meta)) == ("c1", None, "mmlu_pro", {"extra": [1]})
    assert load_prompts(path, kind="gsm8k")[0].kind == "gsm8k"  # the argument sets records without a kind


def test_public_eval_files_load_in_their_formats() -> None:
    gsm = load_prompts(os.path.join(EVAL, "gsm8k_test.jsonl"))
    assert len(gsm) == 1319 and gsm[0].kind == "gsm8k" and gsm[0].answer == "18"
    assert gsm[0].prompt.startswith("Janet") and gsm[0].meta["solution"].endswith("#### 18")
    math500 = load_prompts(os.path.join(EVAL, "math500_test.jsonl"))
    assert len(math500) == 500 and math500[0].id == "test/precalculus/807.json" and math500[0].kind == "math"
    assert math500[0].answer == "\\left( 3, \\frac{\\pi}{2} \\right)" and "subject" in math500[0].meta
    aime = load_prompts(os.path.join(EVAL, "aime24_test.jsonl"))
    assert len(aime) == 30 and aime[0].id == "60" and aime[0].answer == "204"
    assert aime[0].prompt.startswith("Every morning Aya")
    assert len({r.id for r in gsm}) == 1319  # line-number ids are unique


@pytest.mark.parametrize("content,expected", [
    (['{"prompt": "a"}', "{not json"], r"d\.jsonl:2: not valid JSON .*each line must be one JSON object"),
    (['{"text": "a", "code": "x"}'], r"d\.jsonl:1: no prompt field; a record needs 'prompt' .*found fields: code, text"),
    (['["a list"]'], r"d\.jsonl:1: expected a JSON object, got list"),
    (['{"prompt": ""}'], r"d\.jsonl:1: field 'prompt' must be a non-empty string"),
    (['{"prompt": "a", "answer": {"x": 1}}'], r"d\.jsonl:1: field 'answer' must be a string or a number"),
    (['{"prompt": "a", "kind": "code"}'], r"d\.jsonl:1: field 'kind' is 'code'; allowed: math, gsm8k, mmlu_pro"),
    (['{"question": "q", "answer": "so #### none"}'], r"d\.jsonl:1: .*'####' but no number"),
    (['{"prompt": "a", "id": 7}', '{"prompt": "b", "id": "7"}'], r"d\.jsonl:2: id '7' already used at .*d\.jsonl:1"),
    ([""], r"d\.jsonl: no records"),
])
def test_bad_input_is_one_line_naming_file_line_and_rule(tmp_path: Any, content: list[str], expected: str) -> None:
    path = _write(tmp_path / "d.jsonl", content)
    with pytest.raises(DataError, match=expected) as e:
        load_prompts(path)
    assert "\n" not in str(e.value) and isinstance(e.value, ValueError)


def test_missing_path_and_bad_kind(tmp_path: Any) -> None:
    with pytest.raises(DataError, match=r"nope\.jsonl: no such file or directory; expected a \.jsonl file"):
        load_prompts(str(tmp_path / "nope.jsonl"))
    path = _write(tmp_path / "d.jsonl", ['{"prompt": "a"}'])
    with pytest.raises(DataError, match="kind 'code' is not a grading kind"):
        load_prompts(path, kind="code")


def test_json_list_like_deepscaler(tmp_path: Any) -> None:
    path = tmp_path / "deepscaler.json"
    path.write_text(json.dumps([{"problem": "p1", "answer": "\\frac12", "solution": "s"}, {"problem": "p2", "answer": "3"}]))
    records = load_prompts(str(path))
    assert [(r.id, r.prompt, r.answer) for r in records] == [("deepscaler.json:0", "p1", "\\frac12"),
                                                             ("deepscaler.json:1", "p2", "3")]
    path.write_text(json.dumps([{"problem": "p1"}, {"nothing": 1}]))
    with pytest.raises(DataError, match=r"deepscaler\.json: record 1: no prompt field"):
        load_prompts(str(path))


def test_dataset_folder_offline(tmp_path: Any) -> None:
    import datasets

    rows = [{"problem": "p0", "answer": "1"}, {"problem": "p1", "answer": "2"}]
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "ds"))
    records = load_prompts(str(tmp_path / "ds"))
    assert [(r.id, r.prompt, r.answer) for r in records] == [("ds:0", "p0", "1"), ("ds:1", "p1", "2")]
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows), "test": datasets.Dataset.from_list(rows[:1])}
                         ).save_to_disk(str(tmp_path / "dd"))
    assert len(load_prompts(str(tmp_path / "dd"), split="test")) == 1
    with pytest.raises(DataError, match="no split given; the dataset has splits: test, train"):
        load_prompts(str(tmp_path / "dd"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="not a Hugging Face dataset"):
        load_prompts(str(tmp_path / "empty"))


# --- chat template -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory: Any) -> str:
    from rlkv_vllm.tiny_model import train_tokenizer

    out = tmp_path_factory.mktemp("tok")
    train_tokenizer(str(out), 512)
    return str(out)


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir: str) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tokenizer_dir)


def test_chat_template_with_instruction_and_system_prompt(tokenizer: Any) -> None:
    record = PromptRecord(id="x", prompt="What is 2+3?")
    assert tokenizer.chat_template  # the tiny tokenizer ships one
    [plain] = render_prompts(tokenizer, [record])
    assert plain.text == "<|user|> What is 2+3? </s> <|assistant|>"  # add_generation_prompt=True
    fmt = PromptFormat(system_prompt="Be brief.", instruction=MATH_INSTRUCTION)
    assert chat_messages(record, fmt) == [{"role": "system", "content": "Be brief."},
                                          {"role": "user", "content": "What is 2+3?\n" + MATH_INSTRUCTION}]
    [full] = render_prompts(tokenizer, [record], fmt)
    assert full.text.startswith("<|system|> Be brief. </s> <|user|> What is 2+3?\nPlease reason step by step")
    assert full.text.endswith("\\boxed{}. </s> <|assistant|>")
    assert tokenizer.decode(full.token_ids) == full.text


def test_template_bos_is_not_doubled_and_a_missing_template_is_one_line(tokenizer_dir: str) -> None:
    from transformers import AutoTokenizer

    # like Llama / R1-distill tokenizers: encoding adds BOS, and the chat template writes it as well
    tok = AutoTokenizer.from_pretrained(tokenizer_dir, add_bos_token=True)
    tok.chat_template = "{{ bos_token }}" + tok.chat_template
    bos = tok.convert_tokens_to_ids("<s>")
    assert tok("hi")["input_ids"][0] == bos
    [r] = render_prompts(tok, [PromptRecord(id="x", prompt="hi")])
    assert r.text.startswith("<s><|user|>") and r.token_ids[0] == bos and r.token_ids.count(bos) == 1
    tok.chat_template = None
    with pytest.raises(DataError, match="no chat template"):
        render_prompts(tok, [PromptRecord(id="x", prompt="hi")])


# --- iterator ----------------------------------------------------------------------------------------------


def _ids(batches: Sequence[Sequence[PromptRecord]]) -> list[list[str]]:
    return [[r.id for r in b] for b in batches]


def test_iterator_is_seeded_per_epoch_and_drops_the_tail() -> None:
    records = _records(10)
    it = PromptIterator(records, 3, seed=1, num_epochs=2)
    batches = _ids(list(it))
    assert len(batches) == 2 * it.steps_per_epoch == 6 and all(len(b) == 3 for b in batches)
    epoch0, epoch1 = sum(batches[:3], []), sum(batches[3:], [])
    assert len(set(epoch0)) == 9 and len(set(epoch1)) == 9 and epoch0 != epoch1  # reshuffled, no repeats
    assert _ids(list(PromptIterator(records, 3, seed=1, num_epochs=2))) == batches  # deterministic
    assert _ids(list(PromptIterator(records, 3, seed=2, num_epochs=2))) != batches
    ordered = _ids(list(PromptIterator(records, 4, shuffle=False, drop_last=False, num_epochs=1)))
    assert ordered == [["p0", "p1", "p2", "p3"], ["p4", "p5", "p6", "p7"], ["p8", "p9"]]


def test_iterator_state_round_trip_resumes_with_the_next_batch() -> None:
    records = _records(10)
    it = PromptIterator(records, 3, seed=5)
    for _ in range(4):  # into the second epoch
        next(it)
    state = json.loads(json.dumps(it.state_dict()))  # survives a JSON checkpoint
    expected = _ids([next(it) for _ in range(5)])
    resumed = PromptIterator(records, 3, seed=5)
    resumed.load_state_dict(state)
    assert _ids([next(resumed) for _ in range(5)]) == expected and resumed.step == 9
    with pytest.raises(DataError, match="saved with num_records=10, this run has num_records=9"):
        PromptIterator(records[:9], 3, seed=5).load_state_dict(state)
    with pytest.raises(DataError, match="saved with seed=5, this run has seed=6"):
        PromptIterator(records, 3, seed=6).load_state_dict(state)
    with pytest.raises(DataError, match="batch_size 11 > 10 prompts"):
        PromptIterator(records, 11)


# --- self-distillation filter ------------------------------------------------------------------------------


def test_select_solved_keeps_k_of_n() -> None:
    records = _records(3)
    correct = {"p0": [True, True, False, False], "p1": [True, False, False, False], "p2": [True] * 4}
    kept, solved = select_solved(records, correct, k=2, n=4)
    assert [r.id for r in kept] == ["p0", "p2"] and solved == {"p0": 2, "p1": 1, "p2": 4}
    with pytest.raises(DataError, match=r"prompt 'p1' .* has 3 sample results, n = 4"):
        select_solved(records, {**correct, "p1": [True] * 3}, k=2, n=4)
    with pytest.raises(DataError, match="need 1 <= k <= n"):
        FilterKey("h", "m", k=5, n=4)


def test_filter_cache_is_reused_and_keyed(tmp_path: Any) -> None:
    data = _write(tmp_path / "d.jsonl", [json.dumps({"prompt": f"q{i}", "answer": str(i)}) for i in range(4)])
    records = load_prompts(data)
    calls: list[int] = []

    def sample(recs: Sequence[PromptRecord]) -> Mapping[str, Sequence[bool]]:
        calls.append(len(recs))
        return {r.id: [r.answer in ("1", "3")] * 2 for r in recs}

    key = FilterKey(data_fingerprint(data), "tiny", k=1, n=2, sampling={"temperature": 0.6, "top_p": 0.95})
    cache = str(tmp_path / "cache")
    kept, hit = self_distill_filter(records, key, cache, sample)
    assert [r.answer for r in kept] == ["1", "3"] and not hit and calls == [4]
    again, hit = self_distill_filter(records, key, cache, sample)
    assert again == kept and hit and calls == [4]  # the rerun reads the file
    (entry,) = os.listdir(cache)
    assert json.load(open(os.path.join(cache, entry)))["solved"] == {"d.jsonl:1": 0, "d.jsonl:2": 2,
                                                                      "d.jsonl:3": 0, "d.jsonl:4": 2}
    # any part of the key changing is a miss: sampling, k, model, the data bytes
    for other in (FilterKey(key.data_hash, "tiny", 1, 2, {"temperature": 1.0, "top_p": 0.95}),
                  FilterKey(key.data_hash, "tiny", 2, 2, key.sampling),
                  FilterKey(key.data_hash, "other", 1, 2, key.sampling)):
        assert not self_distill_filter(records, other, cache, sample)[1]
    with open(data, "a") as f:
        f.write(json.dumps({"prompt": "q4"}) + "\n")
    assert data_fingerprint(data) != key.data_hash
    assert len(calls) == 4


def test_reference_answers_attach_to_copies() -> None:
    records = _records(2)
    out = with_reference_answers(records, ["\\frac{1}{2}", None])
    assert [r.reference_answer for r in out] == ["\\frac{1}{2}", None] and records[0].reference_answer is None
    with pytest.raises(DataError, match="1 answers for 2 prompts"):
        with_reference_answers(records, ["x"])
