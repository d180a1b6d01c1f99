"""rlkv_vllm.bench.config: the config grammar and its one-line errors, settings validation, the CLI's refusals."""

from __future__ import annotations

from typing import Any

import pytest

from rlkv_vllm.bench.config import (BenchError, BenchSettings, EngineConfig, parse_config, parse_configs,
                                    validate_settings)


def test_parse_config_names() -> None:
    assert parse_config("stock") == EngineConfig("stock")
    assert parse_config("stock:FLASH_ATTN").backend == "FLASH_ATTN"
    assert parse_config("rlkv:0.5") == EngineConfig("rlkv", sparsity=0.5)
    assert parse_config("gated") == EngineConfig("gated") and EngineConfig("gated").name == "gated"
    assert [c.name for c in parse_configs(["stock:CPU_ATTN", "rlkv:0", "rlkv:0.60"])] == \
        ["stock:CPU_ATTN", "rlkv:0", "rlkv:0.6"]


@pytest.mark.parametrize("text, rule", [
    ("rlkv:1.2", "[0, 1)"), ("rlkv:-0.1", "[0, 1)"), ("rlkv:nan", "[0, 1)"), ("rlkv", "needs a sparsity"),
    ("rlkv:x", "needs a sparsity"), ("stock:flash", "upper-case"), ("dense", "use stock"),
    ("gated:0.5", "takes no argument"),
])


def test_parse_config_errors_are_one_line(text: str, rule: str) -> None:
    with pytest.raises(BenchError) as e:
        parse_config(text)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"bench.configs = {text!r} is not allowed:") and rule in msg


def test_duplicate_configs_refused() -> None:
    with pytest.raises(BenchError, match=r"bench.configs = 'rlkv:0.5' .* once"):
        parse_configs(["rlkv:0.5", "stock", "rlkv:0.50"])


@pytest.mark.parametrize("change, field", [
    (dict(output_len=1), "output_len"), (dict(gpu_mem=1.5), "gpu_mem"), (dict(kv_bytes=0), "kv_bytes"),
    (dict(input_len=8000), "input_len"), (dict(num_prompts=0), "num_prompts"),
    (dict(study="latency", batches=[0]), "batches"),
])


def test_validate_settings(change: dict[str, Any], field: str) -> None:
    s = BenchSettings(**{"model": "m", "kv_bytes": 1 << 20, **change})
    with pytest.raises(BenchError, match=rf"^bench\.{field} = .* is not allowed: "):
        validate_settings(s)


def test_latency_cells_clip_to_model_len() -> None:
    s = BenchSettings(model="m", study="latency", max_model_len=2048, latency_output_len=64,
                      batches=[1, 8], contexts=[1024, 4096, 16384])
    assert s.latency_cells() == [(1, 1024), (1, 1984), (8, 1024), (8, 1984)]


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


def test_config_options() -> None:
    c = parse_config("rlkv:0.5+fp8+permute")
    assert (c.kind, c.sparsity, c.kv_cache_dtype, c.permute_heads) == ("rlkv", 0.5, "fp8", True)
    assert c.name == "rlkv:0.5+fp8+permute" and parse_config("rlkv:0.50+permute+fp8").name == c.name
    assert parse_config("rlkv:0.5+gather").permute_heads is False
    assert parse_config("stock:FLASH_ATTN+fp8_e4m3").identity()["kv_cache_dtype"] == "fp8_e4m3"
    assert parse_config("stock").identity()["kv_cache_dtype"] == "auto"
    # a dtype option makes another config: the two may be measured in one study
    assert [x.name for x in parse_configs(["stock", "stock+fp8"])] == ["stock", "stock+fp8"]


@pytest.mark.parametrize("text, rule", [
    ("rlkv:0.5+fp4", "unknown option 'fp4'"), ("stock+permute", "rlkv:S configs only"),
    ("rlkv:0.5+fp8+fp8_e5m2", "one KV-cache dtype"), ("rlkv:0.5+permute+gather", "one of +permute"),
    ("gated+gather", "rlkv:S configs only"), ("rlkv:0.5+", "unknown option ''"),
])
def test_config_option_errors_are_one_line(text: str, rule: str) -> None:
    with pytest.raises(BenchError) as e:
        parse_config(text)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"bench.configs = {text!r} is not allowed:") and rule in msg
