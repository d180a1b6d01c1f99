"""(9) Bad input is refused at startup with one line naming the field, the value and what
is allowed; never a traceback from a worker."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from rlkv_vllm.core.settings import RLKVConfigError
from rlkv_vllm.tiny_model import TinyModelSpec
from tests.engine_utils import engine_kwargs, random_gates, tiny_model_dir, write_pattern


@pytest.fixture(scope="module")
def good_pattern(tmp_path_factory):
    return write_pattern(str(tmp_path_factory.mktemp("pat") / "p.json"), random_gates(4, 4, seed=0))


def refused(model, rlkv, **overrides) -> str:
    from vllm import LLM

    with pytest.raises(RLKVConfigError) as e:
        LLM(**engine_kwargs(model, rlkv, **overrides))
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def test_missing_pattern(tiny_model, tmp_path):
    msg = refused(tiny_model, {"heads": str(tmp_path / "nope.tsv")})
    assert "rlkv.heads" in msg and "nope.tsv" in msg and "no such file" in msg


def test_unreadable_pattern(tiny_model, tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    msg = refused(tiny_model, {"heads": str(bad)})
    assert "rlkv.heads" in msg and "could not be read" in msg


def test_pattern_shape_mismatch(tiny_model, tmp_path):
    p = write_pattern(str(tmp_path / "p.tsv"), random_gates(3, 4, seed=0))
    msg = refused(tiny_model, {"heads": p})
    assert "3 x 4" in msg and "model has 4 x 4" in msg


@pytest.mark.parametrize("value", [1.0, -0.5, "half"])
def test_sparsity_out_of_range(tiny_model, good_pattern, value):
    msg = refused(tiny_model, {"heads": good_pattern, "sparsity": value})
    assert "rlkv.sparsity" in msg and repr(value) in msg and "[0, 1)" in msg


@pytest.mark.parametrize("key,value", [("sink", 0), ("recent", -1)])
def test_non_positive_window(tiny_model, good_pattern, key, value):
    msg = refused(tiny_model, {"heads": good_pattern, key: value})
    assert f"rlkv.{key} = {value}" in msg and "positive integer" in msg


def test_unknown_key(tiny_model, good_pattern):
    msg = refused(tiny_model, {"heads": good_pattern, "sparsty": 0.5})
    assert "rlkv.sparsty" in msg and "allowed keys" in msg and "sparsity" in msg


@pytest.mark.parametrize("key,value,allowed", [("selection", "topk", "global, per_layer, explicit"),
                                               ("mode", "train", "serve, gated")])
def test_unknown_selection_or_mode(tiny_model, good_pattern, key, value, allowed):
    msg = refused(tiny_model, {"heads": good_pattern, key: value})
    assert f"rlkv.{key} = {value!r}" in msg and allowed in msg


def test_unsupported_head_size(tmp_path):
    from rlkv_vllm.compat import is_cpu_platform

    if not is_cpu_platform():
        pytest.skip("head_dim 48 is supported by the CUDA path")
    model = tiny_model_dir(TinyModelSpec(num_layers=2, num_q_heads=4, num_kv_heads=2, head_dim=48))
    p = write_pattern(str(tmp_path / "p.json"), random_gates(2, 2, seed=0))
    msg = refused(model, {"heads": p})
    assert "head_size = 48" in msg and "supported" in msg


def test_quantized_kv_cache(tiny_model, good_pattern):
    msg = refused(tiny_model, {"heads": good_pattern}, kv_cache_dtype="fp8")
    assert "kv_cache_dtype = 'fp8'" in msg and "'auto'" in msg


def test_unsupported_dtype_on_cuda(monkeypatch, good_pattern):
    """The dtype rule on CUDA (checked without a GPU): float64 is refused."""
    from types import SimpleNamespace

    from rlkv_vllm import compat, plugin

    monkeypatch.setattr(compat, "is_cpu_platform", lambda: False)
    cfg = SimpleNamespace(
        model_config=SimpleNamespace(dtype="torch.float64", model="m"),
        cache_config=SimpleNamespace(cache_dtype="auto"),
    )
    plan = SimpleNamespace(shape=SimpleNamespace(head_size=128, model_id="m"))
    with pytest.raises(RLKVConfigError, match=r"dtype = 'float64' is not allowed.*float16, bfloat16, float32"):
        plugin._check_model(cfg, plan)


@pytest.mark.parametrize("name", ["decode_context_parallel_size", "prefill_context_parallel_size"])
def test_context_parallel(monkeypatch, name):
    """Context parallelism (checked without several devices): refused by name and value."""
    from types import SimpleNamespace

    from rlkv_vllm import compat, plugin

    monkeypatch.setattr(compat, "is_cpu_platform", lambda: False)
    cfg = SimpleNamespace(
        model_config=SimpleNamespace(dtype="torch.bfloat16", model="m"),
        cache_config=SimpleNamespace(cache_dtype="auto"),
        parallel_config=SimpleNamespace(pipeline_parallel_size=1, **{name: 2}),
        speculative_config=None,
    )
    plan = SimpleNamespace(shape=SimpleNamespace(head_size=128, model_id="m"), serve=True)
    with pytest.raises(RLKVConfigError, match=rf"{name} = 2 is not allowed with RLKV: use 1"):
        plugin._check_model(cfg, plan)


def test_prefix_caching_with_serve_mode(tiny_model, good_pattern):
    msg = refused(tiny_model, {"heads": good_pattern}, enable_prefix_caching=True)
    assert "enable_prefix_caching = True" in msg and "turn it off" in msg


def test_no_full_head(tiny_model, tmp_path):
    p = write_pattern(str(tmp_path / "zeros.tsv"), [[0.0] * 4] * 4)
    msg = refused(tiny_model, {"heads": p, "selection": "explicit"})
    assert "no full head" in msg


def test_cuda_decode_kernel_on_cpu(tiny_model, good_pattern):
    if not compat_is_cpu():
        pytest.skip("checks the CPU platform's answer")
    msg = refused(tiny_model, {"heads": good_pattern, "decode_kernel": "cuda"})
    assert "rlkv.decode_kernel = 'cuda' is not allowed here" in msg and "auto, triton" in msg


def test_flash_attn_full_kernel_where_it_cannot_run(tiny_model, good_pattern):
    """fp32 (the tiny model's dtype) rules FlashAttention out on CUDA; CPU has none."""
    msg = refused(tiny_model, {"heads": good_pattern, "full_kernel": "flash_attn"})
    assert "rlkv.full_kernel = 'flash_attn' is not allowed here" in msg and "auto, triton" in msg


def compat_is_cpu() -> bool:
    from rlkv_vllm import compat

    return compat.is_cpu_platform()


def test_settings_without_backend(tiny_model, good_pattern):
    from vllm import LLM

    kw = engine_kwargs(tiny_model, None, additional_config={"rlkv": {"heads": good_pattern}})
    with pytest.raises(RLKVConfigError, match="--attention-backend rlkv"):
        LLM(**kw)


@pytest.mark.slow
def test_cli_prints_one_line(tiny_model, good_pattern):
    """`rlkv serve` (== vllm serve) with a bad setting: one line on stderr, no traceback."""
    pytest.importorskip("uvicorn", reason="vLLM's server dependencies are not installed here")
    cfg = json.dumps({"rlkv": {"heads": good_pattern, "sparsity": 2}})
    proc = subprocess.run(
        [sys.executable, "-m", "rlkv_vllm.cli", "serve", tiny_model, "--attention-backend", "rlkv",
         "--additional-config", cfg, "--dtype", "float32", "--kv-cache-memory-bytes", str(64 << 20)],
        capture_output=True, text=True, timeout=300,
        env={**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "1"},
    )
    assert proc.returncode != 0
    assert "rlkv: error: rlkv.sparsity = 2 is not allowed: must be a number in [0, 1)" in proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
