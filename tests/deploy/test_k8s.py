"""deploy/k8s validates offline, strictly: Kubernetes' own kinds with kubernetes-validate --strict, the KubeRay
and prometheus-operator objects with check-jsonschema against deploy/schemas, and the pod templates those
embed against Kubernetes' PodTemplate schema. A broken copy must fail, so a check that passes everything
cannot hide."""

from __future__ import annotations

import os

import pytest
import yaml

from tests.deploy.tools import (
    CRD_SCHEMAS, KUBERNETES_VERSION, SCHEMAS, manifests, pod_templates, run, tool,
)


def _kubernetes_validate(paths: list[str]) -> tuple[int, str]:
    r = run([tool("kubernetes-validate"), "--strict", "--kubernetes-version", KUBERNETES_VERSION, *paths])
    return r.returncode, r.stdout + r.stderr


def _check_jsonschema(schema: str, paths: list[str]) -> tuple[int, str]:
    r = run([tool("check-jsonschema"), "--schemafile", os.path.join(SCHEMAS, schema), *paths])
    return r.returncode, r.stdout + r.stderr


def _is_custom(api_version: str) -> bool:
    """Kubernetes' own groups are core (no group), one word (apps) or end in .k8s.io."""
    group = api_version.rpartition("/")[0]
    return "." in group and not group.endswith(".k8s.io")


def _core_and_custom() -> tuple[list[str], dict[str, list[str]]]:
    core: list[str] = []
    custom: dict[str, list[str]] = {}
    for path, doc in manifests():
        schema = CRD_SCHEMAS.get((doc["apiVersion"], doc["kind"]))
        if schema is not None:
            custom.setdefault(schema, []).append(path)
        elif _is_custom(doc["apiVersion"]):
            pytest.fail(f"{path}: {doc['apiVersion']} {doc['kind']} is a custom resource with no vendored schema")
        else:
            core.append(path)
    return sorted(set(core)), custom


def test_every_manifest_is_checked_by_one_validator():
    core, custom = _core_and_custom()
    kinds = {(doc["apiVersion"], doc["kind"]) for _, doc in manifests()}
    assert {("apps/v1", "Deployment"), ("v1", "Service"), ("v1", "PersistentVolumeClaim")} <= kinds
    assert set(CRD_SCHEMAS) <= kinds, "every vendored schema is used by a manifest"
    assert core and all(custom.values())


def test_kubernetes_objects_validate_strict():
    core, _ = _core_and_custom()
    code, out = _kubernetes_validate(core)
    assert code == 0, out
    assert "Couldn't find schema" not in out, out


def test_custom_resources_validate_against_vendored_schemas():
    _, custom = _core_and_custom()
    for schema, paths in custom.items():
        code, out = _check_jsonschema(schema, paths)
        assert code == 0, f"{schema}: {out}"


def test_embedded_pod_templates_validate_strict(tmp_path):
    paths = []
    for path, doc in manifests():
        for where, template in pod_templates(doc):
            name = f"{doc['metadata']['name']}-{where}".lower().replace(".", "-")
            wrapped = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": name}, "template": template}
            out = tmp_path / f"{name}.yaml"
            out.write_text(yaml.safe_dump(wrapped))
            paths.append(str(out))
    assert len(paths) >= 2, "the RayCluster's head and GPU worker templates"
    code, out = _kubernetes_validate(paths)
    assert code == 0, out


def test_schemas_are_json_schema_and_listed_in_sources():
    files = sorted(os.path.relpath(os.path.join(d, f), SCHEMAS)
                   for d, _, fs in os.walk(SCHEMAS) for f in fs if f.endswith(".json"))
    r = run([tool("check-jsonschema"), "--check-metaschema", *(os.path.join(SCHEMAS, f) for f in files)])
    assert r.returncode == 0, r.stdout + r.stderr
    sources = open(os.path.join(SCHEMAS, "SOURCES.md")).read()
    missing = [f for f in files if f"`{f}`" not in sources]
    assert not missing, f"deploy/schemas/SOURCES.md does not say where these come from: {missing}"


def _broken(tmp_path, path: str, edit) -> str:
    doc = yaml.safe_load(open(path))
    edit(doc)
    out = tmp_path / os.path.basename(path)
    out.write_text(yaml.safe_dump(doc))
    return str(out)


@pytest.mark.parametrize("kind,edit", [
    ("Deployment", lambda d: d["spec"]["template"]["spec"]["containers"][0].update(readinesProbe={})),
    ("Deployment", lambda d: d["spec"].update(replicas="one")),
])
def test_strict_validation_refuses_a_broken_core_object(tmp_path, kind, edit):
    path = next(p for p, doc in manifests() if doc["kind"] == kind)
    code, out = _kubernetes_validate([_broken(tmp_path, path, edit)])
    assert code != 0, out


@pytest.mark.parametrize("kind,edit", [
    ("RayCluster", lambda d: d["spec"]["headGroupSpec"]["rayStartParams"].update({"num-gpus": 0})),
    ("RayCluster", lambda d: d["spec"]["workerGroupSpecs"][0].pop("maxReplicas")),
    ("RayJob", lambda d: d["spec"].update(entrypint="rlkv train")),
    ("RayJob", lambda d: d["spec"].update(submissionMode="K8sMode")),
    ("ServiceMonitor", lambda d: d["spec"]["endpoints"][0].update(interval="15 seconds")),
    ("ServiceMonitor", lambda d: d["spec"].pop("selector")),
])
def test_vendored_schemas_refuse_a_broken_custom_resource(tmp_path, kind, edit):
    path, doc = next((p, doc) for p, doc in manifests() if doc["kind"] == kind)
    code, out = _check_jsonschema(CRD_SCHEMAS[(doc["apiVersion"], kind)], [_broken(tmp_path, path, edit)])
    assert code != 0, out


def test_serving_pods_probe_health_and_mount_the_pattern():
    deployments = [doc for _, doc in manifests() if doc["kind"] == "Deployment"]
    assert {d["metadata"]["name"] for d in deployments} == {"rlkv-vllm", "rlkv-vllm-tp2"}
    for d in deployments:
        pod = d["spec"]["template"]["spec"]
        c = pod["containers"][0]
        for probe in ("readinessProbe", "livenessProbe"):
            assert c[probe]["httpGet"]["path"] == "/health", (d["metadata"]["name"], probe)
        assert c["resources"]["limits"]["nvidia.com/gpu"] >= 1
        assert any(m["mountPath"] == "/etc/rlkv" for m in c["volumeMounts"])
        assert any("configMap" in v for v in pod["volumes"])
        assert pod["securityContext"]["runAsNonRoot"] is True
    tp2 = next(d for d in deployments if d["metadata"]["name"] == "rlkv-vllm-tp2")
    c = tp2["spec"]["template"]["spec"]["containers"][0]
    assert "--tensor-parallel-size=2" in c["args"] and c["resources"]["limits"]["nvidia.com/gpu"] == 2


def test_rayjob_runs_rlkv_train_on_the_raycluster():
    docs = {doc["kind"]: doc for _, doc in manifests() if doc["kind"] in ("RayJob", "RayCluster")}
    job, cluster = docs["RayJob"], docs["RayCluster"]
    assert job["spec"]["entrypoint"].startswith("rlkv train --config /opt/rlkv/configs/")
    assert "--address auto" in job["spec"]["entrypoint"]
    assert job["spec"]["clusterSelector"] == {"ray.io/cluster": cluster["metadata"]["name"]}
    gpus = [g for g in cluster["spec"]["workerGroupSpecs"]
            if g["template"]["spec"]["containers"][0]["resources"]["limits"].get("nvidia.com/gpu")]
    assert gpus, "a GPU worker group"
