"""A real Prometheus (Debian's package) with the repo's own deploy/compose/prometheus.yml scrapes the tiny
RLKV server, started with the command the serving images' entrypoint builds. Through Prometheus's HTTP API:
an RLKV metric and a vLLM metric; and every query of the Grafana dashboard answers with data, each metric
it names present on the server's own /metrics."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from typing import Any, Iterator

import pytest
import yaml

from rlkv_vllm.server import ServerProcess, free_port, parse_prometheus, start_server
from tests.deploy.tools import COMPOSE, DASHBOARD, dashboard_queries, load_entrypoint, metric_names
from tests.engine_utils import random_gates, tiny_model_dir, write_pattern

pytestmark = pytest.mark.slow

JOB = "rlkv-vllm"
# Grafana's variables, as the dashboard's defaults resolve them ("All" servers)
RATE_WINDOW = "1m"


def _prometheus_binary() -> str:
    found = shutil.which("prometheus")
    if found is None:
        if os.environ.get("CI"):
            pytest.fail("prometheus is missing: .ci/run installs Debian's prometheus package")
        pytest.skip("Prometheus not installed: apt-get install prometheus (.ci/run does)")
    return found


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator[ServerProcess]:
    """The tiny model served as the CPU image serves it: the entrypoint's command (backend, rlkv section)."""
    d = tmp_path_factory.mktemp("deploy-server")
    pattern = write_pattern(str(d / "pattern.json"), random_gates(4, 4, seed=2))
    sizing = ["--dtype", "float32", "--max-model-len", "1024", "--max-num-seqs", "8",
              "--kv-cache-memory-bytes", str(64 << 20)]
    cmd = load_entrypoint().command(sizing, {"RLKV_HEADS": pattern, "RLKV_SPARSITY": "0.5", "RLKV_SERVE": "rlkv serve"})
    assert cmd[:2] == ["rlkv", "serve"]
    # start_server runs `rlkv serve MODEL --host --port --served-model-name` and waits for /health
    srv = start_server(tiny_model_dir(), rlkv=None, extra_args=cmd[2:],
                       env={"VLLM_ENABLE_V1_MULTIPROCESSING": "1", "TMPDIR": str(d)})
    yield srv
    srv.stop()


def _get(url: str, timeout: float = 10) -> Any:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return json.loads(r.read())


def _query(prom: str, expr: str) -> list[dict[str, Any]]:
    body = _get(f"{prom}/api/v1/query?" + urllib.parse.urlencode({"query": expr}))
    assert body["status"] == "success", (expr, body)
    return body["data"]["result"]


@pytest.fixture(scope="module")
def prometheus(server, tmp_path_factory) -> Iterator[str]:
    """Prometheus with deploy/compose/prometheus.yml, the rlkv-vllm job's target pointed at the test server."""
    binary = _prometheus_binary()
    d = tmp_path_factory.mktemp("prometheus")
    config = yaml.safe_load(open(os.path.join(COMPOSE, "prometheus.yml")))
    jobs = [j for j in config["scrape_configs"] if j["job_name"] == JOB]
    assert len(jobs) == 1 and jobs[0]["static_configs"] == [{"targets": ["rlkv:8000"]}]
    jobs[0]["static_configs"] = [{"targets": [f"127.0.0.1:{server.port}"]}]
    (d / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    log = open(d / "prometheus.log", "w")
    proc = subprocess.Popen([binary, f"--config.file={d / 'prometheus.yml'}", f"--storage.tsdb.path={d / 'data'}",
                             f"--web.listen-address=127.0.0.1:{port}"], stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait(lambda: urllib.request.urlopen(f"{url}/-/ready", timeout=2).status == 200, 60, proc, d)
        # up == 1: at least one scrape of the server has landed
        _wait(lambda: [r for r in _query(url, f'up{{job="{JOB}"}}') if r["value"][1] == "1"], 60, proc, d)
        yield url
    finally:
        proc.terminate()
        proc.wait(30)


def _wait(ready, timeout: float, proc: subprocess.Popen, d) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"prometheus exited: {(d / 'prometheus.log').read_text()[-3000:]}")
        try:
            if ready():
                return
        except OSError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"prometheus not ready in {timeout}s: {(d / 'prometheus.log').read_text()[-3000:]}")


@pytest.fixture(scope="module")
def scraped(server, prometheus) -> dict[str, list[tuple[dict[str, str], float]]]:
    """Two requests after Prometheus's first scrape, then scrapes until Prometheus holds their tokens over
    a rate window; returns the server's own /metrics from then."""
    for prompt in ("Ada has 3 apples", "Bob counts coins"):
        req = urllib.request.Request(server.base_url + "/v1/completions", headers={"Content-Type": "application/json"},
                                     data=json.dumps({"model": "tiny", "prompt": prompt, "max_tokens": 16}).encode())
        with urllib.request.urlopen(req, timeout=300) as r:
            assert json.loads(r.read())["usage"]["completion_tokens"] == 16
    deadline = time.time() + 90
    while time.time() < deadline:
        rate = _query(prometheus, f"rate(vllm:generation_tokens_total[{RATE_WINDOW}])")
        if rate and float(rate[0]["value"][1]) > 0:
            break
        time.sleep(1)
    else:
        pytest.fail("Prometheus did not see the generated tokens within 90 s")
    return parse_prometheus(server.get("/metrics"))


def test_prometheus_reads_an_rlkv_and_a_vllm_metric(server, prometheus, scraped):
    sparsity = _query(prometheus, f'rlkv:sparsity{{job="{JOB}"}}')
    assert len(sparsity) == 1 and float(sparsity[0]["value"][1]) == 0.5
    assert sparsity[0]["metric"]["instance"] == f"127.0.0.1:{server.port}"
    tokens = _query(prometheus, f'vllm:generation_tokens_total{{job="{JOB}", model_name="tiny"}}')
    assert len(tokens) == 1 and float(tokens[0]["value"][1]) >= 32
    slots = {r["metric"]["state"]: float(r["value"][1]) for r in _query(prometheus, "rlkv:ring_slots")}
    assert slots["in_use"] + slots["free"] == 8


def _resolve(expr: str) -> str:
    return expr.replace("$__rate_interval", RATE_WINDOW).replace("$instance", ".*")


def test_every_dashboard_metric_is_on_the_live_metrics(scraped):
    dashboard = json.load(open(DASHBOARD))
    missing = {}
    for where, expr in dashboard_queries(dashboard):
        absent = sorted(name for name in metric_names(_resolve(expr)) if name not in scraped)
        if absent:
            missing[where] = absent
    assert not missing, f"the dashboard queries metrics the server does not export: {missing}"


def test_every_dashboard_query_answers_through_prometheus(prometheus, scraped):
    dashboard = json.load(open(DASHBOARD))
    empty = []
    for where, expr in dashboard_queries(dashboard):
        if expr.startswith("label_values("):
            name = metric_names(expr).pop()
            label = expr.split(",")[1].strip(" )")
            assert all(label in r["metric"] for r in _query(prometheus, name)), where
            continue
        if not _query(prometheus, _resolve(expr)):
            empty.append((where, expr))
    assert not empty, f"queries with no data: {empty}"
