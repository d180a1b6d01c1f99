"""scripts/gpu/decode_bench.py --smoke: every implementation it times agrees with v1 on a tiny shape
(Triton's interpreter on CPU), and the fp8-query paths give the same results."""

from __future__ import annotations

import importlib.util
import json
import os
import sys

from tests.ops.test_triton_stream import kernels  # noqa: F401 - the interpreter fixture

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_smoke_run_checks_every_implementation(kernels, tmp_path, capsys) -> None:  # noqa: F811
    spec = importlib.util.spec_from_file_location("decode_bench", os.path.join(ROOT, "scripts", "gpu", "decode_bench.py"))
    bench = importlib.util.module_from_spec(spec)
    sys.modules["decode_bench"] = bench  # its dataclasses look their module up
    spec.loader.exec_module(bench)
    out = tmp_path / "db.json"
    assert bench.main(["--smoke", "--out", str(out)]) == 0, capsys.readouterr().out[-2000:]
    d = json.loads(out.read_text())
    assert d["smoke"] and len(d["cases"]) == 3
    for case in d["cases"]:
        assert case["stores_equal_v1"] and case["max_rel_diff_vs_v1"] < 1e-5, case
        assert {"v1", "v2"} <= set(case["impls"]) and len(case["impls"]) > 2, case  # the v2 sweep ran
    fp8 = [c for c in d["cases"] if c["kv_dtype"] == "e4m3"]
    assert len(fp8) == 1 and fp8[0]["fp8_queries"]["same_results"], fp8
