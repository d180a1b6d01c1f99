"""(d) The OpenAI-compatible server with RLKV: completions, chat, streaming, 64 concurrent
requests (more than max_num_seqs) equal to the same requests sent one by one, client
aborts, the RLKV metrics on /metrics (names checked without a server too), and a clean
stop that leaves no metrics file behind."""

from __future__ import annotations

import concurrent.futures as cf
import glob
import os
import random
import time
from typing import Callable

import pytest
import torch

from rlkv_vllm import metrics as rlkv_metrics
from rlkv_vllm.core.patterns import select_full_heads
from rlkv_vllm.core.plan import RLKVPlan, build_plan
from rlkv_vllm.core.settings import ModelShape, RLKVSettings
from rlkv_vllm.server import ServerProcess, parse_prometheus, start_server
from tests.engine_utils import random_gates, write_pattern

pytestmark = pytest.mark.slow

MAX_SEQS = 8
GATES = random_gates(4, 4, seed=2)


@pytest.fixture(scope="module")
def start_shared_server(tiny_model, tmp_path_factory) -> Callable[[], ServerProcess]:
    """The module's one server, started on first use (again only if a test stopped it)."""
    d = tmp_path_factory.mktemp("srv")
    pattern = write_pattern(str(d / "p.json"), GATES)
    rlkv = {"heads": pattern, "sparsity": 0.5, "sink": 4, "recent": 8}
    extra = ["--dtype", "float32", "--max-model-len", "1024", "--max-num-seqs", str(MAX_SEQS),
             "--kv-cache-memory-bytes", str(64 << 20)]
    started: list[ServerProcess] = []

    def get() -> ServerProcess:
        if not started or started[-1].proc.poll() is not None:
            # a private TMPDIR, where the front-end creates its rlkv-metrics-*.bin
            tmpdir = tmp_path_factory.mktemp("srv-tmp")
            # the default multi-process engine, as users run it
            srv = start_server(tiny_model, rlkv=rlkv, extra_args=extra,
                               env={"VLLM_ENABLE_V1_MULTIPROCESSING": "1", "TMPDIR": str(tmpdir)})
            srv.tmpdir = str(tmpdir)  # type: ignore[attr-defined]
            started.append(srv)
        return started[-1]

    yield get
    for srv in started:
        srv.stop()


@pytest.fixture
def server(start_shared_server) -> ServerProcess:
    return start_shared_server()


@pytest.fixture
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
    assert m["rlkv:config_info"][0][0]["mode"] == "serve"
    # vLLM's own cache figure sees the larger paged pool
    cache = m["vllm:cache_config_info"][0][0]
    assert int(cache["num_gpu_blocks"]) * int(cache["block_size"]) > (64 << 20) // bpt["stock"]
    assert m["rlkv:sparsity_requested"][0][1] == 0.5
    no_full = int((~select_full_heads(GATES, 0.5, "global").any(axis=1)).sum())
    assert m["rlkv:layers_without_full_head"][0][1] == no_full
    assert all(name.startswith("rlkv:") for name in m if name.startswith("rlkv")), sorted(m)


def test_startup_summary_in_server_log(server):
    """The plugin's lines reach vLLM's handler: the server log carries the start-up summary."""
    lines = [line for line in server.log().splitlines() if "RLKV" in line]
    text = "\n".join(lines)
    assert "sparsity 0.5 (effective 0.5), global selection" in text, text
    assert ("KV heads 8 full (paged), 8 streaming (ring, 4 sink + 8 recent tokens); "
            "layers with no full head: none") in text
    ring = (MAX_SEQS + 1) * (4 + 8) * 8 * 2 * 32 * 4  # (slots + scratch) x window x streaming heads x K,V
    assert f"RLKV KV budget 64.0 MiB = paged {((64 << 20) - ring) / 2**20:.1f} MiB (2048 B/token vs stock 4096)" in text
    assert f"+ streaming ring 0.2 MiB ({ring} B, {MAX_SEQS} slots + 1 scratch x 12 tokens)" in text
    assert "RLKV kernels:" in text
    assert "no KV budget set" not in text  # the budget was given
    assert "RLKV ring pool" in text  # the worker's line too (runtime's logger)



def test_log_names_the_platform_backend(server):
    """The log names the backend that runs here, not the CUDA one or vLLM's 'Cannot use CUSTOM'."""
    from rlkv_vllm.compat import is_cpu_platform

    log = server.log()
    if is_cpu_platform():
        assert "rlkv_vllm.backends.cpu.RLKVCpuBackend" in log
        assert "RLKVCudaBackend" not in log
        assert "Cannot use AttentionBackendEnum.CUSTOM backend on CPU" not in log
        assert "RLKV on CPU: rlkv_vllm.backends.cpu.RLKVCpuBackend" in log
    else:
        assert "rlkv_vllm.backends.cuda.RLKVCudaBackend" in log and "RLKVCpuBackend" not in log

def test_clean_stop_removes_metrics_file(server):
    """After every test that uses the server: it stops it (a later one would start a new one)."""
    (path,) = glob.glob(os.path.join(server.tmpdir, "rlkv-metrics-*.bin"))
    assert rlkv_metrics.read_metrics_file(path)["num_slots"] == MAX_SEQS  # the worker writes into it
    server.stop()  # SIGTERM, as a user or a supervisor stops it
    assert server.proc.returncode is not None
    assert not os.path.exists(path), "a clean stop must remove the metrics file"


# ------------------------------------------------------------------ without a server
def _plan(tmp_path, sparsity: float) -> RLKVPlan:
    pattern = write_pattern(str(tmp_path / "p.json"), [[0.1, 0.2, 0.3, 0.4], [0.1, 0.2, 0.3, 0.4],
                                                       [0.5, 0.6, 0.7, 0.8], [0.1, 0.2, 0.3, 0.9]])
    shape = ModelShape(num_layers=4, num_kv_heads=4, num_q_heads=8, head_size=32, model_id="rlkv-tiny")
    return build_plan(RLKVSettings(heads=pattern, sparsity=sparsity, sink=4, recent=8), shape,
                      max_num_seqs=MAX_SEQS, dtype=torch.float32)


def _scrape(collector: rlkv_metrics.RLKVCollector) -> dict[str, list[tuple[dict[str, str], float]]]:
    from prometheus_client import CollectorRegistry, generate_latest

    registry = CollectorRegistry()
    registry.register(collector)
    return parse_prometheus(generate_latest(registry).decode())


def test_collector_names_and_sparsity(tmp_path):
    """One naming scheme, vLLM's: every name starts with "rlkv:"; requested vs effective sparsity."""
    collector = rlkv_metrics.RLKVCollector()
    collector.plan = _plan(tmp_path, 0.99)  # the case: 0.99 keeps 1 head of 16
    m = _scrape(collector)
    assert sorted(m) == sorted([
        "rlkv:config_info", "rlkv:sparsity", "rlkv:sparsity_requested", "rlkv:layers_without_full_head",
        "rlkv:kv_heads", "rlkv:kv_bytes_per_token", "rlkv:kv_bytes_per_token_ratio", "rlkv:ring_bytes",
        "rlkv:ring_slots", "rlkv:ring_slots_peak", "rlkv:ring_slot_assignments",
    ])
    assert m["rlkv:sparsity"] == [({}, 0.9375)] and m["rlkv:sparsity_requested"] == [({}, 0.99)]
    assert m["rlkv:layers_without_full_head"] == [({}, 3.0)]
    info = m["rlkv:config_info"][0][0]
    assert info["mode"] == "serve" and info["sparsity_requested"] == "0.99" and info["pattern"] == "p.json"


def test_publish_plan_removes_the_previous_file_and_its_own_at_exit(tmp_path, monkeypatch):
    monkeypatch.setattr(rlkv_metrics.tempfile, "tempdir", str(tmp_path))
    monkeypatch.setenv(rlkv_metrics.ENV_FILE, "")  # restored after the test
    monkeypatch.setattr(rlkv_metrics.COLLECTOR, "plan", None)
    monkeypatch.setattr(rlkv_metrics.COLLECTOR, "path", None)
    monkeypatch.setattr(rlkv_metrics, "_owner_pid", None, raising=False)
    plan = _plan(tmp_path, 0.5)
    first = rlkv_metrics.publish_plan(plan)
    assert os.path.exists(first) and os.environ[rlkv_metrics.ENV_FILE] == first
    second = rlkv_metrics.publish_plan(plan)  # a second engine in the same process
    assert not os.path.exists(first) and os.path.exists(second)
    # a forked child inherits the exit hook; it must leave its parent's file alone
    monkeypatch.setattr(rlkv_metrics, "_owner_pid", os.getpid() + 1)
    rlkv_metrics._remove_at_exit()
    assert os.path.exists(second)
    monkeypatch.setattr(rlkv_metrics, "_owner_pid", os.getpid())
    rlkv_metrics._remove_at_exit()
    assert not os.path.exists(second)
