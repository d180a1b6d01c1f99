"""The README's first hour, as printed: reach ``rlkv`` in .venv, build the tiny model, serve it
with RLKV, one curl request. Blocks are found by their marker comment (``<!-- first-hour: NAME -->``
right before a fenced bash block) and run in bash from the repo root, as a user would."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import time

import pytest

from rlkv_vllm.demo import failure_reason

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, "README.md")
PORT = 8000  # vLLM's default, which the README's curl line uses
STARTUP_S = 300


def first_hour_blocks() -> dict[str, str]:
    text = open(README, encoding="utf-8").read()
    found = re.findall(r"<!-- first-hour: (\w+) -->\s*```bash\n(.*?)```", text, flags=re.S)
    return dict(found)


def _serve_then(blocks: dict[str, str], log: str, after: list[str]) -> str:
    """A bash script: the setup block, the serve block in the background (its output to ``log``), a bounded
    wait for /health that stops early if the server exits, then the ``after`` lines."""
    return "\n".join([
        "set -eo pipefail",
        blocks["setup"],
        # the serve block is one command: send its output to the log and run it in the background
        blocks["serve"].rstrip() + f' > "{log}" 2>&1 &',
        "server=$!",
        f"for _ in $(seq {STARTUP_S}); do",
        f"  curl -sf localhost:{PORT}/health >/dev/null && break",
        '  kill -0 "$server" 2>/dev/null || { echo "the server exited" >&2; exit 3; }',
        "  sleep 1",
        "done",
        *after,
    ])


def test_blocks_are_marked():
    blocks = first_hour_blocks()
    assert set(blocks) == {"setup", "serve", "client"}
    assert "source .venv/bin/activate" in blocks["setup"]
    serve = blocks["serve"].strip().splitlines()
    # one command (the test backgrounds it), with the model and pattern the setup block builds
    assert serve[0].startswith("rlkv serve ") and all(line.endswith("\\") for line in serve[:-1])
    assert ".cache/rlkv-tiny/rlkv_pattern.json" in blocks["serve"] and "--port" not in blocks["serve"]
    assert f"localhost:{PORT}/" in blocks["client"]


def test_failure_reason_finds_the_cause():
    """What the demo prints when its server does not start: the root cause, not the last line."""
    log = "\n".join([
        "(APIServer pid=1) WARNING x [system_utils.py:255] fd limit errors like `OSError: [Errno 24]`",
        "(VllmWorker-0 pid=2) ERROR x [multiproc_executor.py:953] ValueError: Available memory on node 0",
        "(EngineCore pid=3) ERROR x [core.py:1510] RuntimeError: Engine core initialization failed.",
    ])
    assert failure_reason(log) == "ValueError: Available memory on node 0"
    assert failure_reason("noise\nrlkv: error: rlkv.sparsity = 2 is not allowed\nmore") == (
        "rlkv: error: rlkv.sparsity = 2 is not allowed")


def _port_taken(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def _fresh_env() -> dict[str, str]:
    """The caller's environment as a new user's shell has it: no rlkv on PATH, no test-only
    vLLM settings (conftest runs engines in-process; users run the default multi-process one)."""
    env = dict(os.environ)
    for key in ("VLLM_ENABLE_V1_MULTIPROCESSING", "VIRTUAL_ENV", "LD_PRELOAD", "VLLM_CPU_KVCACHE_SPACE"):
        env.pop(key, None)
    path = env.get("PATH", "").split(os.pathsep)
    env["PATH"] = os.pathsep.join(d for d in path if d and not os.path.exists(os.path.join(d, "rlkv")))
    return env


def _stop_group(pgid: int, timeout: float = 60) -> None:
    """Stop the script's whole process group (bash, the server, vLLM's engine processes)."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            return
        deadline = time.time() + timeout
        while time.time() < deadline:
            try:
                os.killpg(pgid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.5)


@pytest.mark.slow
def test_first_hour_commands_as_printed(tmp_path):
    if not os.path.isdir(os.path.join(ROOT, ".venv")):
        pytest.skip("no .venv at the repo root: scripts/setup.sh (or scripts/test.sh) creates it")
    if shutil.which("curl") is None:
        pytest.skip("no curl on this machine: the README's client line is a curl call")
    if _port_taken(PORT):
        pytest.skip(f"port {PORT} is taken on this machine; the README's curl line needs it")
    blocks = first_hour_blocks()
    log, answer = str(tmp_path / "server.log"), str(tmp_path / "answer.json")
    script = _serve_then(blocks, log, [
        f"curl -sf localhost:{PORT}/health >/dev/null || {{ echo 'no /health in {STARTUP_S}s' >&2; exit 4; }}",
        blocks["client"].rstrip() + f' > "{answer}"',
    ])
    t0 = time.time()
    proc = subprocess.Popen(["bash", "-c", script], cwd=ROOT, env=_fresh_env(), start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        out, _ = proc.communicate(timeout=STARTUP_S + 180)
    except subprocess.TimeoutExpired:
        out = "(timed out)"
    finally:
        _stop_group(proc.pid)
    server_log = open(log, errors="replace").read() if os.path.exists(log) else ""
    where = f"script output:\n{out[-3000:]}\nserver log {log}, cause: {failure_reason(server_log)}"
    assert proc.returncode == 0, where
    reply = json.load(open(answer))
    choice = reply["choices"][0]
    assert isinstance(choice["text"], str) and reply["usage"]["completion_tokens"] > 0, reply
    # the plugin's start-up summary reaches the server log, budget line first on CPU
    lines = [line for line in server_log.splitlines() if "RLKV" in line]
    for piece in ("RLKV serve (.cache/rlkv-tiny): sparsity 0.5 (effective 0.5)", "RLKV KV budget",
                  "RLKV kernels:"):
        assert any(piece in line for line in lines), (piece, lines)
    from rlkv_vllm.compat import is_cpu_platform

    if is_cpu_platform():
        picked = [line for line in lines if "no KV budget set on CPU" in line]
        assert len(picked) == 1 and "enough for 16 requests x 2048 tokens" in picked[0], lines
    print(f"README first hour: {time.time() - t0:.0f}s")


@pytest.mark.slow
def test_quickstart_as_printed():
    """The README's first command: set up (idempotent here), serve the planted-recall model with RLKV at
    s=0.5 and with stock vLLM, the same question to both: both answer it right (the number sits beyond a
    streaming head's window), and RLKV holds more KV tokens in the same budget."""
    if not os.path.isdir(os.path.join(ROOT, ".venv")):
        pytest.skip("no .venv at the repo root: scripts/setup.sh (or scripts/test.sh) creates it")
    text = open(README, encoding="utf-8").read()
    assert "bash scripts/quickstart.sh" in text.split("```")[1]  # the README's first block
    proc = subprocess.run(["bash", "scripts/quickstart.sh"], cwd=ROOT, env=_fresh_env(), capture_output=True,
                          text=True, timeout=900)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    log = re.search(r"log: (\S+)", out)
    assert log and os.path.isfile(log.group(1)), "the demo prints where its server log is"
    gain = re.search(r"KV capacity gain over stock vLLM: ([0-9.]+)x", out)
    assert gain and float(gain.group(1)) > 1.5, out[-2000:]  # sparsity 0.5: about 1.9x
    assert re.search(r"^RLKV   : '38' ", out, re.M) and re.search(r"^stock  : '38' ", out, re.M), out[-2000:]
    assert "correct: RLKV and stock (the answer is 38)" in out


@pytest.mark.slow
def test_train_commands_as_printed(tmp_path):
    """The README's training block: `rlkv train` on the tiny model writes a pattern `rlkv pattern` reads."""
    if not os.path.isdir(os.path.join(ROOT, ".venv")):
        pytest.skip("no .venv at the repo root: scripts/setup.sh (or scripts/test.sh) creates it")
    text = open(README, encoding="utf-8").read()
    block = re.search(r"<!-- readme-command: train -->\s*```bash\n(.*?)```", text, flags=re.S).group(1)
    assert "rlkv train --config trainer/configs/tiny.yaml --out runs/tiny" in block
    runs = os.path.join(ROOT, "runs", "tiny")
    shutil.rmtree(runs, ignore_errors=True)
    script = "set -eo pipefail\nsource .venv/bin/activate\nsource scripts/env.sh\n" + block
    proc = subprocess.run(["bash", "-c", script], cwd=ROOT, env=_fresh_env(), capture_output=True, text=True,
                          timeout=900)
    try:
        assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
        assert "wrote" in proc.stderr and os.path.isfile(os.path.join(runs, "pattern.json"))
        assert "sparsity 0.5" in proc.stdout and "full" in proc.stdout
    finally:
        shutil.rmtree(runs, ignore_errors=True)


@pytest.mark.slow
def test_eval_command_as_printed(tmp_path):
    """The README's `rlkv eval` block, as printed, against the first-hour server (setup and serve blocks)."""
    if not os.path.isdir(os.path.join(ROOT, ".venv")):
        pytest.skip("no .venv at the repo root: scripts/setup.sh (or scripts/test.sh) creates it")
    if shutil.which("curl") is None:
        pytest.skip("no curl on this machine: the wait for the server uses it")
    if _port_taken(PORT):
        pytest.skip(f"port {PORT} is taken on this machine; the README's eval command needs it")
    text = open(README, encoding="utf-8").read()
    block = re.search(r"<!-- readme-command: eval -->\s*```bash\n(.*?)```", text, flags=re.S).group(1)
    assert f"--base-url http://localhost:{PORT}/v1 --model tiny" in block and "../shared/data/eval/" in block
    out = os.path.join(ROOT, re.search(r"--out (\S+)", block).group(1))
    for path in (out, out[:-5] + ".cache.jsonl"):
        if os.path.exists(path):
            os.remove(path)
    blocks = first_hour_blocks()
    log = str(tmp_path / "server.log")
    script = _serve_then(blocks, log, [block.rstrip()])
    proc = subprocess.Popen(["bash", "-c", script], cwd=ROOT, env=_fresh_env(), start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        printed, _ = proc.communicate(timeout=STARTUP_S + 300)
    except subprocess.TimeoutExpired:
        printed = "(timed out)"
    finally:
        _stop_group(proc.pid)
    server_log = open(log, errors="replace").read() if os.path.exists(log) else ""
    try:
        assert proc.returncode == 0, f"{printed[-3000:]}\nserver: {failure_reason(server_log)}"
        table = [line for line in printed.splitlines() if line.split()[:2] == ["gsm8k", "tiny"]]
        assert table and table[0].split()[:4] == ["gsm8k", "tiny", "8", "1"], printed[-2000:]
        doc = json.load(open(out))
        assert doc["summary"]["items"] == 8 and doc["requests"]["sent"] == 8
        assert all(len(item["samples"]) == 1 for item in doc["items"])
    finally:
        for path in (out, out[:-5] + ".cache.jsonl"):
            if os.path.exists(path):
                os.remove(path)
