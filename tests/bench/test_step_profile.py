"""rlkv_vllm.bench.step_profile: categories, the profiled window, and a profiled engine study on CPU."""

from __future__ import annotations

import time

import pytest
import torch

from rlkv_vllm.bench.step_profile import StepProfiler, categorize


@pytest.mark.parametrize("name, cat", [
    ("_ring_attention_kernel", "rlkv_ring_attention"),
    ("_decode_step_kernel", "rlkv_decode_step"),
    ("rlkv_decode_step_bf16", "rlkv_decode_step"),
    ("_fused_kv_write_kernel", "rlkv_kv_write"),
    ("void flash::flash_fwd_kernel<Flash_fwd_kernel_traits<128, 64>>", "attention"),
    ("kernel_unified_attention_2d", "attention"),
    ("void at::native::(anonymous namespace)::indexSelectLargeIndex<c10::BFloat16>", "gather_scatter"),
    ("void at::native::(anonymous namespace)::CatArrayBatchedCopy<at::native::OpaqueType<2u>>", "gather_scatter"),
    ("aten::index_select", "gather_scatter"),
    ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64", "gemm"),
    ("nvjet_tst_128x256_64x4_1x2_h_bz_coopA_NNT", "gemm"),
    ("aten::mm", "gemm"),
    ("void vllm::reshape_and_cache_flash_kernel<__nv_bfloat16>", "kv_cache_write"),
    ("void vllm::rms_norm_kernel<c10::BFloat16>", "norm_rope_act"),
    ("void at::native::(anonymous namespace)::cunn_SoftMaxForward<4, float>", "sampling"),
    ("something_unheard_of", "other"),
])
def test_categorize(name: str, cat: str) -> None:
    assert categorize(name) == cat


def test_cuda_summary_counts_kernels_once() -> None:
    """On CUDA a CPU operator (aten::mm) reports the device time of the kernel it launched, and the kernel
    reports it too: only the kernel may count."""
    from types import SimpleNamespace

    from rlkv_vllm.bench.step_profile import summarize

    events = [
        SimpleNamespace(key="aten::mm", device_type="DeviceType.CPU", self_device_time_total=100.0, count=2),
        SimpleNamespace(key="sm90_xmma_gemm_bf16", device_type="DeviceType.CUDA", self_device_time_total=100.0,
                        count=2),
        SimpleNamespace(key="_ring_attention_kernel", device_type="DeviceType.CUDA", self_device_time_total=20.0,
                        count=2),
    ]
    d = summarize(events, steps=2, wall_s=200e-6, on_cuda=True).to_dict()
    assert d["ms_per_step"] == {"gemm": 0.05, "rlkv_ring_attention": 0.01}
    assert d["busy_fraction"] == 0.6


def test_window_bounds_are_checked() -> None:
    with pytest.raises(ValueError, match="start=-1"):
        StepProfiler(-1, 3)
    with pytest.raises(ValueError, match="steps=0"):
        StepProfiler(0, 0)


def test_window_profiles_only_its_steps() -> None:
    """Steps outside the window do heavy matmuls; inside, gathers only. The table must see the gathers
    and (almost) no matmul time, and its per-step wall time must be that of the window's steps."""
    x = torch.randn(512, 512)
    idx = torch.randint(0, 512, (4096,))
    prof = StepProfiler(start=2, steps=3)
    for step in range(8):
        prof.before_step()
        if 2 <= step < 5:
            for _ in range(20):
                x.index_select(0, idx)
        else:
            for _ in range(5):
                x @ x
        prof.after_step()
    assert prof.result is not None
    d = prof.result.to_dict()
    assert d["steps"] == 3 and d["device"] == "cpu"
    ms = d["ms_per_step"]
    assert ms.get("gather_scatter", 0) > 0
    assert ms.get("gemm", 0) < 0.1 * ms["gather_scatter"]
    assert abs(sum(d["share"].values()) - 1) < 1e-3
    assert 0 < d["device_ms_per_step"] <= d["wall_ms_per_step"] * 1.05
    assert d["top_kernels"][0]["category"] == "gather_scatter"


def test_window_closed_early_reports_the_steps_it_saw() -> None:
    prof = StepProfiler(start=0, steps=10)
    for _ in range(4):
        prof.before_step()
        torch.randn(64, 64) @ torch.randn(64, 64)
        prof.after_step()
    assert prof.result is None
    prof.close()
    assert prof.result is not None and prof.result.steps == 4


@pytest.mark.slow
def test_profiled_engine_study_on_the_tiny_model(tmp_path) -> None:
    """`--profile-steps` end to end: a real engine (tiny model, CPU) in its own process, its result
    carrying the profiled window's table, printed under the study table."""
    import argparse

    from rlkv_vllm.bench.config import add_bench_args
    from rlkv_vllm.bench.report import format_table
    from rlkv_vllm.bench.study import run_from_args

    p = argparse.ArgumentParser()
    add_bench_args(p, {})
    out = tmp_path / "study.json"
    a = p.parse_args(["--configs", "rlkv:0.5", "--num-prompts", "4", "--input-len", "32", "--output-len", "16",
                      "--kv-bytes", str(16 << 20), "--max-num-seqs", "8", "--profile-steps", "4",
                      "--profile-start", "3", "--out", str(out)])
    lines: list[str] = []
    study = run_from_args(a, cache_dir=str(tmp_path / "tiny"), results_dir=None, command="test", log=lines.append)
    (res,) = study["results"]
    assert res["status"] == "ok", res
    prof = res["profile"]
    assert prof["steps"] == 4 and prof["device"] == "cpu"
    assert prof["ms_per_step"]["attention"] > 0  # the layers' attention ran inside the window
    assert prof["ms_per_step"]["gemm"] > 0
    assert "profile rlkv:0.5 (4 steps, cpu)" in format_table(study)


class _FakeEngine:
    """Just enough of LLMEngine for bench.drive: every request gets one token per step."""

    def __init__(self, step_s: float) -> None:
        self.step_s = step_s
        self.left: dict[str, int] = {}

    def add_request(self, rid: str, prompt: dict, params: object) -> None:
        self.left[rid] = params.max_tokens  # type: ignore[attr-defined]

    def has_unfinished_requests(self) -> bool:
        return bool(self.left)

    def step(self) -> list:
        from types import SimpleNamespace

        time.sleep(self.step_s)
        outs = [SimpleNamespace(request_id=r, outputs=[SimpleNamespace(token_ids=[1])]) for r in self.left]
        self.left = {r: n - 1 for r, n in self.left.items() if n > 1}
        return outs


def test_drive_clock_leaves_out_the_profilers_own_time(monkeypatch: pytest.MonkeyPatch) -> None:
    """A trace reduction that takes 0.5 s must not show in gen_s or TPOT; the window's steps do."""
    from types import SimpleNamespace

    from rlkv_vllm.bench import step_profile
    from rlkv_vllm.bench.driver import drive

    real = step_profile.summarize

    def slow_summarize(*args, **kwargs):  # type: ignore[no-untyped-def]
        time.sleep(0.5)
        return real(*args, **kwargs)

    monkeypatch.setattr(step_profile, "summarize", slow_summarize)
    llm = SimpleNamespace(llm_engine=_FakeEngine(step_s=0.01))
    params = SimpleNamespace(max_tokens=20)
    prof = StepProfiler(start=5, steps=3)
    res = drive(llm, None, [[1, 2]] * 4, params, "t", None, prof)
    assert prof.result is not None and prof.result.steps == 3
    assert res["profiler_overhead_s"] >= 0.5
    assert res["output_tokens"] == 80 and res["steps"] == 20
    # 20 steps of 10 ms (+ the window's profiled steps), not + 0.5 s
    assert 0.2 <= res["gen_s"] < 0.45, res["gen_s"]
    assert 0.0095 <= res["tpot_mean_s"] < 0.02, res["tpot_mean_s"]
