"""RLKV metrics on the server's Prometheus /metrics.

Static figures (sparsity, head counts, bytes per token) come from the plan the
front-end validated. Ring-slot usage lives in the worker; it is published through
a small memory-mapped file (path in RLKV_METRICS_FILE, set by the front-end before
the engine processes start) and read by a collector at scrape time.
"""

from __future__ import annotations

import atexit
import mmap
import os
import struct
import tempfile
import threading
from typing import TYPE_CHECKING, Any, Iterator

if TYPE_CHECKING:
    from .core.plan import RLKVPlan
    from .slots import SlotManager

ENV_FILE = "RLKV_METRICS_FILE"
_MAGIC = 0x524C4B56  # "RLKV"
_FIELDS = ("magic", "num_slots", "in_use", "peak", "assigned", "steps", "pid", "ring_bytes")
_FMT = "<" + "q" * len(_FIELDS)
_SIZE = struct.calcsize(_FMT)


class WorkerMetricsPublisher:
    """Writes slot usage into the shared file (rank 0 only); a no-op without one."""

    def __init__(self, path: str | None, plan: "RLKVPlan") -> None:
        self._mm: mmap.mmap | None = None
        self._values = dict.fromkeys(_FIELDS, 0)
        self._values.update(magic=_MAGIC, pid=os.getpid(), num_slots=plan.num_slots, ring_bytes=plan.ring_nbytes)
        if path and plan.tp_rank == 0:
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
                os.ftruncate(fd, _SIZE)
                self._mm = mmap.mmap(fd, _SIZE)
                os.close(fd)
            except OSError:
                self._mm = None
        self._flush()

    @classmethod
    def from_env(cls, plan: "RLKVPlan") -> "WorkerMetricsPublisher":
        return cls(os.environ.get(ENV_FILE), plan)

    def _flush(self) -> None:
        if self._mm is not None:
            self._mm[:_SIZE] = struct.pack(_FMT, *(self._values[f] for f in _FIELDS))

    def on_slots(self, slots: "SlotManager") -> None:
        self._values.update(in_use=slots.in_use, peak=slots.peak_in_use, assigned=slots.total_assigned)
        self._flush()

    def on_step(self) -> None:
        self._values["steps"] += 1
        if self._values["steps"] % 64 == 0:
            self._flush()


def read_metrics_file(path: str) -> dict[str, int] | None:
    try:
        with open(path, "rb") as f:
            data = f.read(_SIZE)
    except OSError:
        return None
    if len(data) < _SIZE:
        return None
    values = dict(zip(_FIELDS, struct.unpack(_FMT, data)))
    return values if values["magic"] == _MAGIC else None


class RLKVCollector:
    """Prometheus collector for the current engine's RLKV figures."""

    def __init__(self) -> None:
        self.plan: RLKVPlan | None = None
        self.path: str | None = None

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import GaugeMetricFamily, InfoMetricFamily

        plan = self.plan
        if plan is None:
            return
        s = plan.settings
        # vLLM's scheme: every name starts with "rlkv:", an info family exports <name>_info
        info = InfoMetricFamily("rlkv:config", "RLKV settings of this server")
        info.add_metric(
            [],
            {
                "mode": s.mode,
                "selection": s.selection,
                "sink": str(s.sink),
                "recent": str(s.recent),
                "pattern": os.path.basename(s.heads or "full_heads"),
                "sparsity_requested": f"{s.sparsity:g}",
                "ring_slots": str(plan.num_slots),
                "ring_slots_by": plan.slots_by,
            },
        )
        yield info
        g = GaugeMetricFamily("rlkv:sparsity", "Fraction of KV heads with a streaming cache (effective)")
        g.add_metric([], plan.sparsity_actual)
        yield g
        requested = GaugeMetricFamily(
            "rlkv:sparsity_requested", "rlkv.sparsity as set; selection rounds it to whole heads (rlkv:sparsity)"
        )
        requested.add_metric([], s.sparsity)
        yield requested
        no_full = GaugeMetricFamily("rlkv:layers_without_full_head", "Layers whose every KV head streams")
        no_full.add_metric([], plan.layers_without_full_head)
        yield no_full
        heads = GaugeMetricFamily("rlkv:kv_heads", "KV heads by cache kind (all layers)", labels=["kind"])
        n_full = int(plan.mask.sum())
        heads.add_metric(["full"], n_full)
        heads.add_metric(["streaming"], int(plan.mask.size - n_full))
        yield heads
        bpt = GaugeMetricFamily(
            "rlkv:kv_bytes_per_token",
            "Paged KV bytes per token: RLKV vs stock vLLM (per rank)",
            labels=["cache"],
        )
        bpt.add_metric(["rlkv"], plan.paged_bytes_per_token())
        bpt.add_metric(["stock"], plan.stock_bytes_per_token())
        yield bpt
        ratio = GaugeMetricFamily("rlkv:kv_bytes_per_token_ratio", "RLKV paged bytes per token / stock")
        ratio.add_metric([], plan.paged_bytes_per_token() / max(1, plan.stock_bytes_per_token()))
        yield ratio
        ring = GaugeMetricFamily("rlkv:ring_bytes", "Bytes held by the streaming ring pool (per rank)")
        ring.add_metric([], plan.ring_nbytes)
        yield ring
        live = read_metrics_file(self.path) if self.path else None
        slots = GaugeMetricFamily("rlkv:ring_slots", "Streaming ring slots (in_use + free: the slot count; "
                                  "why: rlkv:config_info's ring_slots_by)", labels=["state"])
        total = live["num_slots"] if live else plan.num_slots
        in_use = live["in_use"] if live else 0
        slots.add_metric(["in_use"], in_use)
        slots.add_metric(["free"], total - in_use)
        yield slots
        peak = GaugeMetricFamily("rlkv:ring_slots_peak", "Most ring slots in use at once")
        peak.add_metric([], live["peak"] if live else 0)
        yield peak
        assigned = GaugeMetricFamily("rlkv:ring_slot_assignments", "Ring slots handed out so far")
        assigned.add_metric([], live["assigned"] if live else 0)
        yield assigned


COLLECTOR = RLKVCollector()
_registered = False
_lock = threading.Lock()
# the process that created COLLECTOR.path: only it removes the file (a forked child inherits
# the atexit hook and must not delete a file the server still uses)
_owner_pid: int | None = None
_atexit_installed = False


def _remove_file(path: str | None) -> None:
    if not path:
        return
    try:
        os.unlink(path)
    except OSError:  # already gone, or never ours to remove
        pass


def _remove_at_exit() -> None:
    """On a clean stop (SIGTERM included: vLLM shuts down and returns), remove the shared file."""
    if _owner_pid == os.getpid():
        _remove_file(COLLECTOR.path)


def publish_plan(plan: "RLKVPlan") -> str:
    """Front-end: expose this plan's metrics and create the worker's shared file.

    The file is removed when the process exits cleanly, and when a later engine of the same
    process publishes its own (the collector shows only the current engine).
    """
    global _registered, _owner_pid, _atexit_installed
    fd, path = tempfile.mkstemp(prefix="rlkv-metrics-", suffix=".bin")
    os.close(fd)
    os.environ[ENV_FILE] = path
    with _lock:
        previous = COLLECTOR.path if _owner_pid == os.getpid() else None
        COLLECTOR.plan = plan
        COLLECTOR.path = path
        _owner_pid = os.getpid()
        _remove_file(previous)
        if not _atexit_installed:
            atexit.register(_remove_at_exit)
            _atexit_installed = True
        if not _registered:
            try:
                from prometheus_client import REGISTRY

                REGISTRY.register(COLLECTOR)
                _registered = True
            except Exception:  # noqa: BLE001 - metrics never block serving
                pass
    return path
