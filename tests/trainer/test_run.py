"""(d) end to end: the tiny model, local Ray, vLLM rollouts, a pattern file that `rlkv serve` loads and
answers with; (e) a rollout worker killed by PID mid-run: the run finishes with the gates of an
uninterrupted run; (f) a run stopped after step k and resumed ends with the same gates."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from rlkv_vllm.core.patterns import HeadPattern
from tests.engine_utils import ROOT

pytestmark = pytest.mark.slow

CONFIG = os.path.join(ROOT, "trainer", "configs", "tiny.yaml")
STEPS = 4


def train_cmd(tiny_model: str, out: str, *extra: str) -> list[str]:
    return [sys.executable, "-m", "rlkv_vllm.cli", "train", "--config", CONFIG, "--out", out,
            "--set", f"model.path={tiny_model}", "--set", "reward.kind=plugin",
            "--set", "reward.plugin=benchmarks.study_rewards:by_text_hash",
            "--set", "objective.beta=0.05", "--set", f"run.steps={STEPS}", *extra]


def run_train(cmd: list[str], timeout: float = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
    env.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)  # vLLM's default in the workers: engine core in its own process
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def final_gates(out: str) -> np.ndarray:
    return HeadPattern.load(os.path.join(out, "pattern.json")).gates


@pytest.fixture(scope="module")
def reference_run(tiny_model, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("train") / "uninterrupted")
    r = run_train(train_cmd(tiny_model, out))
    assert r.returncode == 0, r.stderr[-4000:]
    return out, r


def test_end_to_end_then_serve(reference_run, tiny_model):
    out, r = reference_run
    assert "wrote" in r.stderr and f"step {STEPS}/{STEPS}" in r.stderr
    rows = list(csv.DictReader(open(os.path.join(out, "metrics.csv"))))
    assert [int(x["step"]) for x in rows] == list(range(1, STEPS + 1))
    for x in rows:
        assert float(x["logprob_diff_max"]) < 1e-3  # the sampler-learner gap, logged every step
        assert 0.0 < float(x["reward_mean"]) < 1.0 and float(x["rollout_tok_s"]) > 0
        assert int(x["gate_version"]) == int(x["step"])
    pattern = HeadPattern.load(os.path.join(out, "pattern.json"))
    assert pattern.metadata["step"] == STEPS and pattern.metadata["sink"] == 4
    assert pattern.metadata["training_config"]["objective"]["beta"] == 0.05
    assert float(pattern.gates.mean()) < 0.999  # the penalty and the rewards moved the gates
    for name in ("gates.png", "curves.png"):
        assert os.path.getsize(os.path.join(out, name)) > 1000

    from openai import OpenAI

    from rlkv_vllm.server import start_server

    extra = ["--dtype", "float32", "--max-model-len", "512", "--max-num-seqs", "4", "--kv-cache-memory-bytes",
             str(32 << 20)]
    with start_server(tiny_model, rlkv={"heads": os.path.join(out, "pattern.json"), "sparsity": 0.5},
                      extra_args=extra, env={"VLLM_ENABLE_V1_MULTIPROCESSING": "1"}) as server:
        client = OpenAI(base_url=server.base_url + "/v1", api_key="none", max_retries=0, timeout=120)
        reply = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "How many?"}],
                                               max_tokens=8, temperature=0)
        assert reply.usage.completion_tokens > 0
        assert "rlkv train" in server.log() or "RLKV serve" in server.log()


def test_killed_rollout_worker(reference_run, tiny_model, tmp_path):
    ref_out, _ = reference_run
    out = str(tmp_path / "killed")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
    env.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)
    proc = subprocess.Popen(train_cmd(tiny_model, out), cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    metrics = os.path.join(out, "metrics.csv")
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if os.path.exists(metrics) and len(open(metrics).read().splitlines()) >= 2:  # header + step 1
            break
        time.sleep(0.2)
    pid = json.load(open(os.path.join(out, "workers.json")))["pids"][0]
    os.kill(pid, signal.SIGKILL)
    log, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, log[-4000:]
    rows = list(csv.DictReader(open(metrics)))
    assert int(rows[-1]["worker_restarts"]) >= 1, "the worker was restarted"
    assert json.load(open(os.path.join(out, "workers.json")))["pids"][0] != pid
    np.testing.assert_array_equal(final_gates(out), final_gates(ref_out))


def test_resume_equals_uninterrupted(reference_run, tiny_model, tmp_path):
    ref_out, _ = reference_run
    out = str(tmp_path / "resumed")
    first = run_train(train_cmd(tiny_model, out, "--set", "run.steps=2"))
    assert first.returncode == 0, first.stderr[-4000:]
    second = run_train(train_cmd(tiny_model, out, "--resume"))
    assert second.returncode == 0, second.stderr[-4000:]
    assert "resumed from step 2" in second.stderr
    rows = list(csv.DictReader(open(os.path.join(out, "metrics.csv"))))
    assert [int(x["step"]) for x in rows] == list(range(1, STEPS + 1))
    np.testing.assert_array_equal(final_gates(out), final_gates(ref_out))


def test_asynchronous_rollouts_are_one_version_stale(tiny_model, tmp_path):
    out = str(tmp_path / "async")
    r = run_train(train_cmd(tiny_model, out, "--set", "run.staleness=1"))
    assert r.returncode == 0, r.stderr[-4000:]
    rows = list(csv.DictReader(open(os.path.join(out, "metrics.csv"))))
    assert [int(x["step"]) for x in rows] == list(range(1, STEPS + 1))
    # step 1 is sampled with the starting gates the learner trains them at; later steps one version behind
    assert [int(x["staleness"]) for x in rows] == [0] + [1] * (STEPS - 1)
    assert float(final_gates(out).mean()) < 0.999
