"""(d) The OpenAI-compatible server with RLKV: completions, chat, streaming, 64 concurrent
requests (more than max_num_seqs) equal to the same requests sent one by one, client
aborts, and the RLKV metrics on /metrics."""

from __future__ import annotations

import concurrent.futures as cf
import random
import time

import pytest

from rlkv_vllm.server import parse_prometheus, start_server
from tests.engine_utils import random_gates, write_pattern

pytestmark = pytest.mark.slow

MAX_SEQS = 8


@pytest.fixture(scope="module")
def server(tiny_model, tmp_path_factory):
    d = tmp_path_factory.mktemp("srv")
    pattern = write_pattern(str(d / "p.json"), random_gates(4, 4, seed=2))
    rlkv = {"heads": pattern, "sparsity": 0.5, "sink": 4, "recent": 8}
    extra = ["--dtype", "float32", "--max-model-len", "1024", "--max-num-seqs", str(MAX_SEQS),
             "--kv-cache-memory-bytes", str(64 << 20)]
    # the default multi-process engine, as users run it
    srv = start_server(tiny_model, rlkv=rlkv, extra_args=extra, env={"VLLM_ENABLE_V1_MULTIPROCESSING": "1"})
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server):
    from openai import OpenAI

    return OpenAI(base_url=server.base_url + "/v1", api_key="none", max_retries=0, timeout=300)


def metric(server, name, **labels):
    for lab, value in parse_prometheus(server.get("/metrics")).get(name, []):
        if all(lab.get(k) == v for k, v in labels.items()):
            return value
    raise KeyError(name)


def wait_slots_free(server, timeout=30.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if metric(server, "rlkv:ring_slots", state="in_use") == 0:
            return True
        time.sleep(0.2)
    return False


def test_completion_chat_and_streaming(client):
    c = client.completions.create(model="tiny", prompt="Question: Ada has 3 apples", max_tokens=20, temperature=0)
    assert c.choices[0].text and c.usage.completion_tokens == 20
    chat = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "How many coins?"}], max_tokens=16, temperature=0
    )
    assert chat.choices[0].message.content is not None and chat.usage.completion_tokens > 0
    stream = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "How many coins?"}], max_tokens=16, temperature=0,
        stream=True,
    )
    pieces = [ch.choices[0].delta.content or "" for ch in stream if ch.choices]
    assert "".join(pieces) == chat.choices[0].message.content
    text_stream = client.completions.create(
        model="tiny", prompt="Question: Ada has 3 apples", max_tokens=20, temperature=0, stream=True
    )
    assert "".join(ch.choices[0].text for ch in text_stream) == c.choices[0].text


def test_concurrent_equals_sequential(client, server):
    rng = random.Random(0)
    words = "Ada Bob apples coins count first next subtract plus times answer think step".split()
    prompts = [" ".join(rng.choice(words) for _ in range(rng.randint(2, 60))) for _ in range(64)]

    def ask(p):
        r = client.completions.create(model="tiny", prompt=p, max_tokens=40, temperature=0,
                                      extra_body={"ignore_eos": True})
        return r.choices[0].text, r.choices[0].finish_reason

    with cf.ThreadPoolExecutor(64) as pool:
        together = list(pool.map(ask, prompts))
    peak = metric(server, "rlkv:ring_slots_peak")
    alone = [ask(p) for p in prompts]
    assert all(fr == "length" for _, fr in together)
    assert peak == MAX_SEQS, f"64 concurrent requests should fill all {MAX_SEQS} ring slots (peak {peak})"
    diffs = [i for i, (a, b) in enumerate(zip(together, alone)) if a != b]
    assert not diffs, f"requests {diffs[:5]} differ between concurrent and one-by-one runs"
    assert wait_slots_free(server)


def test_client_abort_frees_slots(client, server):
    streams = []
    for i in range(6):
        s = client.completions.create(model="tiny", prompt=f"Let us think {i}", max_tokens=400, temperature=0,
                                      stream=True)
        next(iter(s))
        streams.append(s)
    for s in streams:
        s.close()  # client disconnects mid-generation
    assert wait_slots_free(server), "aborted requests must release their ring slots"
    ok = client.completions.create(model="tiny", prompt="still serving?", max_tokens=8, temperature=0)
    assert ok.usage.completion_tokens == 8


def test_metrics(server):
    m = parse_prometheus(server.get("/metrics"))
    assert abs(m["rlkv:sparsity"][0][1] - 0.5) < 1e-9
    heads = {lab["kind"]: v for lab, v in m["rlkv:kv_heads"]}
    assert heads == {"full": 8, "streaming": 8}
    bpt = {lab["cache"]: v for lab, v in m["rlkv:kv_bytes_per_token"]}
    assert bpt["stock"] == 4 * 4 * 2 * 32 * 4 and bpt["rlkv"] == bpt["stock"] / 2
    slots = {lab["state"]: v for lab, v in m["rlkv:ring_slots"]}
    assert slots["in_use"] + slots["free"] == MAX_SEQS
    assert m["rlkv_info"][0][0]["mode"] == "serve"
    # vLLM's own cache figure sees the larger paged pool
    cache = m["vllm:cache_config_info"][0][0]
    assert int(cache["num_gpu_blocks"]) * int(cache["block_size"]) > (64 << 20) // bpt["stock"]
