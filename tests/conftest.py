"""Shared fixtures. Engines run in-process (fast); server tests start real servers."""

from __future__ import annotations

import os

# in-process engine core for LLM(...) tests; must be set before vLLM is imported
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _import_triton_language_for_interpreter() -> None:
    """Without CUDA, the kernel tests run under Triton's interpreter, which only works with
    library functions (tl.zeros, tl.max, ...) decorated while TRITON_INTERPRET=1 was set, and
    they are decorated once, when triton.language is first imported (by vLLM, at collection).
    So import it here first, under the flag, and restore the environment for everything else."""
    import importlib.util

    import torch

    if torch.cuda.is_available() or importlib.util.find_spec("triton") is None:
        return
    before = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        import triton.language  # noqa: F401
    finally:
        if before is None:
            os.environ.pop("TRITON_INTERPRET")
        else:
            os.environ["TRITON_INTERPRET"] = before


_import_triton_language_for_interpreter()

import pytest

from tests.engine_utils import MODEL_CACHE, tiny_model_dir


def _share_cpu_threads_among_workers() -> None:
    """Under pytest-xdist every worker's torch would use all cores (the oracle's float64
    attention and the transformers reference run on the CPU), so N workers oversubscribe the
    machine N-fold (the likely cause of the 400 s timeouts of eight parallel engine tests on
    the 16-core GPU machine)."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0") or 0)
    if workers <= 1:
        return
    import torch

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    torch.set_num_threads(max(1, cores // workers))


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs CUDA (skipped without it)")
    config.addinivalue_line("markers", "slow: end-to-end engine or server test")
    _share_cpu_threads_among_workers()


def pytest_collection_modifyitems(config, items):
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except Exception:
        has_cuda = False
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords and not has_cuda:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_model() -> str:
    """The default tiny model: 4 layers, 8 query / 4 KV heads, head_dim 32, fp32."""
    return tiny_model_dir()


@pytest.fixture(scope="session")
def model_cache() -> str:
    return MODEL_CACHE
