"""rlkv_vllm.bench without an engine: config parsing and its errors, ratios, merging, tables."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from rlkv_vllm import bench
from rlkv_vllm.bench import BenchError, BenchSettings, EngineConfig


def test_parse_config_names() -> None:
    assert bench.parse_config("stock") == EngineConfig("stock")
    assert bench.parse_config("stock:FLASH_ATTN").backend == "FLASH_ATTN"
    assert bench.parse_config("rlkv:0.5") == EngineConfig("rlkv", sparsity=0.5)
    assert bench.parse_config("gated") == EngineConfig("gated") and EngineConfig("gated").name == "gated"
    assert [c.name for c in bench.parse_configs(["stock:CPU_ATTN", "rlkv:0", "rlkv:0.60"])] == \
        ["stock:CPU_ATTN", "rlkv:0", "rlkv:0.6"]


@pytest.mark.parametrize("text, rule", [
    ("rlkv:1.2", "[0, 1)"), ("rlkv:-0.1", "[0, 1)"), ("rlkv:nan", "[0, 1)"), ("rlkv", "needs a sparsity"),
    ("rlkv:x", "needs a sparsity"), ("stock:flash", "upper-case"), ("dense", "use stock"),
    ("gated:0.5", "takes no argument"),
])
def test_parse_config_errors_are_one_line(text: str, rule: str) -> None:
    with pytest.raises(BenchError) as e:
        bench.parse_config(text)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"bench.configs = {text!r} is not allowed:") and rule in msg


def test_duplicate_configs_refused() -> None:
    with pytest.raises(BenchError, match=r"bench.configs = 'rlkv:0.5' .* once"):
        bench.parse_configs(["rlkv:0.5", "stock", "rlkv:0.50"])


@pytest.mark.parametrize("change, field", [
    (dict(output_len=1), "output_len"), (dict(gpu_mem=1.5), "gpu_mem"), (dict(kv_bytes=0), "kv_bytes"),
    (dict(input_len=8000), "input_len"), (dict(num_prompts=0), "num_prompts"),
    (dict(study="latency", batches=[0]), "batches"),
])
def test_validate_settings(change: dict[str, Any], field: str) -> None:
    s = BenchSettings(**{"model": "m", "kv_bytes": 1 << 20, **change})
    with pytest.raises(BenchError, match=rf"^bench\.{field} = .* is not allowed: "):
        bench.validate_settings(s)


def test_latency_cells_clip_to_model_len() -> None:
    s = BenchSettings(model="m", study="latency", max_model_len=2048, latency_output_len=64,
                      batches=[1, 8], contexts=[1024, 4096, 16384])
    assert s.latency_cells() == [(1, 1024), (1, 1984), (8, 1024), (8, 1984)]


def test_engine_kwargs() -> None:
    s = BenchSettings(model="m", pattern="p.tsv", kv_bytes=1 << 20, enforce_eager=True)
    assert "attention_backend" not in bench.engine_kwargs(s, bench.parse_config("stock:CPU_ATTN"))
    assert bench.engine_kwargs(s, bench.parse_config("stock:FLASH_ATTN"))["attention_backend"] == "FLASH_ATTN"
    kw = bench.engine_kwargs(s, bench.parse_config("rlkv:0.5"))
    assert kw["attention_backend"] == "rlkv"
    assert kw["additional_config"] == {"rlkv": {"heads": "p.tsv", "sparsity": 0.5}}
    assert kw["kv_cache_memory_bytes"] == 1 << 20 and kw["enable_prefix_caching"] is False
    kw = bench.engine_kwargs(s, bench.parse_config("gated"))
    assert kw["attention_backend"] == "rlkv"
    assert kw["additional_config"] == {"rlkv": {"heads": "p.tsv", "mode": "gated"}}
    s.gpu_mem = 0.9
    assert bench.engine_kwargs(s, EngineConfig("stock"))["gpu_memory_utilization"] == 0.9


def _result(name: str, tok_s: float, tpot: float, cap: int, status: str = "ok") -> dict[str, Any]:
    cfg = bench.parse_config(name)
    return dict(config=name, kind=cfg.kind, status=status, capacity_tokens=cap, device="dev", vllm="0.26.0",
                torch="2.11", throughput=dict(output_tok_s=tok_s, total_tok_s=2 * tok_s, tpot_mean_s=tpot,
                                              tpot_p90_s=tpot, mean_running=tok_s / 10))


def test_ratios_against_first_stock() -> None:
    rows = [_result("rlkv:0.5", 300.0, 0.02, 2000), _result("stock:FLASH_ATTN", 100.0, 0.01, 1000),
            _result("stock:TRITON_ATTN", 50.0, 0.04, 1000), _result("rlkv:0.6", 0, 0, 0, status="failed")]
    r = bench.compute_ratios(rows)
    assert r["base"] == "stock:FLASH_ATTN"
    by = {q["config"]: q for q in r["rows"]}
    assert set(by) == {"rlkv:0.5", "stock:FLASH_ATTN", "stock:TRITON_ATTN"}
    assert by["rlkv:0.5"]["output_tok_s"] == pytest.approx(3.0)
    assert by["rlkv:0.5"]["tpot_mean"] == pytest.approx(2.0)
    assert by["rlkv:0.5"]["capacity"] == pytest.approx(2.0)
    assert bench.compute_ratios([_result("rlkv:0.5", 1, 1, 1)])["base"] is None


def test_latency_ratios_per_cell() -> None:
    def lat(name: str, tpots: dict[tuple[int, int], float]) -> dict[str, Any]:
        cells = [dict(batch=b, context=c, tpot_mean_s=t, decode_step_mean_s=t / 2, status="ok")
                 for (b, c), t in tpots.items()]
        return dict(config=name, kind=bench.parse_config(name).kind, status="ok", capacity_tokens=10, latency=cells)

    r = bench.compute_ratios([lat("stock", {(1, 1024): 0.01, (8, 1024): 0.02}),
                              lat("rlkv:0.5", {(1, 1024): 0.005, (8, 1024): 0.03})])
    for key in ("tpot_mean", "decode_step_mean"):
        tp = {(c["batch"], c["context"]): c[key] for c in r["rows"][1]["tpot"]}
        assert tp == {(1, 1024): pytest.approx(0.5), (8, 1024): pytest.approx(1.5)}


class _ChunkedPrefillEngine:
    """Just enough of LLMEngine for bench.drive: one request at a time prefills for
    ``chunks`` steps of ``prefill_s`` (no token), while the prefilled ones decode one
    token per step; a step with no prefill takes ``decode_s``."""

    def __init__(self, chunks: int, prefill_s: float, decode_s: float) -> None:
        self.chunks, self.prefill_s, self.decode_s = chunks, prefill_s, decode_s
        self.queue: list[str] = []
        self.left: dict[str, int] = {}
        self.decoding: list[str] = []
        self.chunks_left = chunks

    def add_request(self, rid: str, prompt: dict, params: Any) -> None:
        self.queue.append(rid)
        self.left[rid] = params.max_tokens

    def has_unfinished_requests(self) -> bool:
        return bool(self.left)

    def step(self) -> list[Any]:
        import time
        from types import SimpleNamespace

        emit = list(self.decoding)
        if self.queue:
            time.sleep(self.prefill_s)
            self.chunks_left -= 1
            if self.chunks_left == 0:  # the last chunk yields the first token
                emit.append(self.queue.pop(0))
                self.decoding.append(emit[-1])
                self.chunks_left = self.chunks
        else:
            time.sleep(self.decode_s)
        outs = []
        for r in emit:
            self.left[r] -= 1
            outs.append(SimpleNamespace(request_id=r, outputs=[SimpleNamespace(token_ids=[1])],
                                        finished=self.left[r] == 0))
            if self.left[r] == 0:
                del self.left[r]
                self.decoding.remove(r)
        return outs


def test_decode_step_time_leaves_out_prefill_steps() -> None:
    """TPOT counts the 40 ms steps that also prefill other requests; the decode-only step
    time is the 5 ms of steps in which every request decoded."""
    from types import SimpleNamespace

    llm = SimpleNamespace(llm_engine=_ChunkedPrefillEngine(chunks=2, prefill_s=0.04, decode_s=0.005))
    res = bench.drive(llm, None, [[1, 2]] * 3, SimpleNamespace(max_tokens=12), "t", None)
    assert res["output_tokens"] == 36
    # steps 1-6 prefill (first tokens at 2, 4, 6); 7-17 only decode, until the last request's 12th token
    assert res["decode_steps"] == 11, res["decode_steps"]
    assert 0.0045 <= res["decode_step_mean_s"] < 0.012, res["decode_step_mean_s"]
    assert res["tpot_mean_s"] > 1.5 * res["decode_step_mean_s"]


def test_merge_results_replaces_by_name() -> None:
    old = [_result("stock", 100, 0.01, 1000), _result("rlkv:0.5", 150, 0.01, 2000),
           _result("rlkv:0.6", 1, 1, 1, status="skipped")]
    new = [_result("rlkv:0.5", 200, 0.01, 2000), _result("rlkv:0.6", 210, 0.01, 2400),
           _result("stock", 0, 0, 0, status="skipped"), _result("rlkv:0.8", 300, 0.01, 4000)]
    merged = bench.merge_results(old, new)
    assert [r["config"] for r in merged] == ["stock", "rlkv:0.5", "rlkv:0.6", "rlkv:0.8"]
    # a skip never overwrites figures measured before; a measurement replaces a skip
    assert merged[0]["status"] == "ok" and merged[1]["throughput"]["output_tok_s"] == 200
    assert merged[2]["status"] == "ok"


def test_write_study_merges_and_refuses_other_workloads(tmp_path: Path) -> None:
    s = BenchSettings(model="m", kv_bytes=1 << 20)
    path = str(tmp_path / "engine.json")
    bench.write_study(path, bench.build_study(s, [_result("stock", 100, 0.01, 1000)], "cmd1", {}))
    study = bench.write_study(path, bench.build_study(s, [_result("rlkv:0.5", 180, 0.01, 1900)], "cmd2", {}))
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
        bench.check_mergeable(path, other)
    # latency-only settings do not matter to a throughput study
    bench.check_mergeable(path, BenchSettings(model="m", kv_bytes=1 << 20, contexts=[99]))


def test_table_and_default_path() -> None:
    s = BenchSettings(model="m", kv_bytes=1 << 20)
    study = bench.build_study(s, [_result("stock", 100, 0.01, 1000), _result("rlkv:0.5", 200, 0.015, 1900),
                                  dict(config="rlkv:0.6", kind="rlkv", status="skipped")], "cmd", {})
    table = bench.format_table(study)
    assert "2.00x" in table and "1.50x" in table and "1.90x" in table and "skipped" in table
    assert bench.default_out_path("/r", study, "x").startswith("/r/engine-dev-vllm0.26.0-")
    assert bench.default_out_path("/r", study, "x").endswith("-x.json")


def test_percentile_matches_numpy_default() -> None:
    np = pytest.importorskip("numpy")
    xs = [0.3, 0.1, 0.7, 0.2, 0.9]
    assert bench.percentile(xs, 90) == pytest.approx(float(np.percentile(xs, 90)))
    assert bench.percentile([], 50) is None


def test_cli_bad_argument_is_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    from rlkv_vllm.cli import main

    with pytest.raises(SystemExit) as e:
        main(["bench", "--configs", "stock", "rlkv:2"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "bench.configs = 'rlkv:2' is not allowed" in err and "[0, 1)" in err
    with pytest.raises(SystemExit):
        main(["bench", "--max-num-seqs", "0"])
    assert "--max-num-seqs: '0' is not allowed: must be a positive integer" in capsys.readouterr().err
