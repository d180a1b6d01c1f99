"""docs/RUNBOOK.md's startup-error table keeps up with the code: every setting that an RLKVConfigError in
rlkv_vllm/ names has a row."""

from __future__ import annotations

import glob
import os
import re

from tests.deploy.tools import ROOT


def _fields_named_by_errors() -> set[str]:
    fields = set()
    for path in glob.glob(os.path.join(ROOT, "rlkv_vllm", "**", "*.py"), recursive=True):
        text = open(path).read()
        fields |= {f"rlkv.{m}" for m in re.findall(r'config_error\(\s*"([\w.]+)"', text)}
        for literal in re.findall(r'RLKVConfigError\(\s*f?"([^"]*)"', text):
            head = literal.split("{", 1)[0].split()
            if head:  # an f-string that starts with a variable names its field at run time
                fields.add(head[0])
    return fields


def test_every_startup_error_has_a_row():
    runbook = open(os.path.join(ROOT, "docs", "RUNBOOK.md")).read()
    table = runbook[runbook.index("## Startup errors"):]
    fields = _fields_named_by_errors()
    assert {"rlkv.heads", "rlkv.sparsity", "kv_cache_dtype", "enable_prefix_caching"} <= fields
    missing = sorted(f for f in fields if f"`{f}" not in table)
    assert not missing, f"docs/RUNBOOK.md's startup errors have no row for: {missing}"
