"""rlkv eval against a real RLKV server (the tiny model, sparsity 0.5): the plumbing end to end. The tiny
model's weights are random, so its answers are noise: this checks requests, caching, the output and the
command, not accuracy."""

from __future__ import annotations

import json
import os
from typing import Iterator

import pytest

from rlkv_trainer.evaluate import evaluate
from rlkv_trainer.grading import Grader
from rlkv_vllm import cli
from rlkv_vllm.server import ServerProcess, start_server
from tests.engine_utils import random_gates, write_pattern
from tests.trainer import EVAL

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]
GSM8K = os.path.join(EVAL, "gsm8k_test.jsonl")


@pytest.fixture(scope="module")
def server(tiny_model, tmp_path_factory) -> Iterator[ServerProcess]:
    d = tmp_path_factory.mktemp("eval-srv")
    pattern = write_pattern(str(d / "p.json"), random_gates(4, 4, seed=2))
    srv = start_server(tiny_model, rlkv={"heads": pattern, "sparsity": 0.5},
                       extra_args=["--dtype", "float32", "--max-model-len", "1024", "--max-num-seqs", "8",
                                   "--kv-cache-memory-bytes", str(64 << 20)],
                       env={"VLLM_ENABLE_V1_MULTIPROCESSING": "1"})
    yield srv
    srv.stop()


def test_gsm8k_and_mbpp_against_the_tiny_rlkv_server(server, tmp_path) -> None:
    base_url = f"http://127.0.0.1:{server.port}/v1"
    cache = str(tmp_path / "gsm8k.cache.jsonl")
    with Grader(2) as pool:
        first = evaluate(base_url, "tiny", "gsm8k", data=GSM8K, samples=2, limit=4, seed=0, concurrency=4,
                         max_tokens=16, cache_path=cache, grader=pool, progress=False)
        again = evaluate(base_url, "tiny", "gsm8k", data=GSM8K, samples=2, limit=4, seed=0, concurrency=4,
                         max_tokens=16, cache_path=cache, grader=pool, progress=False)
        mbpp = evaluate(base_url, "tiny", "mbpp", data=os.path.join(EVAL, "mbpp.jsonl"), limit=2, max_tokens=16,
                        grader=pool, progress=False)
    doc = first.to_json()
    assert first.requests["sent"] == 8 and len(doc["items"]) == 4
    for item in doc["items"]:
        assert len(item["samples"]) == 2
        for sample in item["samples"]:
            assert isinstance(sample["text"], str) and 0 < sample["completion_tokens"] <= 16
            assert sample["finish_reason"] in ("length", "stop") and sample["status"] in ("ok", "no_answer")
    assert 0.0 <= first.summary.pass_at_1 <= 1.0 and first.summary.ci95[0] <= first.summary.ci95[1]
    # the second run is read from the cache, and grades the same
    assert again.requests == {**first.requests, "sent": 0, "cached": 8}
    assert [[s["text"] for s in i["samples"]] for i in again.to_json()["items"]] == [
        [s["text"] for s in i["samples"]] for i in doc["items"]]
    assert len(mbpp.items) == 2 and mbpp.to_json()["grading"]["sandbox"]["mode"]


def test_the_command_against_the_tiny_rlkv_server(server, tmp_path, capsys) -> None:
    out = str(tmp_path / "aime24.json")
    code = cli.main(["eval", "--base-url", f"http://127.0.0.1:{server.port}/v1", "--model", "tiny", "--task",
                     "aime24", "--data", os.path.join(EVAL, "aime24_test.jsonl"), "--limit", "3", "--max-tokens",
                     "8", "--no-progress", "--out", out])
    printed = capsys.readouterr()[0]
    assert code == 0 and printed.splitlines()[1].split()[:4] == ["aime24", "tiny", "3", "1"]
    assert json.load(open(out))["summary"]["items"] == 3
