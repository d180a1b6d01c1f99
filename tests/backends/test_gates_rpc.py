"""Gates pushed to an engine core in its own process (vLLM's default, what the trainer runs):
nested lists, numpy and torch arrive (on its own, msgspec would turn an array into a (dtype, shape,
data) triple the executor cannot forward: compat sends gate grids as nested lists), and the checksum
the worker returns equals the one the sender computes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rlkv_vllm.core.gates import checked_gates, gate_rows, gates_checksum
from tests.engine_utils import engine, random_gates, write_pattern

pytestmark = pytest.mark.slow


def test_set_gates_with_the_engine_core_out_of_process(tiny_model, tmp_path, monkeypatch):
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "1")
    pattern = write_pattern(str(tmp_path / "p.json"), random_gates(4, 4, seed=1))
    alpha = random_gates(4, 4, seed=5)
    with engine(tiny_model, {"heads": pattern, "mode": "gated", "sink": 4, "recent": 8}) as llm:
        assert llm.llm_engine.vllm_config.parallel_config.worker_extension_cls  # the RPCs are there
        want = gates_checksum(checked_gates(alpha, 4, 4))
        for value in (gate_rows(alpha), alpha, torch.tensor(alpha), alpha.tolist()):
            llm.collective_rpc("rlkv_set_gates", args=(np.zeros((4, 4)).tolist(),))
            assert llm.collective_rpc("rlkv_set_gates", args=(value,))[0] == pytest.approx(want, abs=1e-9)
            np.testing.assert_allclose(np.array(llm.collective_rpc("rlkv_get_gates")[0]), alpha, atol=1e-7)
        # an array over vLLM's inline threshold (1 KiB) arrives too, and is refused for its shape
        with pytest.raises(Exception, match="shape 4 x 4 .* got 16 x 16"):
            llm.collective_rpc("rlkv_set_gates", args=(np.ones((16, 16), dtype=np.float32),))
        with pytest.raises(Exception, match="shape 4 x 4"):
            llm.collective_rpc("rlkv_set_gates", args=(np.ones((3, 4)).tolist(),))
        # the engine still serves after the refused pushes
        assert llm.collective_rpc("rlkv_gates_checksum")[0] == pytest.approx(want, abs=1e-9)
