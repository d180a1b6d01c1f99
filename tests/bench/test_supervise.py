"""rlkv_vllm.bench.supervise: the children's environment, relaying their events, killing one that overruns."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

from rlkv_vllm.bench.progress import EventReader
from rlkv_vllm.bench.supervise import child_env, wait_relaying

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_child_imports_this_checkout() -> None:
    """The child runs ``python -m rlkv_vllm.bench``: its path must lead to the rlkv_vllm beside the parent's."""
    root = child_env()["PYTHONPATH"].split(os.pathsep)[0]
    assert os.path.isfile(os.path.join(root, "rlkv_vllm", "bench", "__main__.py")), root
    import rlkv_vllm

    assert os.path.samefile(os.path.join(root, "rlkv_vllm"), os.path.dirname(rlkv_vllm.__file__))


def _child(tmp_path: Path, body: str) -> tuple[subprocess.Popen, EventReader]:
    log = tmp_path / "log.txt"
    code = "import time\nfrom rlkv_vllm.bench.progress import emit\n" + textwrap.dedent(body)
    with log.open("w") as f:
        proc = subprocess.Popen([sys.executable, "-c", code], stdout=f, stderr=subprocess.STDOUT,
                                env={**os.environ, "PYTHONPATH": ROOT}, start_new_session=True)
    return proc, EventReader(str(log))


def test_events_are_relayed_while_the_child_runs(tmp_path: Path) -> None:
    proc, reader = _child(tmp_path, """
        print("INFO vLLM says something", flush=True)
        emit("engine_start", engine_start_s=1.0, capacity_tokens=64)
        time.sleep(2.5)
        emit("progress", done=1, total=1, tokens=8, elapsed_s=2.5, running=None)
    """)
    got: list[tuple[float, dict[str, Any]]] = []
    rc = wait_relaying(proc, reader, time.time() + 60, lambda ev: got.append((time.time(), ev)))
    assert rc == 0
    assert [ev["event"] for _, ev in got] == ["engine_start", "progress"]
    # the first event came out while the child was still sleeping, not when it exited
    assert got[1][0] - got[0][0] > 1.0


def test_a_child_past_its_end_is_killed(tmp_path: Path) -> None:
    proc, reader = _child(tmp_path, """
        emit("engine_start", engine_start_s=0.1, capacity_tokens=64)
        time.sleep(600)
    """)
    got: list[dict[str, Any]] = []
    t0 = time.time()
    assert wait_relaying(proc, reader, t0 + 3, got.append) is None
    assert time.time() - t0 < 10 and proc.returncode is not None
    assert [ev["event"] for ev in got] == ["engine_start"]


def test_the_parent_side_imports_neither_vllm_nor_torch() -> None:
    """Only the child pays for vLLM and torch: a bad argument is refused before either is imported."""
    code = ("import sys\nimport rlkv_vllm.bench.study, rlkv_vllm.bench.driver, rlkv_vllm.cli\n"
            "print([m for m in sys.modules if m.split('.')[0] in ('vllm', 'torch')])")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "PYTHONPATH": ROOT})
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip() == "[]"
