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
    """A KV dtype RLKV cannot store names the field, the value and what is allowed."""
    msg = refused(tiny_model, {"heads": good_pattern}, kv_cache_dtype="fp8_inc")
    assert "kv_cache_dtype = 'fp8_inc'" in msg and "auto, fp8, fp8_e4m3, fp8_e5m2" in msg


def test_fp8_kv_cache_where_the_platform_lacks_it(tiny_model, good_pattern):
    """fp8 is allowed, but the CPU kernels need AVX-512 or AMX (and head_size % 32 == 0):
    without them RLKV says so in one line (stock vLLM fails in a worker)."""
    from rlkv_vllm import compat

    if not compat.is_cpu_platform():
        pytest.skip("the CPU platform's fp8 rules")
    problem = compat.cpu_fp8_kv_problem(32)
    if problem is None:
        pytest.skip("this CPU runs fp8 KV caches (tests/backends/test_fp8.py serves them)")
    msg = refused(tiny_model, {"heads": good_pattern}, kv_cache_dtype="fp8_e5m2")
    assert "kv_cache_dtype = 'fp8_e5m2'" in msg and problem in msg and "allowed: auto" in msg


def test_fp8_kv_head_size_rule(monkeypatch):
    """The CPU fp8 kernels take head sizes that are multiples of 32 (80 and 112 are CPU_ATTN sizes)."""
    from rlkv_vllm import compat

    assert "head_size 80" in compat.cpu_fp8_kv_problem(80)


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


def test_prefix_caching_with_gated_mode(tiny_model, good_pattern):
    """Gated mode reads every head's streaming window from the ring too: a hit would skip writing it."""
    msg = refused(tiny_model, {"heads": good_pattern, "mode": "gated"}, enable_prefix_caching=True)
    assert "enable_prefix_caching = True" in msg and "rlkv.mode = 'gated'" in msg and "turn it off" in msg


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


# ------------------------------------------------ CPU start without a KV budget, start-up summary
@pytest.fixture
def plugin_log(monkeypatch):
    """Lines the plugin logs, as "LEVEL message". (vLLM re-applies its logging config now and
    then, which drops handlers of child loggers, so the logger is replaced, not listened to;
    that the lines reach vLLM's handler is tests/test_server.py's.)"""
    from rlkv_vllm import plugin, startup

    lines: list[str] = []

    class Recorder:
        def info(self, msg: str, *args) -> None:
            lines.append("INFO " + (msg % args if args else msg))

        def warning(self, msg: str, *args) -> None:
            lines.append("WARNING " + (msg % args if args else msg))

    monkeypatch.setattr(plugin, "logger", Recorder())
    monkeypatch.setattr(startup, "logger", plugin.logger)
    return lines


def engine_config(model, rlkv, **overrides):
    """The engine config the front-end builds (plugin hooks included), without starting an engine."""
    from vllm import EngineArgs

    return EngineArgs(**engine_kwargs(model, rlkv, **overrides)).create_engine_config()


def needs_cpu() -> None:
    if not compat_is_cpu():
        pytest.skip("the CPU platform's KV budget rule")


PAGED_BPT = 8 * 2 * 32 * 4  # 8 of the tiny model's 16 KV heads full at sparsity 0.5, fp32


def test_cpu_without_budget_picks_one(tiny_model, good_pattern, plugin_log, monkeypatch):
    needs_cpu()
    monkeypatch.delenv("VLLM_CPU_KVCACHE_SPACE", raising=False)
    cfg = engine_config(tiny_model, {"heads": good_pattern}, kv_cache_memory_bytes=None)
    # engine_kwargs: 16 requests x 2048 tokens, a multiple of CPU_ATTN's 128-token blocks
    assert cfg.cache_config.kv_cache_memory_bytes == 16 * 2048 * PAGED_BPT
    picked = [line for line in plugin_log if "no KV budget set" in line]
    assert len(picked) == 1, plugin_log
    assert "enough for 16 requests x 2048 tokens" in picked[0] and "--kv-cache-memory-bytes" in picked[0]


def test_cpu_without_budget_capped_by_free_ram(tiny_model, good_pattern, plugin_log, monkeypatch):
    needs_cpu()
    from rlkv_vllm import compat

    monkeypatch.delenv("VLLM_CPU_KVCACHE_SPACE", raising=False)
    monkeypatch.setattr(compat, "cpu_worker_free_memory", lambda: 100 << 20)
    cfg = engine_config(tiny_model, {"heads": good_pattern}, kv_cache_memory_bytes=None)
    budget_line = next(line for line in plugin_log if "RLKV KV budget" in line)
    ring = int(budget_line.split("(")[-1].split(" B,")[0])
    assert cfg.cache_config.kv_cache_memory_bytes == (25 << 20) - ring
    assert any("capped at 0.25 of the 100.0 MiB RAM free" in line for line in plugin_log)


def test_cpu_without_budget_too_little_ram(tiny_model, good_pattern, monkeypatch):
    needs_cpu()
    from rlkv_vllm import compat

    monkeypatch.delenv("VLLM_CPU_KVCACHE_SPACE", raising=False)
    monkeypatch.setattr(compat, "cpu_worker_free_memory", lambda: 8 << 20)
    with pytest.raises(RLKVConfigError) as e:
        engine_config(tiny_model, {"heads": good_pattern}, kv_cache_memory_bytes=None)
    msg = str(e.value)
    assert "\n" not in msg
    assert "kv_cache_memory_bytes = None is not allowed" in msg and "max_model_len = 2048" in msg
    assert "set --kv-cache-memory-bytes" in msg


def test_cpu_budget_from_env_or_fraction_kept(tiny_model, good_pattern, plugin_log, monkeypatch):
    """VLLM_CPU_KVCACHE_SPACE is a budget; an explicit --gpu-memory-utilization is the user's choice."""
    needs_cpu()
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "1")
    cfg = engine_config(tiny_model, {"heads": good_pattern}, kv_cache_memory_bytes=None)
    budget_line = next(line for line in plugin_log if "RLKV KV budget" in line)
    assert budget_line.startswith("INFO RLKV KV budget 1.00 GiB = paged")
    assert cfg.cache_config.kv_cache_memory_bytes < 1 << 30
    monkeypatch.delenv("VLLM_CPU_KVCACHE_SPACE")
    plugin_log.clear()
    cfg = engine_config(tiny_model, {"heads": good_pattern}, kv_cache_memory_bytes=None, gpu_memory_utilization=0.5)
    assert cfg.cache_config.kv_cache_memory_bytes is None
    assert not any("no KV budget set" in line for line in plugin_log)
    assert any("paged cache sized by vLLM from --gpu-memory-utilization" in line for line in plugin_log)


def test_summary_lines(tiny_model, tmp_path, plugin_log, monkeypatch):
    """Sparsity asked vs effective, layers with no full head, the budget split, kernels, warnings."""
    from rlkv_vllm import runtime

    gates = random_gates(4, 4, seed=0)
    gates[1] = 0.0  # layer 1 keeps no full head
    pattern = write_pattern(str(tmp_path / "p.json"), gates)
    real = runtime.build_plan

    def with_warning(*args, **kwargs):
        plan = real(*args, **kwargs)
        plan.warnings = ["a test warning"]  # what RLKVPlan.warnings will carry
        return plan

    monkeypatch.setattr(runtime, "build_plan", with_warning)
    engine_config(tiny_model, {"heads": pattern, "sparsity": 0.99})
    text = "\n".join(plugin_log)
    assert "sparsity 0.99 asked -> 0.9375 effective (whole heads: 15 of 16 streaming)" in text
    assert "KV heads 1 full (paged), 15 streaming (ring, 16 sink + 64 recent tokens)" in text
    kept = int(gates.max(axis=1).argmax())  # the layer of the one full head
    empty = ", ".join(str(i) for i in range(4) if i != kept)
    assert f"layers with no full head: 3 of 4 (layers {empty})" in text
    assert "RLKV KV budget 64.0 MiB = paged" in text and "+ streaming ring" in text
    assert "RLKV kernels:" in text
    assert "WARNING RLKV: a test warning" in text


@pytest.mark.parametrize("rlkv,hint", [
    ({"ring_slots": 17}, "rlkv.ring_slots = 17 is not allowed: must be at most max_num_seqs = 16"),
    ({"ring_slots": "lots"}, "rlkv.ring_slots = 'lots' is not allowed: must be \"auto\" or a positive integer"),
    ({"slot_tokens": 0}, "rlkv.slot_tokens = 0 is not allowed: must be \"auto\" or a positive integer"),
    ({"slot_tokens": 4096}, "rlkv.slot_tokens = 4096 is not allowed: must be at most max_model_len = 2048"),
])
def test_bad_ring_slots(tiny_model, good_pattern, rlkv, hint):
    msg = refused(tiny_model, {"heads": good_pattern, **rlkv})
    assert msg.startswith(hint), msg


def test_ring_slots_from_the_budget_cap_the_scheduler(tiny_model, good_pattern, plugin_log):
    """auto at a 4 MiB budget and 512-token requests: 3 slots of max_num_seqs 16 (163,840 B each, 2,048 B
    per paged token: floor((4 MiB - r) / (r + 512 x 2,048)) = 3); the scheduler runs at most 3."""
    cfg = engine_config(tiny_model, {"heads": good_pattern, "slot_tokens": 512}, kv_cache_memory_bytes=4 << 20)
    sched = cfg.scheduler_config
    assert (getattr(sched, "max_num_active_seqs", None) or sched.max_num_seqs) == 3
    assert cfg.additional_config["rlkv"]["ring_slots"] == 3  # what the workers build
    assert cfg.cache_config.kv_cache_memory_bytes == (4 << 20) - 4 * 163_840
    line = next(line for line in plugin_log if "RLKV ring slots" in line)
    assert line.startswith("INFO RLKV ring slots 3 of max_num_seqs 16, from budget: the KV budget holds 3 "
                           "requests of 512 tokens"), line
    assert "vLLM runs at most 3 requests at once" in line


def test_decode_step_variant_typo(tiny_model, good_pattern, monkeypatch):
    monkeypatch.setenv("RLKV_DECODE_STEP_VARIANT", "v3")
    msg = refused(tiny_model, {"heads": good_pattern})
    assert msg == "RLKV_DECODE_STEP_VARIANT = 'v3' is not allowed: one of v2, v1"
