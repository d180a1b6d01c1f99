"""scripts/gpu/shape_model.py: the dummy-weight folder of a published shape and its resampled pattern."""

from __future__ import annotations

import importlib.util
import json
import os

import numpy as np
import pytest

from rlkv_vllm.core.patterns import HeadPattern

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SHARED = os.path.join(os.path.dirname(ROOT), "shared", "data")
spec = importlib.util.spec_from_file_location("shape_model", os.path.join(ROOT, "scripts", "gpu", "shape_model.py"))
shape_model = importlib.util.module_from_spec(spec)
spec.loader.exec_module(shape_model)


def test_resampling_keeps_the_source_where_shapes_match_and_scales_depth() -> None:
    src = np.random.default_rng(1).uniform(size=(28, 4)).astype(np.float32)
    same = shape_model.resample_gates(src, 28, 4, seed=3)
    assert np.abs(same - src).max() <= 1e-3
    big = shape_model.resample_gates(src, 64, 8, seed=3)
    assert big.shape == (64, 8)
    np.testing.assert_allclose(big[0, :4], src[0], atol=1e-3)
    np.testing.assert_allclose(big[-1, 4:], src[-1], atol=1e-3)  # last layer, heads tiled
    assert len(np.unique(big)) == big.size  # the jitter breaks the tiling's ties


@pytest.mark.skipif(not os.path.isdir(SHARED), reason="../shared/data is not beside the checkout")
def test_writes_a_loadable_model_folder_and_pattern(tmp_path) -> None:
    cfg = os.path.join(SHARED, "model-shapes", "DeepSeek-R1-Distill-Qwen-32B", "config.json")
    src = os.path.join(SHARED, "head-patterns", "rlkv", "DeepSeek-R1-Distill-Qwen-7B.tsv")
    out, pat = tmp_path / "m", tmp_path / "p.tsv"
    assert shape_model.main([cfg, str(out), "--pattern-from", src, "--pattern-out", str(pat)]) == 0
    written = json.load(open(out / "config.json"))
    assert written["num_hidden_layers"] == 64 and written["eos_token_id"] == 1
    tok = json.load(open(out / "tokenizer.json"))
    assert len(tok["model"]["vocab"]) == written["vocab_size"]
    pattern = HeadPattern.load(str(pat))
    assert (pattern.num_layers, pattern.num_kv_heads) == (64, 8)
    assert shape_model.main([cfg, str(out), "--pattern-from", src]) == 2  # both or neither
