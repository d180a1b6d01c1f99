#!/usr/bin/env python3
"""RLKV's per-step host work for the ring slots, against the batch size and what changed in the batch.

Every step the metadata builder asks the runtime for each batch row's ring slot
(``RLKVRuntime.slot_ids_on_device``). This times that call alone, in a runtime with a real slot manager
and a persistent slot buffer on the device at hand (pinned host copy on CUDA), for batches of 8 to 1,024
rows, in four cases:

- ``same rows``: a decode step of the same requests in the same order (the common step);
- ``one new row``: one request finished and another took its place;
- ``all new``: every row is a request the runtime has not seen;
- ``always rebuilt``: the same rows with the reuse turned off (what every step cost before it existed).

  python benchmarks/host_step.py                    # CPU here; on the GPU host the same
  python benchmarks/host_step.py --batches 8 256 --iters 200

Prints microseconds per call and writes benchmarks/results/host-step-<device>-<date>.json
(--out to choose). No vLLM engine: the runner hook that names the batch's requests is set directly.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import time
import types

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))  # run from a checkout without installing

import torch  # noqa: E402

from rlkv_vllm import compat  # noqa: E402
from rlkv_vllm.bench.driver import device_name  # noqa: E402
from rlkv_vllm.runtime import RLKVRuntime  # noqa: E402
from rlkv_vllm.slots import SlotManager  # noqa: E402

CASES = ("same rows", "one new row", "all new", "always rebuilt")


def slot_runtime(num_slots: int, device: torch.device) -> RLKVRuntime:
    """The runtime's slot-tracking half (no engine config, ring or pool), with its device buffer."""
    rt = object.__new__(RLKVRuntime)
    rt.plan = types.SimpleNamespace(num_slots=num_slots)
    rt.slots = SlotManager(num_slots)
    rt.metrics = types.SimpleNamespace(on_step=lambda: None)
    rt.preemptions_seen = 0
    rt.slot_buffer = torch.full((num_slots + 1,), num_slots, dtype=torch.int32, device=device)
    rt._slots_written, rt.slot_rows_written, rt.slot_rows_reused = None, 0, 0
    return rt


def time_case(case: str, batch: int, iters: int, device: torch.device) -> list[float]:
    """Microseconds per ``slot_ids_on_device`` call (device synchronised after each, outside the timing
    of the host work only where the copy is asynchronous)."""
    rt = slot_runtime(batch + 2, device)
    ids = [f"r{i}" for i in range(batch)]
    seq = batch
    rt.slots.assign(ids)
    out: list[float] = []
    for _ in range(iters):
        if case == "one new row":
            rt.on_step(None, types.SimpleNamespace(finished_req_ids={ids[0]}, preempted_req_ids=set()))
            ids = ids[1:] + [f"r{seq}"]
            seq += 1
        elif case == "all new":
            rt.on_step(None, types.SimpleNamespace(finished_req_ids=set(ids), preempted_req_ids=set()))
            ids = [f"r{seq + i}" for i in range(batch)]
            seq += batch
        elif case == "always rebuilt":
            rt._slots_written = None
        rows = list(ids)  # what the runner hook hands out: a copy of the batch's ids
        t = time.perf_counter()
        with _batch(rows):
            rt.slot_ids_on_device(batch)
        out.append((time.perf_counter() - t) * 1e6)
        if device.type == "cuda":
            torch.cuda.synchronize()
    return out


class _batch:
    """Make ``compat.RUNNER_HOOKS.batch_req_ids`` return these ids (the runner's batch) for one call."""

    def __init__(self, ids: list[str]) -> None:
        self.ids = ids

    def __enter__(self) -> None:
        self.saved = compat.RUNNER_HOOKS.batch_req_ids
        compat.RUNNER_HOOKS.batch_req_ids = lambda n: list(self.ids)  # type: ignore[method-assign]
        compat.RUNNER_HOOKS.request_alive = lambda: None  # type: ignore[method-assign]

    def __exit__(self, *exc: object) -> None:
        del compat.RUNNER_HOOKS.batch_req_ids
        del compat.RUNNER_HOOKS.request_alive


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batches", type=int, nargs="+", default=[8, 64, 256, 512, 1024])
    ap.add_argument("--iters", type=int, default=300)
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    if a.iters < 10 or any(b < 1 for b in a.batches):
        print(f"--iters = {a.iters} / --batches = {a.batches} is not allowed: iters >= 10, batches >= 1")
        return 2
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rows = []
    print(f"host work of RLKVRuntime.slot_ids_on_device on {device_name()} ({device}), us per step (median / p90)")
    print(f"{'batch':>6} " + " ".join(f"{c:>22}" for c in CASES))
    for b in a.batches:
        row: dict = dict(batch=b)
        cells = []
        for case in CASES:
            xs = time_case(case, b, a.iters, device)[5:]  # the first calls warm the allocator
            xs.sort()
            med, p90 = statistics.median(xs), xs[int(0.9 * (len(xs) - 1))]
            row[case] = dict(median_us=round(med, 2), p90_us=round(p90, 2))
            cells.append(f"{med:>12.1f} / {p90:>7.1f}")
        rows.append(row)
        print(f"{b:>6} " + " ".join(cells))
    date = datetime.date.today().isoformat()
    dev = device_name().replace(" ", "_")
    path = a.out or os.path.join(HERE, "results", f"host-step-{dev}-{date}.json")
    import vllm

    with open(path, "w") as f:
        json.dump(dict(study="host-step", device=device_name(), vllm=vllm.__version__, torch=torch.__version__,
                       date=date, command="python benchmarks/host_step.py " + " ".join(argv or sys.argv[1:]),
                       cases=list(CASES), iters=a.iters, rows=rows), f, indent=1)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
