"""Shared fixtures. Engines run in-process (fast); server tests start real servers."""

from __future__ import annotations

import os

# in-process engine core for LLM(...) tests; must be set before vLLM is imported
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest

from tests.engine_utils import MODEL_CACHE, tiny_model_dir


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs CUDA (skipped without it)")
    config.addinivalue_line("markers", "slow: end-to-end engine or server test")


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
