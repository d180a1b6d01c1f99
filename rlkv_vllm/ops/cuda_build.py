"""Build the CUDA kernels of ``csrc/`` into fatbins (no torch import: setup.py runs this too).

A kernel source is compiled with nvcc to a fatbin holding machine code for the Ampere and
Hopper data-centre parts plus PTX for newer chips; ``cuda_decode`` loads it through the
CUDA driver API, so nothing here links against libtorch or the CUDA runtime.

Where a fatbin comes from, first hit wins:
1. ``rlkv_vllm/_cuda/<name>-<hash>.fatbin``, built by ``setup.py`` where nvcc exists;
2. the cache, ``$RLKV_CUDA_CACHE`` or ``~/.cache/rlkv_vllm/cuda``;
3. a build into that cache, if nvcc is found (``$RLKV_NVCC``, ``$CUDA_HOME/bin``, PATH).
The hash covers the source and the nvcc flags, so an edited kernel is never served stale.

  python -m rlkv_vllm.ops.cuda_build [OUT_DIR]     # build every kernel (default: the cache)
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile

KERNELS = ("rlkv_decode",)
# sm_80 (A100), sm_90 (H100/H200) machine code, PTX of compute_90 for later chips
GENCODE = (
    "-gencode=arch=compute_80,code=sm_80",
    "-gencode=arch=compute_90,code=sm_90",
    "-gencode=arch=compute_90,code=compute_90",
)
NVCC_FLAGS = ("--fatbin", "-O3", "-std=c++17", *GENCODE)

PKG_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PREBUILT_DIR = os.path.join(PKG_DIR, "_cuda")
REPO_CSRC = os.path.join(os.path.dirname(PKG_DIR), "csrc")


class CudaBuildError(RuntimeError):
    """No fatbin could be found or built; the message says why, on one line."""


def cache_dir() -> str:
    return os.environ.get("RLKV_CUDA_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "rlkv_vllm", "cuda")


def find_nvcc() -> str | None:
    for cand in (os.environ.get("RLKV_NVCC"),
                 os.path.join(os.environ.get("CUDA_HOME", ""), "bin", "nvcc") if os.environ.get("CUDA_HOME") else None,
                 shutil.which("nvcc"), "/usr/local/cuda/bin/nvcc"):
        if cand and os.path.isfile(cand) and os.access(cand, os.X_OK):
            return cand
    return None


def source_path(name: str) -> str | None:
    """The kernel's .cu: shipped in the package (wheels) or in the checkout's csrc/."""
    for d in (PREBUILT_DIR, REPO_CSRC):
        p = os.path.join(d, f"{name}.cu")
        if os.path.isfile(p):
            return p
    return None


def source_hash(src: str) -> str:
    h = hashlib.sha1()
    with open(src, "rb") as f:
        h.update(f.read())
    h.update(" ".join(NVCC_FLAGS).encode())
    return h.hexdigest()[:16]


def fatbin_name(name: str, src: str) -> str:
    return f"{name}-{source_hash(src)}.fatbin"


def build(name: str, out_dir: str, nvcc: str | None = None) -> str:
    """Compile csrc/<name>.cu to <out_dir>/<name>-<hash>.fatbin (atomically); return its path."""
    src = source_path(name)
    if src is None:
        raise CudaBuildError(f"no source for CUDA kernel {name!r} (looked in {PREBUILT_DIR} and {REPO_CSRC})")
    nvcc = nvcc or find_nvcc()
    if nvcc is None:
        raise CudaBuildError("nvcc not found (set RLKV_NVCC or CUDA_HOME, or put nvcc on PATH)")
    os.makedirs(out_dir, exist_ok=True)
    out = os.path.join(out_dir, fatbin_name(name, src))
    fd, tmp = tempfile.mkstemp(suffix=".fatbin", dir=out_dir)
    os.close(fd)
    cmd = [nvcc, *NVCC_FLAGS, "-o", tmp, src]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        os.unlink(tmp)
        last = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["(no output)"]
        raise CudaBuildError(f"nvcc failed on {src}: {last[0]}")
    os.chmod(tmp, 0o644)
    os.replace(tmp, out)
    return out


def locate(name: str, allow_build: bool = True) -> str:
    """Path of a current fatbin for kernel ``name``; builds it into the cache if needed."""
    src = source_path(name)
    if src is None:
        raise CudaBuildError(f"no source for CUDA kernel {name!r} (looked in {PREBUILT_DIR} and {REPO_CSRC})")
    fname = fatbin_name(name, src)
    for d in (PREBUILT_DIR, cache_dir()):
        p = os.path.join(d, fname)
        if os.path.isfile(p):
            return p
    if not allow_build:
        raise CudaBuildError(f"no built {fname} in {PREBUILT_DIR} or {cache_dir()}")
    return build(name, cache_dir())


def main(argv: list[str]) -> int:
    out_dir = argv[0] if argv else cache_dir()
    try:
        for name in KERNELS:
            print(build(name, out_dir))
    except CudaBuildError as e:
        print(f"cuda_build: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
