"""Gates in every form a sender may pass, and the one-line errors for the rest."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rlkv_vllm.core.gates import GateError, as_gate_array, checked_gates, gate_rows, gates_checksum


def test_rows_from_every_input():
    g = np.random.default_rng(0).uniform(size=(3, 2)).astype(np.float32)
    want = g.astype(np.float64).tolist()
    for value in (g, torch.tensor(g), g.tolist(), tuple(map(tuple, g.tolist()))):
        rows = gate_rows(value)
        assert rows == want and all(type(x) is float for row in rows for x in row)


def test_vllm_msgpack_triple():
    """vLLM sends a small array inline as (dtype, shape, bytes), a tensor's dtype without '<'."""
    g = np.arange(6, dtype=np.float32).reshape(2, 3) / 10
    np.testing.assert_array_equal(as_gate_array([g.dtype.str, [2, 3], g.tobytes()]), g)
    np.testing.assert_array_equal(as_gate_array(("float32", (2, 3), memoryview(g.tobytes()))), g)
    with pytest.raises(GateError, match=r"out of band .* send nested lists \(rlkv_vllm.core.gates.gate_rows"):
        as_gate_array(["<f4", [32, 8], 0])  # a larger array: only a buffer index arrives


def test_checked_gates_and_checksum():
    g = checked_gates([[1.5, -0.2], [0.25, 0.5]], 2, 2)
    assert g.dtype == np.float32 and g.tolist() == [[1.0, 0.0], [0.25, 0.5]]
    assert gates_checksum(g) == 1.75
    with pytest.raises(GateError, match="shape 2 x 2 .* got 3 x 2"):
        checked_gates(np.ones((3, 2)), 2, 2)
    with pytest.raises(GateError, match="NaN or inf"):
        checked_gates([[float("nan"), 0.0], [0.0, 0.0]], 2, 2)
    with pytest.raises(GateError, match="grid of numbers"):
        checked_gates([[1.0, 2.0], [3.0]], 2, 2)
    for bad in (GateError("x"),):
        assert "\n" not in str(bad)
