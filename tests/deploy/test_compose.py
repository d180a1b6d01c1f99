"""deploy/compose: compose.yaml against the compose specification, Prometheus's config by promtool, and the
Grafana provisioning wired to the dashboard: its datasource, and the panels the issue asks for."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import yaml

from tests.deploy.tools import COMPOSE, DASHBOARD, ROOT, dashboard_queries, metric_names, run, tool


def test_compose_validates_against_the_compose_spec():
    r = run([tool("check-jsonschema"), "--builtin-schema", "vendor.compose-spec", os.path.join(COMPOSE, "compose.yaml")])
    assert r.returncode == 0, r.stdout + r.stderr


def test_compose_files_it_names_exist():
    compose = yaml.safe_load(open(os.path.join(COMPOSE, "compose.yaml")))
    services = compose["services"]
    assert {"rlkv-gpu", "rlkv-cpu", "prometheus", "grafana"} <= set(services)
    for name in ("rlkv-gpu", "rlkv-cpu"):
        build = services[name]["build"]
        assert os.path.isfile(os.path.join(COMPOSE, build["context"], build["dockerfile"])), name
        # Prometheus scrapes the alias, whichever profile runs
        assert services[name]["networks"]["default"]["aliases"] == ["rlkv"]
    assert "gpu" in str(services["rlkv-gpu"]["deploy"]) and "deploy" not in services["rlkv-cpu"]
    for service in ("prometheus", "grafana"):
        for volume in services[service]["volumes"]:
            source = volume.split(":")[0]
            if source.startswith("./"):
                assert os.path.exists(os.path.join(COMPOSE, source)), f"{service}: {source}"


def test_prometheus_config_passes_promtool():
    promtool = shutil.which("promtool")
    if promtool is None:
        if os.environ.get("CI"):
            pytest.fail("promtool is missing: .ci/run installs Debian's prometheus package")
        pytest.skip("promtool not installed (apt-get install prometheus; .ci/run does)")
    # promtool resolves nothing here: the target is the compose network's alias
    r = run([promtool, "check", "config", os.path.join(COMPOSE, "prometheus.yml")])
    assert r.returncode == 0, r.stdout + r.stderr


def test_grafana_provisioning_points_at_the_dashboard():
    ds = yaml.safe_load(open(os.path.join(COMPOSE, "grafana", "provisioning", "datasources", "prometheus.yaml")))
    uid = ds["datasources"][0]["uid"]
    dashboard = json.load(open(DASHBOARD))
    used = {p["datasource"]["uid"] for p in dashboard["panels"] if "datasource" in p}
    used |= {t["datasource"]["uid"] for p in dashboard["panels"] for t in p.get("targets", [])}
    assert used == {uid}
    provider = yaml.safe_load(open(os.path.join(COMPOSE, "grafana", "provisioning", "dashboards", "rlkv.yaml")))
    compose = yaml.safe_load(open(os.path.join(COMPOSE, "compose.yaml")))
    mounted = {v.split(":")[1] for v in compose["services"]["grafana"]["volumes"] if v.startswith("./grafana/dash")}
    assert {provider["providers"][0]["options"]["path"]} == mounted


def test_dashboard_shows_what_the_issue_asks():
    dashboard = json.load(open(DASHBOARD))
    read = set().union(*(metric_names(q) for _, q in dashboard_queries(dashboard)))
    wanted = {
        "KV capacity gain vs stock": "rlkv:kv_bytes_per_token_ratio",
        "ring slots in use and free": "rlkv:ring_slots",
        "KV usage": "vllm:kv_cache_usage_perc",
        "running requests": "vllm:num_requests_running",
        "waiting requests": "vllm:num_requests_waiting",
        "generation throughput": "vllm:generation_tokens_total",
        "TTFT quantiles": "vllm:time_to_first_token_seconds_bucket",
        "TPOT quantiles": "vllm:request_time_per_output_token_seconds_bucket",
        "preemptions": "vllm:num_preemptions_total",
    }
    missing = {what: name for what, name in wanted.items() if name not in read}
    assert not missing, f"the dashboard does not query {missing}"
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))


def test_metric_names_reads_promql():
    assert metric_names('histogram_quantile(0.99, sum by (le) (rate(vllm:x_bucket{instance=~"$i"}[$__rate_interval])))') \
        == {"vllm:x_bucket"}
    assert metric_names('rlkv:a{cache="stock"} / ignoring(cache) rlkv:a{cache="rlkv"} * 1e3') == {"rlkv:a"}
    assert metric_names("label_values(rlkv:sparsity, instance)") == {"rlkv:sparsity"}
    assert metric_names("sum without (le) (a) and on (b) c offset 5m") == {"a", "c"}


def test_readme_states_that_images_are_linted_not_built():
    text = open(os.path.join(ROOT, "deploy", "README.md")).read()
    assert "no container registry" in text.lower() and "hadolint" in text
