"""rlkv_trainer.sandbox and the MBPP grader against hostile code: a fork bomb, a write outside the temporary
directory, a network connect, an infinite loop, a memory hog, and reading the grader's environment. Each is
contained (the host sees no effect, nothing is left running) and reported in the verdict."""

from __future__ import annotations

import os
import socket
import threading
import time
from typing import Iterator

import pytest

from rlkv_trainer import sandbox as sb
from rlkv_trainer.grading import ERROR, OK, TIMEOUT, GradeItem, Grader, mbpp_test_program

pytestmark = pytest.mark.timeout(180)
SECRET = "rlkv-grader-secret-4f1c"
LIMITS = sb.SandboxLimits(timeout_s=2.0)
TESTS = mbpp_test_program(["assert f(1) == 1"])


def _best_mode() -> str:
    try:
        return sb.resolve_mode("auto")
    except sb.SandboxError as e:
        pytest.skip(f"no sandbox here: {e}")


@pytest.fixture(scope="module")
def listener() -> Iterator[tuple[int, list[str]]]:
    """A TCP server on the host's loopback that records every connection it accepts."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(8)
    srv.settimeout(0.2)
    hits: list[str] = []
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, addr = srv.accept()
            except OSError:
                continue
            hits.append(f"{addr}")
            conn.close()

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    yield srv.getsockname()[1], hits
    stop.set()
    t.join(5)
    srv.close()


def _hostile(port: int, outside: str) -> dict[str, str]:
    """name -> an MBPP answer (a fenced block) whose code misbehaves before the asserts run."""
    bodies = {
        "fork_bomb": "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass",
        "write_outside": f"open({outside!r}, 'w').write('pwned')",
        "network": f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=1).send(b'x')",
        "infinite_loop": "while True:\n    pass",
        "memory_hog": "hog = []\nwhile True:\n    hog.append(bytearray(64 << 20))",
        "read_environment": (
            "import glob, os\n"
            "seen = repr(dict(os.environ))\n"
            "for p in glob.glob('/proc/*/environ'):\n"
            "    try:\n"
            "        seen += open(p, 'rb').read().decode('latin-1')\n"
            "    except OSError:\n"
            "        pass\n"
            f"assert {SECRET!r} in seen  # passes only if the grader's environment leaked in"),
    }
    return {name: f"```python\n{body}\ndef f(x):\n    return x\n```" for name, body in bodies.items()}


@pytest.mark.parametrize("mode", ["bwrap", "unshare"])
def test_hostile_mbpp_answers_are_contained_and_reported(mode, listener, tmp_path, monkeypatch) -> None:
    try:
        sb.resolve_mode(mode)
    except sb.SandboxError as e:
        pytest.skip(str(e))
    monkeypatch.setenv(sb.ENV_VAR, mode)  # the grading workers inherit it
    port, hits = listener
    outside = str(tmp_path / "outside.txt")  # the grader's own temporary folder
    monkeypatch.setenv("RLKV_GRADER_SECRET", SECRET)  # the workers inherit it; the sandboxed code must not
    hostile = _hostile(port, outside)
    start = time.monotonic()
    with Grader(2, sandbox=LIMITS) as g:
        g.start()
        pids = set(g.worker_pids())
        verdicts = dict(zip(hostile, g.grade(GradeItem(text, TESTS, "mbpp") for text in hostile.values())))
        alive_after = set(g.worker_pids())
        fine = g.grade([GradeItem("```python\ndef f(x):\n    return x\n```", TESTS, "mbpp")])[0]
    elapsed = time.monotonic() - start
    report = {name: (v.status, v.correct, v.detail) for name, v in verdicts.items()}
    print(f"sandbox mode {mode}, {elapsed:.1f} s:", *report.items(), sep="\n  ")
    # reported: nothing passed; each verdict names the sandbox mode and what happened
    assert not any(v.correct for v in verdicts.values()), report
    assert all(f"({mode})" in v.detail for v in verdicts.values()), report
    assert verdicts["infinite_loop"].status == TIMEOUT and "process tree killed" in verdicts["infinite_loop"].detail
    assert verdicts["fork_bomb"].status == TIMEOUT or "BlockingIOError" in verdicts["fork_bomb"].detail, report
    assert verdicts["memory_hog"].status == OK and "MemoryError" in verdicts["memory_hog"].detail, report
    # contained: the host saw nothing, the grading workers survived, and the next answer grades normally
    assert not os.path.exists(outside)
    assert verdicts["network"].status == OK and any(
        e in verdicts["network"].detail for e in ("ConnectionRefused", "Network is unreachable")), report
    assert hits == [], hits
    assert verdicts["read_environment"].status == OK and "AssertionError" in verdicts["read_environment"].detail
    assert alive_after == pids  # a fork bomb or a memory hog does not take a grading worker down
    assert fine.status == OK and fine.correct, fine
    assert elapsed < 60


def test_environment_and_working_directory_inside(tmp_path, monkeypatch) -> None:
    mode = _best_mode()
    monkeypatch.setenv("RLKV_GRADER_SECRET", SECRET)
    code = ("import os, sys\nprint(sorted(os.environ))\nprint(os.getcwd())\nprint(os.listdir('.'))\n"
            "open('scratch.txt', 'w').write('ok')\nprint(os.path.exists('scratch.txt'))\nprint(sys.flags.isolated)")
    r = sb.run_python(code, LIMITS, mode=mode)
    assert r.outcome == sb.PASSED, r
    env, cwd, listing, wrote, isolated = r.stdout.splitlines()
    assert SECRET not in r.stdout and "RLKV_GRADER_SECRET" not in env
    assert set(eval(env)) <= {"PATH", "PWD", "LC_CTYPE"}  # what bwrap sets and Python adds; nothing of ours
    assert wrote == "True" and isolated == "1" and eval(listing) in ([], ["prog.py"])
    assert os.getcwd() != cwd or mode == "bwrap"
    if os.geteuid() == 0:
        assert r.uid >= 1_000_000_000 and r.uid != os.getuid()  # a fresh unprivileged uid per run


def test_fork_bomb_leaves_no_process_behind() -> None:
    mode = _best_mode()
    r = sb.run_python("import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass",
                      sb.SandboxLimits(timeout_s=1.5, max_processes=16), mode=mode)
    assert r.outcome == sb.TIMEOUT and "process tree killed" in r.summary()
    if os.geteuid() == 0:
        assert 0 < r.leftovers <= 16 + 2  # RLIMIT_NPROC held it (bwrap adds its own pid-1 and monitor)
        assert sb._tasks_of_uid(r.uid) == 0


def test_output_is_capped_and_cpu_limit_kills() -> None:
    mode = _best_mode()
    r = sb.run_python("import sys\nsys.stdout.write('y' * (1 << 20))\nsys.stdout.flush()\nraise SystemExit(3)",
                      sb.SandboxLimits(output_chars=100), mode=mode)
    assert r.outcome == sb.FAILED and r.exit_code == 3 and r.stdout == "y" * 100
    r = sb.run_python("while True:\n    pass", sb.SandboxLimits(timeout_s=10, cpu_s=1), mode=mode)
    assert r.outcome == sb.KILLED and "SIGXCPU" in r.summary() and r.seconds < 8, r.summary()
    r = sb.run_python("open('big', 'wb').write(b'x' * (8 << 20))", sb.SandboxLimits(max_file_mb=1), mode=mode)
    assert r.outcome in (sb.FAILED, sb.KILLED) and ("File too large" in r.stderr or "SIGXFSZ" in r.summary())


def test_unshare_fallback_isolates_network_and_processes(listener) -> None:
    """Where bubblewrap is missing: namespaces through util-linux unshare; the filesystem is the host's,
    seen with the fresh uid's permissions."""
    try:
        sb.resolve_mode("unshare")
    except sb.SandboxError as e:
        pytest.skip(str(e))
    port, hits = listener
    r = sb.run_python(f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=1)", LIMITS,
                      mode="unshare")
    assert r.outcome == sb.FAILED and "unreachable" in r.stderr and hits == []
    r = sb.run_python("import os\nprint(os.getpid(), len([p for p in os.listdir('/proc') if p.isdigit()]))", LIMITS,
                      mode="unshare")
    assert r.outcome == sb.PASSED and r.stdout.split()[0] == "1"  # pid 1 of its own pid namespace


def test_modes_and_errors(monkeypatch) -> None:
    monkeypatch.setenv(sb.ENV_VAR, "docker")
    with pytest.raises(sb.SandboxError, match=r"RLKV_SANDBOX='docker' is not a sandbox mode; allowed: auto, bwrap"):
        sb.resolve_mode()
    monkeypatch.setenv(sb.ENV_VAR, "rlimits")
    assert sb.resolve_mode() == "rlimits"
    info = sb.describe("rlimits")
    assert info["mode"] == "rlimits" and not info["network_isolated"] and info["limits"]["cpu_s"] == 11
    monkeypatch.delenv(sb.ENV_VAR)
    assert sb.describe()["mode"] == _best_mode()


def test_a_sandbox_that_cannot_start_is_an_error_verdict(monkeypatch) -> None:
    """A grading worker whose sandbox is unusable scores the item "error" with the reason, not a crash."""
    monkeypatch.setenv(sb.ENV_VAR, "nonsense")  # the workers inherit it
    with Grader(1) as g:
        [v] = g.grade([GradeItem("```python\ndef f(x):\n    return x\n```", TESTS, "mbpp")])
    assert v.status == ERROR and "not a sandbox mode" in v.detail
