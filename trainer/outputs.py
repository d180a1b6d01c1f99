"""What a run leaves in its output folder: the pattern ``vllm serve`` loads, and two plots.

- ``pattern.json``: our pattern format (``rlkv_vllm.core.patterns.HeadPattern``): the clamped gates
  [L, H_kv] plus metadata (model id, layers, KV heads, the training window, the training config,
  the step), loadable as it is by ``vllm serve --attention-backend rlkv`` and ``rlkv serve``;
- ``gates.png``: a heatmap of the gates, layers down, KV heads across;
- ``curves.png``: reward, mean alpha and the sparsity penalty per step.
"""

from __future__ import annotations

import os
from typing import Any, Sequence

import numpy as np

from rlkv_vllm.core.patterns import HeadPattern

PATTERN_FILE = "pattern.json"
GATES_PLOT = "gates.png"
CURVES_PLOT = "curves.png"


def write_pattern(out_dir: str, gates: Any, *, model_id: str, sink: int, recent: int, step: int,
                  training_config: dict[str, Any]) -> str:
    """Write ``out_dir/pattern.json`` (gates clamped to [0, 1]); returns its path."""
    g = np.clip(np.asarray(gates, dtype=np.float32), 0.0, 1.0)
    meta = {
        "model_id": model_id,
        "num_layers": int(g.shape[0]),
        "num_kv_heads": int(g.shape[1]),
        "sink": int(sink),
        "recent": int(recent),
        "source": "rlkv train",
        "step": int(step),
        "training_config": training_config,
    }
    path = os.path.join(out_dir, PATTERN_FILE)
    tmp = path + ".tmp.json"
    HeadPattern(g, meta).save(tmp)
    os.replace(tmp, path)  # a reader never sees half a file
    return path


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_gates(out_dir: str, gates: Any, title: str = "") -> str:
    """Heatmap of [L, H_kv] gates in [0, 1]."""
    plt = _pyplot()
    g = np.asarray(gates, dtype=np.float32)
    fig, ax = plt.subplots(figsize=(max(4.0, 0.45 * g.shape[1] + 2), max(3.0, 0.22 * g.shape[0] + 1.5)))
    im = ax.imshow(g, vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto", interpolation="nearest")
    ax.set_xlabel("KV head")
    ax.set_ylabel("layer")
    ax.set_title(title or f"RLKV gates ({g.shape[0]} x {g.shape[1]}), mean {g.mean():.3f}")
    fig.colorbar(im, ax=ax, label="alpha (1 = full cache)")
    fig.tight_layout()
    path = os.path.join(out_dir, GATES_PLOT)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_curves(out_dir: str, rows: Sequence[dict[str, Any]]) -> str:
    """reward, mean alpha and penalty against step, from the run's metrics rows."""
    plt = _pyplot()
    steps = [r["step"] for r in rows]
    fig, axes = plt.subplots(3, 1, figsize=(6, 7), sharex=True)
    for ax, key, label in zip(axes, ("reward_mean", "alpha_mean", "penalty"),
                              ("mean raw reward", "mean alpha", "sparsity penalty")):
        ax.plot(steps, [r.get(key, float("nan")) for r in rows], marker="o", markersize=3)
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[-1].set_xlabel("step")
    fig.tight_layout()
    path = os.path.join(out_dir, CURVES_PLOT)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
