"""Worker extension (vLLM ``worker_extension_cls``): RPCs for gates and ring slots.

Called through ``LLM.collective_rpc("rlkv_set_gates", args=(gates,))``; gates travel
pickled (a few hundred floats), so no NCCL group is needed.
"""

from __future__ import annotations

from typing import Any

from .runtime import current_runtime


def _runtime():  # type: ignore[no-untyped-def]
    rt = current_runtime()
    if rt is None:
        raise RuntimeError("RLKV is not active in this worker (select --attention-backend rlkv)")
    return rt


class RLKVWorkerExtension:
    def rlkv_set_gates(self, gates: Any) -> float:
        """Replace alpha [L, H_kv] in place (no restart, CUDA graphs stay valid).

        Returns the checksum (sum of this rank's alpha values) read back from the buffer.
        """
        return _runtime().set_gates(gates)

    def rlkv_gates_checksum(self) -> float:
        return _runtime().gates_checksum()

    def rlkv_get_gates(self) -> list[list[float]]:
        return _runtime().gates.double().cpu().tolist()

    def rlkv_slot_stats(self) -> dict[str, int]:
        rt = _runtime()
        s = rt.slots
        return {"num_slots": s.num_slots, "in_use": s.in_use, "free": s.free,
                "peak": s.peak_in_use, "assigned": s.total_assigned, "preemptions": rt.preemptions_seen}
