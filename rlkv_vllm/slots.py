"""Ring-slot manager: which request owns which streaming-ring slot.

A request gets a slot the first time it is in a batch and keeps it until it
finishes, is aborted or is preempted (a preempted request recomputes from
position 0 when it resumes, so it simply gets a slot again). The slot count is at
most ``max_num_seqs`` (``startup.size_ring_slots``), and vLLM's scheduler never runs more
requests at once than there are slots (``compat.cap_running_requests`` caps it below
max_num_seqs), so running requests always find a slot; queued requests hold none and
wait in vLLM's queue.

A finished, aborted or preempted request's slot is released when the scheduler output
that reports it reaches the worker (``RLKVRuntime.on_step``, before the runner updates its
batch), so the request the scheduler admits in its place in that same step finds it free.

vLLM tells workers about finished requests in the next scheduler step (the
server's engine loop runs one more, possibly empty, step for that), so a slot is
released one step after its request finishes; in that step the scheduler counts the
request as gone too.

Ring contents are never cleared: a kernel reads only positions the request has
written in its current life, so a reused slot needs no reset.
"""

from __future__ import annotations

import heapq
import threading
from itertools import repeat
from typing import Callable, Iterable

import numpy as np


class SlotsExhaustedError(RuntimeError):
    pass


class SlotManager:
    """Maps request ids to ring slots in [0, num_slots)."""

    def __init__(self, num_slots: int, on_change: Callable[["SlotManager"], None] | None = None):
        if num_slots <= 0:
            raise ValueError(f"num_slots must be positive, got {num_slots}")
        self.num_slots = num_slots
        self._free = list(range(num_slots))
        heapq.heapify(self._free)
        self._owner: dict[str, int] = {}
        self.peak_in_use = 0
        self.total_assigned = 0
        self._lock = threading.Lock()
        self._on_change = on_change

    @property
    def in_use(self) -> int:
        return len(self._owner)

    @property
    def free(self) -> int:
        return self.num_slots - len(self._owner)

    def slot_of(self, req_id: str) -> int | None:
        return self._owner.get(req_id)

    def release(self, req_ids: Iterable[str]) -> int:
        """Free the slots of finished, aborted or preempted requests. Returns how many."""
        n = 0
        with self._lock:
            for rid in req_ids:
                slot = self._owner.pop(rid, None)
                if slot is not None:
                    heapq.heappush(self._free, slot)
                    n += 1
        if n and self._on_change:
            self._on_change(self)
        return n

    def assign(self, req_ids: list[str], alive: Callable[[str], bool] | None = None) -> list[int]:
        """Slots for the rows of a batch, giving new requests the lowest free slot.

        alive: optional check used only when no slot is free, to reclaim slots of
        requests the runner no longer knows (a missed finish event).
        """
        return self.assign_rows(req_ids, alive=alive).tolist()

    def assign_rows(self, req_ids: list[str], alive: Callable[[str], bool] | None = None,
                    out: np.ndarray | None = None) -> np.ndarray:
        """``assign`` as an int32 array ``[len(req_ids)]`` (written into ``out[:len(req_ids)]`` when given).

        Python-level work in proportion to the rows that are new: the known rows' slots come from
        one C-level pass over the ids (``np.fromiter(map(dict.get))``, as vLLM's own runner maps
        its batch to request-state rows), and only the new rows go through the free list."""
        n = len(req_ids)
        rows = np.empty(n, dtype=np.int32) if out is None else out[:n]
        changed = False
        with self._lock:
            rows[:] = np.fromiter(map(self._owner.get, req_ids, repeat(-1, n)), dtype=np.int32, count=n)
            for i in np.flatnonzero(rows < 0).tolist():
                rid = req_ids[i]
                slot = self._owner.get(rid)  # the same new id twice in one batch gets one slot
                if slot is None:
                    if not self._free and alive is not None:
                        self._reclaim(alive, keep=set(req_ids))
                    if not self._free:
                        raise SlotsExhaustedError(
                            f"all {self.num_slots} RLKV ring slots are held; this is a bug "
                            "(vLLM's scheduler is capped at the slot count)"
                        )
                    slot = heapq.heappop(self._free)
                    self._owner[rid] = slot
                    self.total_assigned += 1
                    changed = True
                rows[i] = slot
            self.peak_in_use = max(self.peak_in_use, len(self._owner))
        if changed and self._on_change:
            self._on_change(self)
        return rows

    def _reclaim(self, alive: Callable[[str], bool], keep: set[str]) -> None:
        for rid in [r for r in self._owner if r not in keep and not alive(r)]:
            heapq.heappush(self._free, self._owner.pop(rid))
