"""The GPU training study's whole path, small, on CPU: stock generation, rlkv train, the summary."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.engine_utils import ROOT

pytestmark = pytest.mark.slow


def test_train_study_tiny(tmp_path):
    out = str(tmp_path / "train.json")
    env = {**os.environ, "PYTHONPATH": ROOT}
    env.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)
    r = subprocess.run([sys.executable, "benchmarks/train_study.py", "--tiny", "--out", out], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    res = json.load(open(out))
    sm = res["summary"]
    assert res["vllm"] and res["date"] and res["device"].startswith("cpu")
    assert sm["gated_rollout_tok_s"] > 0 and sm["stock_generate_tok_s"] > 0 and sm["learner_s_per_step"] > 0
    assert sm["recipe_hours"] == pytest.approx(sm["step_s"] * 185 / 3600)
    assert len(res["train"]["metrics"]) == 1 and "gated rollouts" in r.stdout
    # dummy weights (the default, as on the GPU): the rollouts ran the learner's exported random weights,
    # so the sampler-learner gap is fp32 noise, not two different random models
    assert res["workload"]["load_format"] == "dummy"
    assert float(res["train"]["metrics"][0]["logprob_diff_max"]) < 1e-3
