"""Gate values as they travel: from the trainer to every rollout worker, and back as a checksum.

``LLM.collective_rpc("rlkv_set_gates", args=(gates,))`` crosses to an out-of-process engine core
through msgspec. Nested lists arrive intact; a numpy array or torch tensor arrives as vLLM's
msgpack triple ``(dtype, shape, data)``, where ``data`` is the raw bytes for a small array but only
an index into buffers that are gone by the time the RPC runs for a larger one (over vLLM's 256-byte
zero-copy threshold: a 32 x 8 float32 grid already is). So senders use ``gate_rows`` (nested Python
floats, any input), and the receiver decodes what can be decoded and names the fix otherwise.
"""

from __future__ import annotations

from typing import Any

import numpy as np


class GateError(ValueError):
    """Gates that cannot be used. The message is one line."""


def _from_msgpack_triple(value: Any) -> np.ndarray | None:
    """vLLM's encoding of an ndarray / tensor, ``(dtype, shape, data)``; None if ``value`` is not one."""
    if not (isinstance(value, (list, tuple)) and len(value) == 3 and isinstance(value[0], str)):
        return None
    dtype, shape, data = value
    if isinstance(data, int):
        raise GateError(
            "gates arrived as a numpy array or tensor encoded by vLLM's msgpack out of band (dtype "
            f"{dtype}, shape {list(shape)}): its buffer does not reach the worker; send nested lists "
            "(rlkv_vllm.core.gates.gate_rows(gates))"
        )
    name = dtype if dtype.startswith(("<", ">", "|", "=")) else {"bfloat16": "float32"}.get(dtype, dtype)
    if dtype == "bfloat16":
        raise GateError("gates arrived as a bfloat16 tensor: send float32 or nested lists (gate_rows)")
    return np.frombuffer(bytes(data), dtype=np.dtype(name)).reshape([int(s) for s in shape])


def as_gate_array(gates: Any) -> np.ndarray:
    """float64 array of any gate input: numpy, torch (any device), nested lists, vLLM's msgpack triple."""
    if hasattr(gates, "detach") and hasattr(gates, "cpu"):  # a torch tensor, without importing torch
        gates = gates.detach().float().cpu().numpy()
    decoded = _from_msgpack_triple(gates)
    if decoded is not None:
        gates = decoded
    try:
        return np.asarray(gates, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise GateError(f"gates must be an L x H_kv grid of numbers: {' '.join(str(e).split())}") from None


def gate_rows(gates: Any) -> list[list[float]]:
    """Gates as nested Python floats: what crosses ``collective_rpc`` intact (any input)."""
    arr = as_gate_array(gates)
    if arr.ndim != 2:
        raise GateError(f"gates must be a 2-D L x H_kv grid, got shape {list(arr.shape)}")
    return [[float(x) for x in row] for row in arr]


def checked_gates(gates: Any, num_layers: int, num_kv_heads: int) -> np.ndarray:
    """float32 [L, H_kv] gates clipped to [0, 1], after checking the shape and that every value is finite."""
    arr = as_gate_array(gates)
    if arr.shape != (num_layers, num_kv_heads):
        raise GateError(f"gates must have shape {num_layers} x {num_kv_heads} (layers x KV heads), "
                        f"got {' x '.join(map(str, arr.shape)) or 'a scalar'}")
    if not np.all(np.isfinite(arr)):
        raise GateError("gates hold NaN or inf")
    return np.clip(arr, 0.0, 1.0).astype(np.float32)


def gates_checksum(gates: np.ndarray) -> float:
    """What a worker reports back after ``rlkv_set_gates``: the float64 sum of its float32 gates.
    The trainer computes it on the same clipped float32 grid (per rank with tensor parallelism)."""
    return float(np.asarray(gates, dtype=np.float32).astype(np.float64).sum())
