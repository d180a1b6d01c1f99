#!/usr/bin/env python3
"""Turn a CustomResourceDefinition (YAML) into a strict JSON Schema for check-jsonschema.

The output is the CRD's own `openAPIV3Schema` for one served version, unchanged except for:

- the object is wrapped: `apiVersion` and `kind` become required `const`s (<group>/<version>, the CRD's kind);
- strictness, as the API server's strict field validation (`kubectl apply --validate=strict`) behaves: every
  object schema that has `properties` and neither `additionalProperties` nor
  `x-kubernetes-preserve-unknown-fields: true` gets `additionalProperties: false`, so an unknown field is
  refused instead of silently pruned;
- OpenAPI's `nullable: true` becomes JSON Schema's `null` in `type` (the API server accepts null there);
- `$schema` (JSON Schema 2020-12) and a `$comment` naming the source: repository, path, tag, the git blob sha
  of the CRD file (computed here from its bytes, so it equals upstream's only for an unmodified copy) and the
  command line that made the file.

Everything else is kept as the CRD has it, `x-kubernetes-*` keywords included (JSON Schema ignores unknown
keywords; CEL rules under `x-kubernetes-validations` are therefore not enforced). Output is deterministic:
the same CRD and arguments give byte-identical JSON. Needs only pyyaml and the standard library.

    python deploy/schemas/crd_to_schema.py --repo https://github.com/ray-project/kuberay \\
        --path ray-operator/config/crd/bases/ray.io_rayclusters.yaml --tag v1.4.2 \\
        deploy/schemas/kuberay-v1.4.2/crd/ray.io_rayclusters.yaml -o deploy/schemas/kuberay-v1.4.2/raycluster.json
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import os
import shlex
import sys
from typing import Any

import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.relpath(os.path.abspath(__file__), ROOT)
DRAFT = "https://json-schema.org/draft/2020-12/schema"


def git_blob_sha(data: bytes) -> str:
    """What `git hash-object` prints for a file with these bytes."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def pick_version(crd: dict[str, Any], name: str | None) -> dict[str, Any]:
    """The named version, else the storage version; it must be served."""
    versions = crd["spec"]["versions"]
    if name is None:
        found = [v for v in versions if v.get("storage")]
    else:
        found = [v for v in versions if v["name"] == name]
    if len(found) != 1:
        raise SystemExit(f"no single version {name or '(storage)'} in {[v['name'] for v in versions]}")
    if not found[0].get("served"):
        raise SystemExit(f"version {found[0]['name']} is not served")
    return found[0]


def _is_schema_map(key: str) -> bool:
    """Keywords whose value maps names to schemas (not schemas themselves)."""
    return key in ("properties", "patternProperties", "definitions", "$defs", "dependentSchemas")


def strict(schema: Any) -> Any:
    """A copy with `additionalProperties: false` where the API server refuses unknown fields."""
    if isinstance(schema, list):
        return [strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out: dict[str, Any] = {}
    for key, value in schema.items():
        if _is_schema_map(key) and isinstance(value, dict):
            out[key] = {name: strict(s) for name, s in value.items()}
        elif key in ("enum", "const", "default", "example", "required", "x-kubernetes-list-map-keys",
                     "x-kubernetes-validations"):
            out[key] = copy.deepcopy(value)  # data, not schemas
        else:
            out[key] = strict(value)
    if out.get("nullable") is True and isinstance(out.get("type"), str):
        out["type"] = [out["type"], "null"]
    if ("properties" in out and "additionalProperties" not in out
            and out.get("x-kubernetes-preserve-unknown-fields") is not True):
        out["additionalProperties"] = False
    return out


def convert(crd: dict[str, Any], version: str | None, comment: str) -> dict[str, Any]:
    served = pick_version(crd, version)
    group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
    api_version = f"{group}/{served['name']}"
    body = strict(served["schema"]["openAPIV3Schema"])
    props = body.setdefault("properties", {})
    props["apiVersion"] = {**props.get("apiVersion", {}), "const": api_version}
    props["kind"] = {**props.get("kind", {}), "const": kind}
    body["required"] = ["apiVersion", "kind"] + [r for r in body.get("required", []) if r not in ("apiVersion", "kind")]
    body.setdefault("additionalProperties", False)
    head = {"$schema": DRAFT, "$comment": comment, "title": f"{kind}, {api_version}"}
    return {**head, **{k: v for k, v in body.items() if k not in head}}


def _rel(path: str) -> str:
    return os.path.relpath(os.path.abspath(path), ROOT)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("crd", help="the CRD YAML file (one document)")
    p.add_argument("-o", "--output", required=True, help="the JSON Schema file to write")
    p.add_argument("--repo", required=True,
                   help="where the CRD comes from, e.g. https://github.com/ray-project/kuberay")
    p.add_argument("--path", required=True, help="the CRD's path in that repository")
    p.add_argument("--tag", required=True, help="the release tag it was taken at")
    p.add_argument("--version", help="the CRD version to convert (default: the storage version)")
    p.add_argument("--check", action="store_true",
                   help="write nothing; exit 1 unless --output already holds exactly what would be written")
    args = p.parse_args(argv)

    with open(args.crd, "rb") as fh:
        data = fh.read()
    crd = yaml.safe_load(data)
    if crd.get("kind") != "CustomResourceDefinition":
        raise SystemExit(f"{args.crd} is not a CustomResourceDefinition")
    # the command recorded is canonical (paths from the repository root) so that it reproduces this file
    cmd = ["python", SCRIPT, "--repo", args.repo, "--path", args.path, "--tag", args.tag]
    if args.version:
        cmd += ["--version", args.version]
    cmd += [_rel(args.crd), "-o", _rel(args.output)]
    comment = (f"Generated from {args.repo} {args.path} at tag {args.tag} (git blob {git_blob_sha(data)}) "
               f"by: {shlex.join(cmd)}. Do not edit: see deploy/schemas/SOURCES.md.")
    schema = convert(crd, args.version, comment)
    text = json.dumps(schema, indent=1, ensure_ascii=False) + "\n"
    if args.check:
        try:
            with open(args.output, "rb") as fh:
                same = fh.read() == text.encode("utf-8")
        except FileNotFoundError:
            same = False
        if not same:
            print(f"{args.output} is not what {shlex.join(cmd)} writes", file=sys.stderr)
        return 0 if same else 1
    with open(args.output, "w", encoding="utf-8", newline="\n") as fh:
        fh.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
