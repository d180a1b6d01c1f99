"""Building csrc/ (any machine with nvcc) and the host-side contract of the CUDA decode kernel."""

from __future__ import annotations

import os
import re

import pytest
import torch

from rlkv_vllm.ops import cuda_build, cuda_decode


def test_params_struct_matches_the_kernel():
    """cuda_decode packs DecodeParams by hand: field kinds and order must match the .cu."""
    src = open(cuda_build.source_path("rlkv_decode")).read()
    body = re.search(r"struct DecodeParams \{(.*?)\};", src, re.S).group(1)
    body = re.sub(r"//[^\n]*", "", body)
    decls = [d.strip() for d in body.split(";") if d.strip()]
    kinds = []
    for decl in decls:
        kind = "ptr" if "*" in decl else ("f32" if decl.startswith("float") else "i64")
        kinds += [kind] * (decl.count(",") + 1)
    fmt = cuda_decode._PARAMS.format
    assert fmt == "@15Q26qf4x", fmt
    assert kinds == ["ptr"] * 15 + ["i64"] * 26 + ["f32"], kinds


@pytest.mark.skipif(cuda_build.find_nvcc() is None, reason="nvcc not installed")
def test_build_writes_a_fatbin_with_every_dtype(tmp_path):
    path = cuda_build.build("rlkv_decode", str(tmp_path))
    assert os.path.basename(path) == cuda_build.fatbin_name("rlkv_decode", cuda_build.source_path("rlkv_decode"))
    blob = open(path, "rb").read()
    for tag in ("f32", "f16", "bf16"):
        assert f"rlkv_decode_step_{tag}".encode() in blob


def test_build_without_nvcc_says_so(tmp_path, monkeypatch):
    monkeypatch.setattr(cuda_build, "find_nvcc", lambda: None)
    monkeypatch.setenv("RLKV_CUDA_CACHE", str(tmp_path))
    with pytest.raises(cuda_build.CudaBuildError, match="nvcc not found"):
        cuda_build.locate("rlkv_decode")


def test_source_hash_tracks_the_source(tmp_path):
    a = tmp_path / "a.cu"
    a.write_text("__global__ void f() {}\n")
    h1 = cuda_build.source_hash(str(a))
    a.write_text("__global__ void f() { }\n")
    assert cuda_build.source_hash(str(a)) != h1


@pytest.mark.parametrize("dtype,head_dim,window,match", [
    (torch.float64, 128, 80, "dtype"),
    (torch.bfloat16, 68, 80, "multiple of 8"),
    (torch.float16, 128, 4096, "shared memory"),
])
def test_shape_limits_name_the_problem(dtype, head_dim, window, match):
    reason = cuda_decode.shape_unsupported_reason(dtype, head_dim, 4, window)
    assert reason is not None and match in reason


def test_supported_serving_shapes():
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        for head_dim in (64, 128):
            for group in range(1, 9):
                assert cuda_decode.shape_unsupported_reason(dtype, head_dim, group, 80) is None


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU answer")
def test_unavailable_without_cuda():
    assert cuda_decode.unavailable_reason("cpu") == "no CUDA device"
