"""What the deploy tests share: the deploy/ paths, the linters and validators they run, the entrypoint
module, and reading metric names out of PromQL."""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
from types import ModuleType
from typing import Any, Iterator

import pytest
import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEPLOY = os.path.join(ROOT, "deploy")
K8S = os.path.join(DEPLOY, "k8s")
SCHEMAS = os.path.join(DEPLOY, "schemas")
COMPOSE = os.path.join(DEPLOY, "compose")
DASHBOARD = os.path.join(COMPOSE, "grafana", "dashboards", "rlkv.json")
ENTRYPOINT = os.path.join(DEPLOY, "docker", "entrypoint.py")
# the Kubernetes release the manifests are checked against (kubernetes-validate ships 1.25-1.37)
KUBERNETES_VERSION = "1.31.0"
# custom resources: (apiVersion, kind) -> the schema generated from its vendored CRD (deploy/schemas/SOURCES.md)
CRD_SCHEMAS = {
    ("ray.io/v1", "RayCluster"): "kuberay-v1.4.2/raycluster.json",
    ("ray.io/v1", "RayJob"): "kuberay-v1.4.2/rayjob.json",
    ("monitoring.coreos.com/v1", "ServiceMonitor"): "prometheus-operator-v0.93.0/servicemonitor.json",
}


def tool(name: str) -> str:
    """A validator installed beside this Python (scripts/setup.sh installs them), else on PATH."""
    here = os.path.join(os.path.dirname(sys.executable), name)
    found = here if os.path.exists(here) else shutil.which(name)
    if found is None:
        pytest.fail(f"{name} is not installed: pip install -e '.[test]' (scripts/setup.sh installs it)")
    return found


def run(cmd: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300)


def manifests() -> Iterator[tuple[str, dict[str, Any]]]:
    """(file, document) for every YAML document under deploy/k8s."""
    for dirpath, _, files in sorted(os.walk(K8S)):
        for f in sorted(files):
            if f.endswith((".yaml", ".yml")):
                path = os.path.join(dirpath, f)
                with open(path) as fh:
                    for doc in yaml.safe_load_all(fh):
                        if doc is not None:
                            yield path, doc


def pod_templates(doc: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """The core/v1 PodTemplateSpecs a KubeRay object embeds, named by where they sit."""
    spec = doc.get("spec", {})
    cluster = spec.get("rayClusterSpec", spec) if doc.get("kind") == "RayJob" else spec
    out = []
    if "headGroupSpec" in cluster:
        out.append(("headGroupSpec", cluster["headGroupSpec"]["template"]))
    for group in cluster.get("workerGroupSpecs", []):
        out.append((f"workerGroupSpecs.{group['groupName']}", group["template"]))
    if "submitterPodTemplate" in spec:
        out.append(("submitterPodTemplate", spec["submitterPodTemplate"]))
    return out


def load_entrypoint() -> ModuleType:
    """deploy/docker/entrypoint.py as a module (it is a script in the images, not a package module)."""
    spec = importlib.util.spec_from_file_location("rlkv_entrypoint", ENTRYPOINT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# PromQL words that are not metric names (aggregation modifiers, set operators, vector matching)
_PROMQL_WORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or", "unless",
                 "offset", "inf", "nan"}


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression reads (a Grafana label_values() query counts too)."""
    s = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)          # string literals
    s = re.sub(r"\{[^}]*\}", "", s)                        # label matchers
    s = re.sub(r"\[[^\]]*\]", "", s)                       # range and subquery windows
    s = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", s)  # label lists
    s = re.sub(r"\blabel_values\s*\(\s*([A-Za-z_:][\w:]*)\s*,[^)]*\)", r"\1", s)           # Grafana's
    names = set()
    for m in re.finditer(r"(?<![\w.$])[A-Za-z_:][\w:]*", s):
        if s[m.end():].lstrip().startswith("("):  # a function
            continue
        if m.group(0).lower() not in _PROMQL_WORDS:
            names.add(m.group(0))
    return names


def dashboard_queries(dashboard: dict[str, Any]) -> list[tuple[str, str]]:
    """(where, expression) of every query the dashboard runs: panel targets and template variables."""
    out = []
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            out.append((f"panel {panel['title']!r} {target['refId']}", target["expr"]))
    for var in dashboard.get("templating", {}).get("list", []):
        if var.get("type") == "query":
            query = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
            out.append((f"variable {var['name']!r}", query))
    return out
