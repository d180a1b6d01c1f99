"""The CUDA decode step (``csrc/rlkv_decode.cu``), launched through the CUDA driver API.

Same function and arguments as ``triton_stream.decode_step``. The fatbin comes from
``cuda_build.locate``; it is loaded with ``cuModuleLoadData`` into the current context
(the one PyTorch uses) and launched with ``cuLaunchKernel`` on PyTorch's current stream,
so the launch is captured by CUDA graphs like any other kernel. Nothing links against
libtorch: the package installs and imports without CUDA, and ``unavailable_reason``
says why the kernel cannot run where it cannot.
"""

from __future__ import annotations

import ctypes
import struct
import threading
from typing import Any

import torch

from . import cuda_build
from .views import LayerPools, StepRows

THREADS = 128
_DTYPES = {torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16"}
# DecodeParams in csrc/rlkv_decode.cu: 15 pointers, 26 int64, one float (padded to 8 bytes)
_PARAMS = struct.Struct("@15Q26qf4x")
_CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES = 8
_CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN = 97


class _Driver:
    """The few libcuda entry points we need, with errors turned into exceptions."""

    def __init__(self) -> None:
        self.lib = ctypes.CDLL("libcuda.so.1")
        self.lib.cuGetErrorString.argtypes = [ctypes.c_int, ctypes.POINTER(ctypes.c_char_p)]
        self.lib.cuLaunchKernel.argtypes = [
            ctypes.c_void_p, ctypes.c_uint, ctypes.c_uint, ctypes.c_uint, ctypes.c_uint, ctypes.c_uint,
            ctypes.c_uint, ctypes.c_uint, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
        ]
        self.check(self.lib.cuInit(0), "cuInit")

    def check(self, rc: int, what: str) -> None:
        if rc != 0:
            msg = ctypes.c_char_p()
            self.lib.cuGetErrorString(rc, ctypes.byref(msg))
            raise RuntimeError(f"{what} failed: CUDA error {rc} ({(msg.value or b'?').decode()})")


class _Module:
    """The decode kernels loaded into one CUDA context."""

    def __init__(self, drv: _Driver, fatbin: bytes, device: int) -> None:
        self.drv = drv
        self._image = ctypes.create_string_buffer(fatbin, len(fatbin))
        mod = ctypes.c_void_p()
        drv.check(drv.lib.cuModuleLoadData(ctypes.byref(mod), self._image), "cuModuleLoadData")
        optin = ctypes.c_int()
        drv.check(drv.lib.cuDeviceGetAttribute(ctypes.byref(optin),
                                               _CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN, device),
                  "cuDeviceGetAttribute")
        self.max_smem = int(optin.value)
        self.funcs: dict[str, ctypes.c_void_p] = {}
        for tag in _DTYPES.values():
            f = ctypes.c_void_p()
            drv.check(drv.lib.cuModuleGetFunction(ctypes.byref(f), mod, f"rlkv_decode_step_{tag}".encode()),
                      "cuModuleGetFunction")
            # set once, outside any graph capture: launches ask for what they need
            drv.check(drv.lib.cuFuncSetAttribute(f, _CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                                                 self.max_smem), "cuFuncSetAttribute")
            self.funcs[tag] = f
        self.params = ctypes.create_string_buffer(_PARAMS.size)
        self.args = (ctypes.c_void_p * 1)(ctypes.addressof(self.params))


_lock = threading.Lock()
_driver: _Driver | None = None
_modules: dict[int, _Module] = {}  # by CUcontext handle
_failure: str | None = None


def _context(drv: _Driver, device: int) -> int:
    ctx = ctypes.c_void_p()
    drv.check(drv.lib.cuCtxGetCurrent(ctypes.byref(ctx)), "cuCtxGetCurrent")
    if not ctx.value:  # no current context on this thread yet: PyTorch's is the primary one
        dev = ctypes.c_int()
        drv.check(drv.lib.cuDeviceGet(ctypes.byref(dev), device), "cuDeviceGet")
        drv.check(drv.lib.cuDevicePrimaryCtxRetain(ctypes.byref(ctx), dev), "cuDevicePrimaryCtxRetain")
        drv.check(drv.lib.cuCtxSetCurrent(ctx), "cuCtxSetCurrent")
    return int(ctx.value)


def load(device: torch.device) -> _Module:
    """The kernels for ``device``'s context (load them before any graph capture)."""
    global _driver, _failure
    with _lock:
        if _failure is not None:
            raise RuntimeError(_failure)
        try:
            if _driver is None:
                _driver = _Driver()
            idx = device.index if device.index is not None else torch.cuda.current_device()
            torch.cuda.init()
            with torch.cuda.device(idx):
                ctx = _context(_driver, idx)
                mod = _modules.get(ctx)
                if mod is None:
                    with open(cuda_build.locate("rlkv_decode"), "rb") as f:
                        mod = _modules[ctx] = _Module(_driver, f.read(), idx)
            return mod
        except (OSError, RuntimeError, cuda_build.CudaBuildError) as e:
            _failure = f"the CUDA decode kernel cannot load: {e}"
            raise RuntimeError(_failure) from None


def smem_bytes(dtype: torch.dtype, head_dim: int, group: int, window: int) -> int:
    """Dynamic shared memory of one ring block: keys (rows padded by 4 bytes, the part
    rounded up to 16 bytes), values, float32 queries and scores (as in the .cu)."""
    elt = torch.empty((), dtype=dtype).element_size()
    keys = ((window * (head_dim + 4 // elt) * elt + 15) // 16) * 16
    return keys + window * head_dim * elt + group * head_dim * 4 + group * window * 4


def shape_unsupported_reason(dtype: torch.dtype, head_dim: int, group: int, window: int,
                             max_smem: int = 227 * 1024) -> str | None:
    """Why the kernel cannot serve this model shape (None if it can)."""
    if dtype not in _DTYPES:
        return f"dtype {dtype} (the CUDA decode kernel takes float32, float16, bfloat16)"
    elt = torch.empty((), dtype=dtype).element_size()
    if head_dim % (16 // elt):
        return f"head_dim {head_dim} (must be a multiple of {16 // elt} for 16-byte loads)"
    need = smem_bytes(dtype, head_dim, group, window)
    if need > max_smem:
        return (f"window {window} x head_dim {head_dim} needs {need} bytes of shared memory a block, "
                f"over the device's {max_smem}")
    return None


def unavailable_reason(device: torch.device | str = "cuda") -> str | None:
    """Why the CUDA decode kernel cannot run on ``device`` (None if it can)."""
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return "no CUDA device"
    try:
        load(device)
    except RuntimeError as e:
        return str(e)
    return None


def _ptr(x: torch.Tensor | None) -> int:
    return 0 if x is None else int(x.data_ptr())


def _check_aligned(name: str, x: torch.Tensor, vec: int) -> None:
    if x.stride(-1) != 1 or x.data_ptr() % 16 or any(s % vec for s in x.stride()[:-1]):
        raise ValueError(f"{name} must have a contiguous head_dim, 16-byte aligned rows (strides {x.stride()})")


def decode_step(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    q_full: torch.Tensor | None,
    rows: StepRows,
    pools: LayerPools,
    scale: float,
) -> None:
    """``triton_stream.decode_step`` in CUDA (same arguments, shapes and contract)."""
    num_tokens, num_q_heads, head_dim = q.shape
    num_paged, num_ring = pools.num_paged, pools.num_ring
    if num_tokens == 0 or num_paged + num_ring == 0:
        return
    mod = load(q.device)
    tag = _DTYPES.get(q.dtype)
    group = num_q_heads // k.shape[1]
    sink, recent = pools.sink, pools.recent
    reason = shape_unsupported_reason(q.dtype, head_dim, group, pools.window, mod.max_smem)
    if reason is not None:
        raise ValueError(f"CUDA decode step: {reason}")
    kc = pools.key_cache if num_paged else None
    vc = pools.value_cache if num_paged else None
    rk = pools.ring_k if num_ring else None
    rv = pools.ring_v if num_ring else None
    slot_mapping = rows.slot_mapping if num_paged else None
    vec = 16 // q.element_size()
    for name, x in (("q", q), ("k", k), ("v", v), ("out", out), ("key_cache", kc), ("value_cache", vc),
                    ("q_full", q_full), ("ring_k", rk), ("ring_v", rv)):
        if x is not None:
            if x.dtype != q.dtype:
                raise ValueError(f"{name} is {x.dtype}, q is {q.dtype}: the CUDA decode step takes one dtype")
            _check_aligned(name, x, 1 if name == "out" else vec)
    if num_paged:
        assert kc is not None and vc is not None and slot_mapping is not None and pools.paged_src is not None
        assert slot_mapping.dtype == torch.int64 and pools.paged_src.dtype == torch.int32
    if num_ring:
        assert rk is not None and rv is not None and pools.ring_src is not None
        assert rk.stride() == rv.stride() and pools.ring_src.dtype == torch.int32
    for name, x in (("query_start_loc", rows.query_start_loc), ("seq_lens", rows.seq_lens),
                    ("slot_ids", rows.slot_ids)):
        if x.dtype != torch.int32:
            raise ValueError(f"{name} must be int32, got {x.dtype}")

    def strides(x: torch.Tensor | None, n: int) -> list[int]:
        return list(x.stride()[:n]) if x is not None else [0] * n

    _PARAMS.pack_into(
        mod.params, 0,
        _ptr(q), _ptr(k), _ptr(v), _ptr(out), _ptr(kc), _ptr(vc),
        _ptr(slot_mapping), _ptr(pools.paged_src if num_paged else None), _ptr(q_full),
        _ptr(rk), _ptr(rv), _ptr(pools.ring_src if num_ring else None),
        _ptr(rows.query_start_loc), _ptr(rows.seq_lens), _ptr(rows.slot_ids),
        *strides(q, 2), *strides(k, 2), *strides(v, 2), *strides(out, 2),
        *strides(kc, 3), *strides(vc, 3), *strides(q_full, 2), *strides(rk, 2),
        kc.shape[1] if kc is not None else 1, num_paged, num_ring, rows.num_rows, group, sink, recent,
        head_dim, float(scale),
    )
    smem = smem_bytes(q.dtype, head_dim, group, pools.window) if num_ring else 0
    stream = torch.cuda.current_stream(q.device).cuda_stream
    drv: Any = mod.drv
    drv.check(drv.lib.cuLaunchKernel(mod.funcs[tag], num_tokens, num_paged + num_ring, 1, THREADS, 1, 1,
                                     smem, stream, mod.args, None), "cuLaunchKernel")
