"""Per-step metrics: ``DIR/metrics.csv`` and TensorBoard (``DIR/tensorboard``), plus a progress line.

Every step logs the same columns, among them the sampler-learner gap (``logprob_diff_max``,
``logprob_diff_mean``: |vLLM's log-prob - the learner's| over the step's tokens, before the update)
and the share of tokens the ratio threshold masked. A resumed run drops the rows past the step it
resumes from, so the file always describes one history.
"""

from __future__ import annotations

import csv
import math
import os
import sys
from typing import Any, TextIO

METRICS_FILE = "metrics.csv"
# the progress line's fields: (column, label, format)
PROGRESS = (("reward_mean", "reward", ".3f"), ("alpha_mean", "alpha", ".3f"), ("penalty", "penalty", ".2e"),
            ("rollout_tok_s", "rollout tok/s", ",.0f"), ("logprob_diff_max", "lp diff", ".1e"))


class RunLog:
    """Append-only metrics of one run (columns fixed by the first row written)."""

    def __init__(self, out_dir: str, *, resume_after: int | None = None, tensorboard: bool = True,
                 stream: TextIO | None = None) -> None:
        os.makedirs(out_dir, exist_ok=True)
        self.path = os.path.join(out_dir, METRICS_FILE)
        self.rows: list[dict[str, Any]] = []
        self.columns: list[str] | None = None
        self.stream = stream or sys.stderr
        if resume_after is not None and os.path.exists(self.path):
            with open(self.path, newline="") as f:
                kept = [r for r in csv.DictReader(f) if int(r["step"]) <= resume_after]
            self.rows = [{k: _number(v) for k, v in r.items()} for r in kept]
            self.columns = list(kept[0].keys()) if kept else None
            self._rewrite()
        elif os.path.exists(self.path):
            os.remove(self.path)
        self.writer = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(os.path.join(out_dir, "tensorboard"))
            except ImportError:  # the [train] extra brings tensorboard; without it the CSV still works
                self.writer = None

    def _rewrite(self) -> None:
        with open(self.path, "w", newline="") as f:
            if self.columns:
                w = csv.DictWriter(f, fieldnames=self.columns)
                w.writeheader()
                w.writerows(self.rows)

    def log(self, step: int, values: dict[str, Any], total_steps: int | None = None) -> None:
        row = {"step": step, **values}
        if self.columns is None:
            self.columns = list(row)
            self._rewrite()
        missing = [c for c in self.columns if c not in row]
        extra = [c for c in row if c not in self.columns]
        if missing or extra:
            raise ValueError(f"metrics row of step {step} has columns missing {missing} / unknown {extra}")
        self.rows.append(row)
        with open(self.path, "a", newline="") as f:
            csv.DictWriter(f, fieldnames=self.columns).writerow(row)
        if self.writer is not None:
            for k, v in row.items():
                if k != "step" and isinstance(v, (int, float)) and math.isfinite(float(v)):
                    self.writer.add_scalar(k, float(v), step)
            self.writer.flush()
        print(self.progress_line(row, total_steps), file=self.stream, flush=True)

    @staticmethod
    def progress_line(row: dict[str, Any], total_steps: int | None = None) -> str:
        of = f"/{total_steps}" if total_steps else ""
        parts = [f"step {row['step']}{of}"]
        for key, label, fmt in PROGRESS:
            if key in row and isinstance(row[key], (int, float)):
                parts.append(f"{label} {format(row[key], fmt)}")
        return "[rlkv train] " + ", ".join(parts)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def _number(text: str) -> Any:
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text
