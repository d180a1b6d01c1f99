"""deploy/k8s validates offline, strictly: Kubernetes' own kinds with kubernetes-validate --strict, the KubeRay
and prometheus-operator objects with check-jsonschema against deploy/schemas (generated from the CRDs' own
openAPIV3Schema, vendored beside them, by deploy/schemas/crd_to_schema.py), and the pod templates those embed
also against Kubernetes' PodTemplate schema at the cluster's release. A broken copy must fail, and fail for
the reason it was broken, so a check that passes everything cannot hide."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys

import pytest
import yaml

from tests.deploy.tools import (
    CRD_SCHEMAS, KUBERNETES_VERSION, ROOT, SCHEMAS, manifests, pod_templates, run, tool,
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


def _wrapped_pod_templates(tmp_path, docs) -> list[str]:
    paths = []
    for doc in docs:
        for where, template in pod_templates(doc):
            name = f"{doc['metadata']['name']}-{where}".lower().replace(".", "-")
            wrapped = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": name}, "template": template}
            out = tmp_path / f"{name}.yaml"
            out.write_text(yaml.safe_dump(wrapped))
            paths.append(str(out))
    return paths


def test_embedded_pod_templates_validate_strict(tmp_path):
    paths = _wrapped_pod_templates(tmp_path, [doc for _, doc in manifests()])
    assert len(paths) >= 2, "the RayCluster's head and GPU worker templates"
    code, out = _kubernetes_validate(paths)
    assert code == 0, out


def test_pod_templates_are_checked_against_the_clusters_kubernetes_release(tmp_path):
    """Why the templates are validated twice: the CRD embeds the PodTemplateSpec of the k8s.io/api KubeRay was
    built with, newer than KUBERNETES_VERSION. A pod-level `resources` (Kubernetes 1.32+) passes the CRD schema,
    but the pods KubeRay creates from it would not be what a 1.31 API server accepts."""
    path, doc = next((p, doc) for p, doc in manifests() if doc["kind"] == "RayCluster")
    doc["spec"]["headGroupSpec"]["template"]["spec"]["resources"] = {"limits": {"cpu": "8"}}
    broken = tmp_path / "raycluster.yaml"
    broken.write_text(yaml.safe_dump(doc))
    code, out = _check_jsonschema(CRD_SCHEMAS[(doc["apiVersion"], doc["kind"])], [str(broken)])
    assert code == 0, out
    code, out = _kubernetes_validate(_wrapped_pod_templates(tmp_path, [doc])[:1])
    assert code != 0 and "resources" in out, out


def _schema_files() -> list[str]:
    return sorted(os.path.relpath(os.path.join(d, f), SCHEMAS)
                  for d, _, fs in os.walk(SCHEMAS) for f in fs if f.endswith(".json"))


def test_schemas_are_json_schema_and_listed_in_sources():
    files = _schema_files()
    assert sorted(CRD_SCHEMAS.values()) == files, "every schema here is one a manifest kind uses"
    r = run([tool("check-jsonschema"), "--check-metaschema", *(os.path.join(SCHEMAS, f) for f in files)])
    assert r.returncode == 0, r.stdout + r.stderr
    sources = open(os.path.join(SCHEMAS, "SOURCES.md")).read()
    crds = sorted(os.path.relpath(os.path.join(d, f), SCHEMAS)
                  for d, _, fs in os.walk(SCHEMAS) for f in fs if f.endswith(".yaml"))
    missing = [f for f in files + crds if f"`{f}`" not in sources]
    assert not missing, f"deploy/schemas/SOURCES.md does not say where these come from: {missing}"


_COMMENT = re.compile(r"^Generated from (\S+) (\S+) at tag (\S+) \(git blob ([0-9a-f]{40})\) by: (.+)\. Do not edit")


@pytest.mark.parametrize("schema", sorted(CRD_SCHEMAS.values()))
def test_schemas_regenerate_byte_identical_from_the_vendored_crds(schema):
    """Each schema is what its recorded command makes out of the CRD committed beside it, and that CRD is the
    upstream file (its git blob sha is the one SOURCES.md gives)."""
    path = os.path.join(SCHEMAS, schema)
    m = _COMMENT.match(json.load(open(path))["$comment"])
    assert m, f"{schema}: no source $comment"
    repo, upstream_path, tag, blob, command = m.groups()
    assert schema.split("/")[0].endswith("-" + tag), f"{schema}: the folder names the tag {tag}"
    assert f"`{blob}`" in open(os.path.join(SCHEMAS, "SOURCES.md")).read(), f"{schema}: blob {blob} not in SOURCES.md"
    argv = shlex.split(command)
    assert argv[:2] == ["python", "deploy/schemas/crd_to_schema.py"] and argv[-2] == "-o", command
    assert argv[-1] == os.path.relpath(path, ROOT), command
    crd = os.path.join(ROOT, argv[-3])
    with open(crd, "rb") as fh:
        data = fh.read()
    assert hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest() == blob, f"{crd} is not the upstream file"
    r = subprocess.run([sys.executable, *argv[1:], "--check"], cwd=ROOT, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, f"{schema} differs from a fresh crd_to_schema.py run: {r.stdout + r.stderr}"


def test_regeneration_check_notices_an_edited_schema(tmp_path):
    """--check is not vacuous: in a copy of deploy/schemas, the recorded command passes --check on its own
    output and fails it once one keyword of that output is changed."""
    shutil.copytree(SCHEMAS, tmp_path / "deploy" / "schemas")
    schema = CRD_SCHEMAS[("monitoring.coreos.com/v1", "ServiceMonitor")]
    argv = shlex.split(_COMMENT.match(json.load(open(os.path.join(SCHEMAS, schema)))["$comment"]).group(5))
    check = [sys.executable, *argv[1:], "--check"]
    copy = tmp_path / "deploy" / "schemas" / schema
    r = subprocess.run(check, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    copy.write_text(copy.read_text().replace('"type": "object"', '"type": "array"', 1))
    r = subprocess.run(check, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert r.returncode == 1 and "is not what" in r.stderr, r.stdout + r.stderr


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


@pytest.mark.parametrize("kind,edit,why", [
    # a wrong type: rayStartParams values are strings in the CRD
    ("RayCluster", lambda d: d["spec"]["headGroupSpec"]["rayStartParams"].update({"num-gpus": 0}),
     "0 is not of type 'string'"),
    # a missing required field
    ("RayCluster", lambda d: d["spec"]["workerGroupSpecs"][0].pop("maxReplicas"),
     "'maxReplicas' is a required property"),
    # an unknown field (strict: crd_to_schema.py's additionalProperties: false)
    ("RayJob", lambda d: d["spec"].update(entrypint="rlkv train"), "'entrypint' was unexpected"),
    ("RayJob", lambda d: d["spec"]["submitterPodTemplate"]["spec"]["containers"][0].update(imagePullPolice="Always"),
     "'imagePullPolice' was unexpected"),
    ("RayJob", lambda d: d["spec"].update(backoffLimit="none"), "'none' is not of type 'integer'"),
    # a pattern the CRD sets (prometheus-operator's Duration)
    ("ServiceMonitor", lambda d: d["spec"]["endpoints"][0].update(interval="15 seconds"),
     "'15 seconds' does not match"),
    ("ServiceMonitor", lambda d: d["spec"].pop("selector"), "'selector' is a required property"),
    ("ServiceMonitor", lambda d: d.update(kind="PodMonitor"), "'ServiceMonitor' was expected"),
])
def test_vendored_schemas_refuse_a_broken_custom_resource(tmp_path, kind, edit, why):
    path, doc = next((p, doc) for p, doc in manifests() if doc["kind"] == kind)
    code, out = _check_jsonschema(CRD_SCHEMAS[(doc["apiVersion"], kind)], [_broken(tmp_path, path, edit)])
    assert code != 0, out
    assert why in out, out


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
