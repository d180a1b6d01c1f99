"""rlkv_vllm.bench.results: ratios against stock, merging runs into a study file."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from rlkv_vllm.bench.config import BenchError, BenchSettings, parse_config
from rlkv_vllm.bench.results import build_study, check_mergeable, compute_ratios, merge_results, write_study
from tests.bench.study_rows import result_row


def test_ratios_against_first_stock() -> None:
    rows = [result_row("rlkv:0.5", 300.0, 0.02, 2000), result_row("stock:FLASH_ATTN", 100.0, 0.01, 1000),
            result_row("stock:TRITON_ATTN", 50.0, 0.04, 1000), result_row("rlkv:0.6", 0, 0, 0, status="failed")]
    r = compute_ratios(rows)
    assert r["base"] == "stock:FLASH_ATTN"
    by = {q["config"]: q for q in r["rows"]}
    assert set(by) == {"rlkv:0.5", "stock:FLASH_ATTN", "stock:TRITON_ATTN"}
    assert by["rlkv:0.5"]["output_tok_s"] == pytest.approx(3.0)
    assert by["rlkv:0.5"]["tpot_mean"] == pytest.approx(2.0)
    assert by["rlkv:0.5"]["capacity"] == pytest.approx(2.0)
    assert compute_ratios([result_row("rlkv:0.5", 1, 1, 1)])["base"] is None


def test_a_ratio_across_model_runners_is_marked() -> None:
    rows = [result_row("stock:FLASH_ATTN", 100.0, 0.01, 1000), result_row("rlkv:0.5", 200.0, 0.01, 2000),
            result_row("rlkv:0.6", 200.0, 0.01, 2000), result_row("rlkv:0.7", 200.0, 0.01, 2000)]
    rows[0]["model_runner_kind"] = rows[1]["model_runner_kind"] = "v2"
    rows[2]["model_runner_kind"] = "v1"  # rlkv:0.7 has none (an older result): not marked
    by = {q["config"]: q for q in compute_ratios(rows)["rows"]}
    assert by["rlkv:0.6"]["model_runner_differs"] == "v1 vs the base's v2"
    assert "model_runner_differs" not in by["rlkv:0.5"] and "model_runner_differs" not in by["rlkv:0.7"]


def test_ratios_against_stock_of_the_same_kv_dtype() -> None:
    rows = [result_row("stock:FLASH_ATTN", 100.0, 0.01, 1000), result_row("stock:FLASH_ATTN+fp8", 150.0, 0.01, 2000),
            result_row("rlkv:0.5+fp8", 450.0, 0.01, 8000), result_row("rlkv:0.5", 200.0, 0.01, 2000)]
    by = {q["config"]: q for q in compute_ratios(rows)["rows"]}
    assert by["rlkv:0.5+fp8"]["output_tok_s"] == pytest.approx(4.5)  # against stock BF16
    assert by["rlkv:0.5+fp8"]["same_kv"]["base"] == "stock:FLASH_ATTN+fp8"
    assert by["rlkv:0.5+fp8"]["same_kv"]["output_tok_s"] == pytest.approx(3.0)  # against stock FP8
    assert by["rlkv:0.5+fp8"]["same_kv"]["capacity"] == pytest.approx(4.0)
    assert "same_kv" not in by["rlkv:0.5"]
    # no stock config of that dtype: no same_kv row
    assert "same_kv" not in {q["config"]: q for q in compute_ratios(rows[:1] + rows[2:])["rows"]}["rlkv:0.5+fp8"]


def test_latency_ratios_per_cell() -> None:
    def lat(name: str, tpots: dict[tuple[int, int], float]) -> dict[str, Any]:
        cells = [dict(batch=b, context=c, tpot_mean_s=t, decode_step_mean_s=t / 2, status="ok")
                 for (b, c), t in tpots.items()]
        return dict(config=name, kind=parse_config(name).kind, status="ok", capacity_tokens=10, latency=cells)

    r = compute_ratios([lat("stock", {(1, 1024): 0.01, (8, 1024): 0.02}),
                        lat("rlkv:0.5", {(1, 1024): 0.005, (8, 1024): 0.03})])
    for key in ("tpot_mean", "decode_step_mean"):
        tp = {(c["batch"], c["context"]): c[key] for c in r["rows"][1]["tpot"]}
        assert tp == {(1, 1024): pytest.approx(0.5), (8, 1024): pytest.approx(1.5)}


def test_merge_results_replaces_by_name() -> None:
    old = [result_row("stock", 100, 0.01, 1000), result_row("rlkv:0.5", 150, 0.01, 2000),
           result_row("rlkv:0.6", 1, 1, 1, status="skipped")]
    new = [result_row("rlkv:0.5", 200, 0.01, 2000), result_row("rlkv:0.6", 210, 0.01, 2400),
           result_row("stock", 0, 0, 0, status="skipped"), result_row("rlkv:0.8", 300, 0.01, 4000)]
    merged = merge_results(old, new)
    assert [r["config"] for r in merged] == ["stock", "rlkv:0.5", "rlkv:0.6", "rlkv:0.8"]
    # a skip never overwrites figures measured before; a measurement replaces a skip
    assert merged[0]["status"] == "ok" and merged[1]["throughput"]["output_tok_s"] == 200
    assert merged[2]["status"] == "ok"


def test_write_study_merges_and_refuses_other_workloads(tmp_path: Path) -> None:
    s = BenchSettings(model="m", kv_bytes=1 << 20)
    path = str(tmp_path / "engine.json")
    write_study(path, build_study(s, [result_row("stock", 100, 0.01, 1000)], "cmd1", {}))
    study = write_study(path, build_study(s, [result_row("rlkv:0.5", 180, 0.01, 1900)], "cmd2", {}))
    on_disk = json.loads(Path(path).read_text())
    assert on_disk == study
    assert [r["config"] for r in study["results"]] == ["stock", "rlkv:0.5"]
    assert [r["command"] for r in study["runs"]] == ["cmd1", "cmd2"]
    assert study["ratios"]["rows"][1]["output_tok_s"] == pytest.approx(1.8)
    # each run keeps the ratios measured within it: the second had no stock config to divide by
    assert study["runs"][0]["ratios_within_run"]["rows"][0]["output_tok_s"] == pytest.approx(1.0)
    assert study["runs"][1]["ratios_within_run"]["base"] is None
    other = BenchSettings(model="m", kv_bytes=1 << 20, num_prompts=7)
    with pytest.raises(BenchError, match=r"^bench\.num_prompts = 7 is not allowed: .*measured with 64"):
        check_mergeable(path, other)
    # latency-only settings do not matter to a throughput study
    check_mergeable(path, BenchSettings(model="m", kv_bytes=1 << 20, contexts=[99]))
