"""``rlkv eval sweep``: its configs, its one-line errors, its table and plot, and (slow) the whole sweep on
the planted-recall fixture, whose task needs recall beyond the streaming window: s=0 equals stock, the
learned pattern keeps the answers, all-streaming and random heads lose them, a config that cannot start
is recorded and the sweep goes on."""

from __future__ import annotations

import json
import os
from types import SimpleNamespace

import numpy as np
import pytest

from rlkv_vllm import sweep
from rlkv_vllm.core.patterns import HeadPattern

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _model(tmp_path, layers: int = 3, heads: int = 2) -> str:
    d = tmp_path / "model"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "num_hidden_layers": layers,
        "num_attention_heads": 4, "num_key_value_heads": heads, "hidden_size": 64, "head_dim": 16}))
    return str(d)


def test_configs_in_run_order_with_shared_settings(tmp_path) -> None:
    model = _model(tmp_path)
    pattern = str(tmp_path / "p.json")
    HeadPattern(np.full((3, 2), 0.5, dtype=np.float32), {}).save(pattern)
    duo = str(tmp_path / "duo.json")
    HeadPattern(np.zeros((3, 2), dtype=np.float32), {}).save(duo)
    out = str(tmp_path / "out")
    cfgs = sweep.plan_configs(model, pattern, [0.0, 0.5], [f"duo:{duo}", "random", "streaming"], out, seed=3,
                              rlkv={"sink": 4, "recent": 8})
    assert [c.name for c in cfgs] == ["full", "rlkv:0", "duo:0", "random:0", "rlkv:0.5", "duo:0.5", "random:0.5",
                                      "streaming"]
    assert cfgs[0].rlkv is None and cfgs[0].method == "full"
    assert cfgs[4].rlkv == {"sink": 4, "recent": 8, "heads": pattern, "sparsity": 0.5}
    assert cfgs[-1].rlkv == {"sink": 4, "recent": 8, "heads": os.path.join(out, "all-streaming-gates.json"),
                             "mode": "gated"}
    assert (HeadPattern.load(cfgs[-1].rlkv["heads"]).gates == 0).all()
    rand = HeadPattern.load(cfgs[3].rlkv["heads"]).gates
    again = sweep.plan_configs(model, pattern, [0.5], ["random"], str(tmp_path / "o2"), seed=3)
    assert np.array_equal(HeadPattern.load(again[-1].rlkv["heads"]).gates, rand)  # seeded
    assert rand.shape == (3, 2) and 0 < rand.min() and rand.max() < 1


@pytest.mark.parametrize("argv, message", [
    (["--pattern", "p", "--tasks", "gsm8k", "--out", "o"], "the following arguments are required: --model"),
    (["--model", "/nonexistent", "--pattern", "p", "--tasks", "gsm8k", "--out", "o"],
     "--model /nonexistent is not allowed: no config.json there"),
    (["--model", "{model}", "--pattern", "p", "--tasks", "gsm8k", "--sparsities", "1.2", "--out", "o"],
     "--sparsities 1.2 is not allowed: each must be in [0, 1)"),
    (["--model", "{model}", "--pattern", "p", "--tasks", "gsm8k=/no/file", "--out", "o"],
     "--tasks gsm8k=/no/file is not allowed: no such data file"),
    (["--model", "{model}", "--pattern", "p", "--tasks", "gsm8k", "--compare", "h2o", "--out", "o"],
     "--compare 'h2o' is not allowed: use duo:FILE, random or streaming"),
    (["--model", "{model}", "--pattern", "p", "--tasks", "gsm8k", "--rlkv", "sparsity=0.3", "--out", "o"],
     "--rlkv 'sparsity=0.3' is not allowed: the sweep sets sparsity per config"),
    (["--model", "{model}", "--pattern", "p", "--tasks", "gsm8k", "--rlkv", "sink", "--out", "o"],
     "--rlkv 'sink' is not allowed: use KEY=VALUE"),
])
def test_bad_input_is_one_line(tmp_path, capsys, argv, message) -> None:
    model = _model(tmp_path)
    argv = [a.replace("{model}", model) for a in argv]
    argv = [str(tmp_path / a) if a == "o" else a for a in argv]
    assert sweep.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("rlkv eval sweep: error: ") and message in err and "\n" not in err


def test_rlkv_settings_are_typed() -> None:
    assert sweep.parse_rlkv_settings(["sink=4", "recent=8", "kernel=triton"]) == {
        "sink": 4, "recent": 8, "kernel": "triton"}


def _result(name: str, method: str, s: float | None, acc: float, status: str = "ok") -> sweep.ConfigResult:
    r = sweep.ConfigResult(sweep.SweepConfig(name, method, s, None), status=status,
                           reason="" if status == "ok" else "RLKVConfigError: rlkv.heads has 3 layers, the model 4")
    if status == "ok":
        r.tasks["prompts"] = {"pass_at_1": acc, "ci95": [max(acc - 0.1, 0), min(acc + 0.1, 1)], "tok_s": 100 * acc}
    return r


def test_table_and_plot(tmp_path) -> None:
    results = [_result("full", "full", 0.0, 1.0), _result("rlkv:0", "rlkv", 0.0, 1.0),
               _result("rlkv:0.625", "rlkv", 0.625, 0.97), _result("random:0.625", "random", 0.625, 0.4),
               _result("duo:0.75", "duo", 0.75, 0.0, status="failed to start"), _result("streaming", "streaming", 1.0, 0.05)]
    text = sweep.table(results, ["prompts"])
    lines = text.splitlines()
    assert lines[0].split()[:4] == ["config", "status", "prompts", "pass@1"]
    assert "97.0% [87.0, 100.0]" in lines[3] and "failed to start: RLKVConfigError" in lines[5]
    path = str(tmp_path / "sweep.png")
    sweep.plot(results, ["prompts"], path)
    assert os.path.getsize(path) > 10_000


def test_a_config_that_cannot_start_is_recorded_and_the_sweep_goes_on(tmp_path, monkeypatch, capsys) -> None:
    """The second config's server exits at start: its reason (the log's error line) is recorded, the others
    are evaluated, and the table and files are written."""
    from rlkv_vllm import server as server_mod
    import rlkv_trainer.evaluate as evaluate_mod

    model = _model(tmp_path, layers=2, heads=2)
    pattern = str(tmp_path / "p.json")
    HeadPattern(np.full((2, 2), 0.5, dtype=np.float32), {}).save(pattern)
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"prompt": "ba 7 ?", "answer": "7"}) + "\n")
    started: list[str] = []

    class _Server:
        base_url = "http://127.0.0.1:1"

        def stop(self) -> None:
            pass

    def start_server(model_dir, *, rlkv, extra_args, log_path, startup_timeout, env):
        started.append(os.path.basename(log_path))
        if rlkv and rlkv.get("sparsity") == 0.5:
            with open(log_path, "w") as f:
                f.write("INFO loading\nrlkv: error: rlkv.heads = 'p.json' is not allowed: 2 layers, the model 3\n")
            raise RuntimeError("the server exited")
        return _Server()

    class _Result:
        def __init__(self, acc: float) -> None:
            self.summary = SimpleNamespace(pass_at_1=acc, ci95=(acc, acc), to_json=lambda: {"pass_at_1": acc,
                                                                                         "ci95": [acc, acc]})
            self.items, self.seconds = [], 1.0

        def write(self, path: str) -> None:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            open(path, "w").write("{}")

        def statuses(self) -> dict:
            return {"ok": 1}

    monkeypatch.setattr(server_mod, "start_server", start_server)
    monkeypatch.setattr(evaluate_mod, "evaluate", lambda *a, **k: _Result(1.0))
    out = str(tmp_path / "out")
    assert sweep.main(["--model", model, "--pattern", pattern, "--sparsities", "0", "0.5",
                       "--tasks", f"prompts={data}", "--out", out]) == 0
    doc = json.load(open(os.path.join(out, "sweep.json")))
    assert [(c["name"], c["status"]) for c in doc["configs"]] == [
        ("full", "ok"), ("rlkv:0", "ok"), ("rlkv:0.5", "failed to start")]
    assert doc["configs"][2]["reason"].startswith("rlkv: error: rlkv.heads = 'p.json' is not allowed")
    assert started == ["full.log", "rlkv_0.log", "rlkv_0.5.log"]
    printed = capsys.readouterr()
    assert "failed to start: rlkv: error" in printed.out and os.path.isfile(os.path.join(out, "sweep.png"))


@pytest.mark.slow
def test_the_readme_sweep_on_the_planted_recall_fixture() -> None:
    """The README's sweep block, as printed: the task needs recall beyond the streaming window, so s=0 equals
    stock, the learned pattern keeps the answers, random heads and all-streaming lose them."""
    import re
    import shutil
    import subprocess

    readme = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    block = re.search(r"<!-- readme-command: sweep -->\s*```bash\n(.*?)```", readme, flags=re.S).group(1)
    out = os.path.join(ROOT, re.search(r"--out (\S+)", block).group(1))
    shutil.rmtree(out, ignore_errors=True)
    script = "set -eo pipefail\nsource .venv/bin/activate\nsource scripts/env.sh\n" + block
    proc = subprocess.run(["bash", "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=1500)
    try:
        assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
        doc = json.load(open(os.path.join(out, "sweep.json")))
        by = {c["name"]: c for c in doc["configs"]}
        assert all(c["status"] == "ok" for c in by.values()), [(n, c["reason"]) for n, c in by.items()]
        acc = {n: c["tasks"]["prompts"]["pass_at_1"] for n, c in by.items()}
        assert acc["full"] >= 0.6, acc
        assert acc["rlkv:0"] == acc["full"] == acc["random:0"], acc  # s=0: every head full, greedy: stock's
        assert acc["rlkv:0.625"] >= 0.9 * acc["full"], acc  # the learned heads keep the recall
        assert acc["streaming"] <= acc["full"] - 0.4, acc  # the task needs recall beyond the window
        assert acc["random:0.625"] < acc["rlkv:0.625"], acc
        assert "streaming" in proc.stdout and os.path.getsize(os.path.join(out, "sweep.png")) > 10_000
    finally:
        shutil.rmtree(out, ignore_errors=True)


def test_the_runbook_sweep_command_parses() -> None:
    """docs/RUNBOOK.md's GPU sweep command is valid sweep input (its paths are the operator's)."""
    import re
    import shlex

    text = open(os.path.join(ROOT, "docs", "RUNBOOK.md"), encoding="utf-8").read()
    cmd = re.search(r"```bash\n\s*(rlkv eval sweep .*?)```", text, flags=re.S).group(1)
    argv = shlex.split(cmd.replace("\\\n", " "))[3:]
    args = sweep.build_parser().parse_args(argv)
    assert args.sparsities == [0.0, 0.4, 0.5, 0.6, 0.7] and args.samples == 4
    assert [t for t, _ in [s.partition("=")[::2] for s in args.tasks]] == ["math500", "prompts"]
