"""rlkv_vllm.bench.report: the study table, the progress lines."""

from __future__ import annotations

from rlkv_vllm.bench.config import BenchSettings
from rlkv_vllm.bench.report import format_duration, format_event, format_finished, format_table
from rlkv_vllm.bench.results import build_study, default_out_path
from tests.bench.study_rows import result_row


def test_table_and_default_path() -> None:
    s = BenchSettings(model="m", kv_bytes=1 << 20)
    study = build_study(s, [result_row("stock", 100, 0.01, 1000), result_row("rlkv:0.5", 200, 0.015, 1900),
                            dict(config="rlkv:0.6", kind="rlkv", status="skipped")], "cmd", {})
    table = format_table(study)
    assert "2.00x" in table and "1.50x" in table and "1.90x" in table and "skipped" in table
    assert default_out_path("/r", study, "x").startswith("/r/engine-dev-vllm0.26.0-")
    assert default_out_path("/r", study, "x").endswith("-x.json")


def test_progress_lines() -> None:
    assert format_event(dict(event="engine_start", engine_start_s=12.34, capacity_tokens=16384)) == \
        "engine up in 12.3 s, KV capacity 16,384 tokens"
    assert format_event(dict(event="progress", part="throughput", done=3, total=48, tokens=4096, elapsed_s=20.2,
                             running=12)) == "generating 20 s: 3/48 requests done, 4,096 tokens out, 12 running"
    assert format_event(dict(event="progress", part="batch 8 context 1024", done=0, total=8, tokens=0,
                             elapsed_s=10.0, running=None)) == \
        "batch 8 context 1024, generating 10 s: 0/8 requests done, 0 tokens out"
    assert format_event(dict(event="cell", batch=1, context=64, tpot_mean_s=0.0123)) == \
        "batch 1 context 64: TPOT 12.30 ms"
    assert format_event(dict(event="something_new")) is None
    done = dict(status="ok", wall_s=61.4, throughput=dict(output_tok_s=1234.56, mean_running=20.31,
                                                          tpot_mean_s=0.015))
    assert format_finished(done) == "ok in 61 s: 1,234.6 out tok/s, mean running 20.3, TPOT 15.00 ms"
    assert format_finished(dict(status="timeout", wall_s=300.0)) == "timeout in 300 s"
    assert format_duration(42.4) == "42 s" and format_duration(125) == "2 min 05 s"


def test_table_states_ratios_against_stock_of_the_same_kv_dtype() -> None:
    s = BenchSettings(model="m", kv_bytes=1 << 20)
    rows = [result_row("stock:FLASH_ATTN", 100.0, 0.01, 1000), result_row("stock:FLASH_ATTN+fp8", 150.0, 0.01, 2000),
            result_row("rlkv:0.5+fp8", 450.0, 0.01, 8000)]
    table = format_table(build_study(s, rows, "cmd", {}))
    assert "4.50x" in table  # RLKV+FP8 against stock BF16, in the table
    line = [x for x in table.splitlines() if "(same KV dtype)" in x]
    assert line == ["rlkv:0.5+fp8 vs stock:FLASH_ATTN+fp8 (same KV dtype): tok/s 3.00x, running 3.00x, TPOT 1.00x, capacity 4.00x"]
