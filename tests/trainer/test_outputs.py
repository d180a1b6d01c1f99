"""What a run writes: the pattern serve loads, plots, checkpoints that resume exactly, metrics rows."""

from __future__ import annotations

import csv
import io
import os
import random

import numpy as np
import pytest
import torch

from rlkv_trainer import checkpoint
from rlkv_trainer.outputs import plot_curves, plot_gates, write_pattern
from rlkv_trainer.run_log import RunLog
from rlkv_vllm.core.patterns import HeadPattern
from rlkv_vllm.core.plan import build_plan
from rlkv_vllm.core.settings import ModelShape, parse_settings


def test_pattern_loads_as_serve_loads_it(tmp_path):
    gates = np.array([[1.2, 0.3], [0.5, -0.1], [0.9, 0.8]], dtype=np.float32)
    path = write_pattern(str(tmp_path), gates, model_id="rlkv-tiny", sink=128, recent=256, step=7,
                         training_config={"objective": {"clip": 0.4}})
    pat = HeadPattern.load(path)  # serve's loader: metadata must agree with the gates
    np.testing.assert_array_equal(pat.gates, np.clip(gates, 0, 1))
    assert pat.metadata["step"] == 7 and pat.metadata["training_config"]["objective"]["clip"] == 0.4
    assert (pat.metadata["num_layers"], pat.metadata["num_kv_heads"], pat.metadata["sink"]) == (3, 2, 128)
    shape = ModelShape(num_layers=3, num_kv_heads=2, num_q_heads=4, head_size=64, model_id="rlkv-tiny")
    plan = build_plan(parse_settings({"heads": path, "sparsity": 0.5}), shape, max_num_seqs=4, dtype=torch.float16)
    assert plan.mask.sum() == 3 and not plan.warnings


def test_plots(tmp_path):
    g = plot_gates(str(tmp_path), np.random.default_rng(0).uniform(size=(4, 4)))
    c = plot_curves(str(tmp_path), [{"step": i, "reward_mean": i / 4, "alpha_mean": 1 - i / 8, "penalty": 1e-3}
                                    for i in range(1, 4)])
    for p in (g, c):
        assert os.path.getsize(p) > 1000 and open(p, "rb").read(4) == b"\x89PNG"


def test_checkpoint_round_trip_resumes_the_rngs(tmp_path):
    alpha = torch.nn.Parameter(torch.rand(2, 3))
    opt = torch.optim.AdamW([alpha], lr=1e-2)
    alpha.sum().backward()
    opt.step()
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    for step in (1, 2, 3):
        checkpoint.save(str(tmp_path), checkpoint.TrainState(step, step, alpha, opt.state_dict(), {"pos": step},
                                                             checkpoint.capture_rng()))
    want = (random.random(), float(np.random.rand()), float(torch.rand(())))
    assert checkpoint.steps_saved(str(tmp_path)) == [2, 3]  # keeps the newest two
    state = checkpoint.load_latest(str(tmp_path))
    assert state.step == 3 and state.data == {"pos": 3}
    torch.testing.assert_close(state.alpha, alpha.detach())
    opt2 = torch.optim.AdamW([torch.nn.Parameter(state.alpha.clone())], lr=1e-2)
    opt2.load_state_dict(state.optimizer)
    assert opt2.state_dict()["state"][0]["step"] == opt.state_dict()["state"][0]["step"]
    checkpoint.restore_rng(state.rng)
    assert (random.random(), float(np.random.rand()), float(torch.rand(()))) == want
    assert checkpoint.load_latest(str(tmp_path / "none")) is None


def test_run_log_rows_progress_and_resume(tmp_path):
    out = io.StringIO()
    log = RunLog(str(tmp_path), tensorboard=True, stream=out)
    for step in (1, 2, 3):
        log.log(step, {"reward_mean": 0.5, "alpha_mean": 0.9, "penalty": 1e-3, "rollout_tok_s": 1234.0,
                       "logprob_diff_max": 2e-5, "logprob_diff_mean": 1e-6, "masked_share": 0.0}, total_steps=3)
    log.close()
    assert "step 3/3, reward 0.500, alpha 0.900" in out.getvalue() and "rollout tok/s 1,234" in out.getvalue()
    other = RunLog(str(tmp_path / "other"), tensorboard=False, stream=out)
    other.log(1, {"a": 1.0})
    with pytest.raises(ValueError, match=r"missing \['a'\] / unknown \['b'\]"):
        other.log(2, {"b": 1.0})
    resumed = RunLog(str(tmp_path), resume_after=2, tensorboard=False, stream=out)
    assert [r["step"] for r in resumed.rows] == [1, 2]
    rows = list(csv.DictReader(open(tmp_path / "metrics.csv")))
    assert [r["step"] for r in rows] == ["1", "2"] and "logprob_diff_max" in rows[0]
    assert os.path.isdir(tmp_path / "tensorboard")
