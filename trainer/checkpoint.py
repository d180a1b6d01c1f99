"""Checkpoints that let ``--resume`` continue a run exactly.

A checkpoint holds everything the next step depends on: alpha, the optimiser state, the data
position, the step and gate version, and every RNG (Python, numpy, torch). It is written to a
temporary file and renamed, so a run killed mid-write leaves the previous checkpoint intact.
``DIR/checkpoints/step-N.pt``; the newest is what ``--resume`` loads.
"""

from __future__ import annotations

import os
import random
import re
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

SUBDIR = "checkpoints"
_NAME = re.compile(r"^step-(\d+)\.pt$")


@dataclass
class TrainState:
    """step: steps completed; gate_version: the version the workers hold (= step in sync mode)."""

    step: int
    gate_version: int
    alpha: torch.Tensor
    optimizer: dict[str, Any]
    data: dict[str, Any]
    rng: dict[str, Any]


def capture_rng() -> dict[str, Any]:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def restore_rng(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])


def save(out_dir: str, state: TrainState, keep: int = 2) -> str:
    """Write ``step-N.pt`` atomically; keep the newest ``keep`` checkpoints."""
    folder = os.path.join(out_dir, SUBDIR)
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, f"step-{state.step}.pt")
    tmp = path + ".tmp"
    torch.save({"step": state.step, "gate_version": state.gate_version, "alpha": state.alpha.detach().cpu(),
                "optimizer": state.optimizer, "data": state.data, "rng": state.rng}, tmp)
    os.replace(tmp, path)
    for old in sorted(steps_saved(out_dir))[:-keep]:
        os.remove(os.path.join(folder, f"step-{old}.pt"))
    return path


def steps_saved(out_dir: str) -> list[int]:
    folder = os.path.join(out_dir, SUBDIR)
    if not os.path.isdir(folder):
        return []
    return sorted(int(m.group(1)) for f in os.listdir(folder) if (m := _NAME.match(f)))


def load_latest(out_dir: str) -> TrainState | None:
    """The newest checkpoint under ``out_dir`` (None if there is none)."""
    steps = steps_saved(out_dir)
    if not steps:
        return None
    raw = torch.load(os.path.join(out_dir, SUBDIR, f"step-{steps[-1]}.pt"), weights_only=False)
    return TrainState(step=raw["step"], gate_version=raw["gate_version"], alpha=raw["alpha"],
                      optimizer=raw["optimizer"], data=raw["data"], rng=raw["rng"])
