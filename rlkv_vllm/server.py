"""Start and stop an OpenAI-compatible vLLM server in a subprocess (demo, tests, benchmarks)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from typing import Any


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class ServerProcess:
    """A running ``rlkv serve`` (== ``vllm serve``) subprocess."""

    port: int
    proc: subprocess.Popen
    log_path: str
    args: list[str] = field(default_factory=list)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def get(self, path: str, timeout: float = 10) -> str:
        with urllib.request.urlopen(self.base_url + path, timeout=timeout) as r:
            return r.read().decode()

    def log(self) -> str:
        with open(self.log_path, errors="replace") as f:
            return f.read()

    def stop(self, timeout: float = 30) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def __enter__(self) -> "ServerProcess":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()


def start_server(
    model: str,
    *,
    rlkv: dict[str, Any] | None,
    extra_args: list[str] | None = None,
    log_path: str | None = None,
    startup_timeout: float = 300,
    env: dict[str, str] | None = None,
) -> ServerProcess:
    """Start ``vllm serve model`` (with RLKV if ``rlkv`` settings are given) and wait for /health."""
    port = free_port()
    args = [model, "--host", "127.0.0.1", "--port", str(port), "--served-model-name", "tiny"]
    if rlkv is not None:
        from .compat import backend_flag

        args += ["--attention-backend", backend_flag(), "--additional-config", json.dumps({"rlkv": rlkv})]
    args += list(extra_args or [])
    if log_path is None:
        fd, log_path = __import__("tempfile").mkstemp(prefix="rlkv-server-", suffix=".log")
        os.close(fd)
    log = open(log_path, "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "rlkv_vllm.cli", "serve", *args],
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, **(env or {})},
    )
    server = ServerProcess(port=port, proc=proc, log_path=log_path, args=args)
    deadline = time.time() + startup_timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} (log: {log_path}):\n{server.log()[-4000:]}")
        try:
            server.get("/health", timeout=2)
            return server
        except OSError:
            time.sleep(0.5)
    server.stop()
    raise TimeoutError(f"server did not start in {startup_timeout}s (log: {log_path}):\n{server.log()[-4000:]}")


def parse_prometheus(text: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    """Minimal Prometheus text parser: name -> [(labels, value)]."""
    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        head, _, value = line.rpartition(" ")
        name, labels = head, {}
        if "{" in head:
            name, _, rest = head.partition("{")
            for part in rest.rstrip("}").split('",'):
                if "=" in part:
                    k, _, v = part.partition("=")
                    labels[k.strip()] = v.strip().strip('"')
        try:
            out.setdefault(name, []).append((labels, float(value)))
        except ValueError:
            continue
    return out
