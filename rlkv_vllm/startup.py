"""What the front-end says and decides once at start: the summary, a CPU KV budget.

``summary_lines`` is the start-up summary the server log carries (through vLLM's logger):
sparsity asked and effective, full and streaming heads, layers with no full head, the KV
budget split (paged + ring), ring bytes and the kernels chosen. ``pick_cpu_kv_budget``
sizes the KV cache of a CPU start that sets none.
"""

from __future__ import annotations

from typing import Any

import torch

from . import compat
from .core.plan import AUTO_SLOT_TOKENS_FRACTION, RLKVPlan, budget_ring_slots, is_fp8
from .core.settings import RLKVConfigError
from .ops.pools import resolve_kernel

logger = compat.plugin_logger()

# On CPU without a KV budget, the one RLKV picks takes at most this share of the RAM free at
# start: the rest stays for the weights, the front-end and engine-core processes (1-2 GB each
# with torch), activations and whoever else shares the machine.
CPU_KV_RAM_FRACTION = 0.25


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def pick_cpu_kv_budget(vllm_config: Any, plan: RLKVPlan, free: int) -> int:
    """The KV budget (paged + ring) of a CPU start that sets none.

    Left alone, vLLM-CPU reserves 92 % of the RAM for the worker and stops, deep in its log,
    when less is free (any machine shared with other work). Enough for one request of
    max_model_len tokens per ring slot (max_num_seqs unless rlkv.ring_slots says fewer), plus the ring, within CPU_KV_RAM_FRACTION of the free RAM;
    if that cannot hold one full-length request, stop with one line naming the flag.
    free: the RAM free to the worker, in bytes (``compat.cpu_worker_free_memory``).
    """
    block = int(vllm_config.cache_config.block_size)
    max_len = int(vllm_config.model_config.max_model_len)
    per_request = -(-max_len // block) * block * plan.paged_bytes_per_token()
    workers = int(vllm_config.parallel_config.tensor_parallel_size)
    cap = int(free * CPU_KV_RAM_FRACTION) // workers
    want = plan.num_slots * per_request + plan.ring_nbytes
    budget = min(want, cap)
    if budget - plan.ring_nbytes < per_request:
        raise RLKVConfigError(
            f"kv_cache_memory_bytes = None is not allowed here: without it RLKV takes at most "
            f"{CPU_KV_RAM_FRACTION:g} of the {_gib(free)} RAM free ({_gib(cap)}), less than one "
            f"request of max_model_len = {max_len} needs ({_gib(per_request)} paged + "
            f"{_gib(plan.ring_nbytes)} ring); set --kv-cache-memory-bytes (or VLLM_CPU_KVCACHE_SPACE, "
            "in GiB) or lower --max-model-len"
        )
    fits = "enough for" if budget == want else (
        f"capped at {CPU_KV_RAM_FRACTION:g} of the {_gib(free)} RAM free; wanted")
    logger.info(
        "RLKV: no KV budget set on CPU (--kv-cache-memory-bytes, VLLM_CPU_KVCACHE_SPACE): using %s, "
        "%s %d requests x %d tokens + the ring; set --kv-cache-memory-bytes to choose",
        _gib(budget), fits, plan.num_slots, max_len,
    )
    return budget


def size_ring_slots(vllm_config: Any, plan: RLKVPlan, budget: int | None,
                    predicted: tuple[int, str] | None = None) -> RLKVPlan:
    """The plan with its ring slots decided (``rlkv.ring_slots``), and vLLM's scheduler capped at them.

    A number: that many. "auto" with a KV budget (``kv_cache_memory_bytes``, or the one picked on
    CPU): as many requests as the budget holds at ``rlkv.slot_tokens`` each
    (``core.plan.budget_ring_slots``), at most max_num_seqs. "auto" where vLLM sizes the paged
    cache itself after profiling (``--gpu-memory-utilization``): the budget is not known before
    the ring is allocated (inside model loading), so ``predicted`` (``compat.predicted_kv_budget``:
    bytes and how they were predicted) sizes it the same way; without a prediction, max_num_seqs slots.
    With fewer slots than max_num_seqs, vLLM runs at most that many requests at once and the
    others wait in its queue (``compat.cap_running_requests``); the settings written back
    carry the number, so every worker builds the same ring.
    """
    st = plan.settings
    max_len = compat.max_model_len(vllm_config)
    if st.slot_tokens != "auto" and st.slot_tokens > max_len:
        raise RLKVConfigError(
            f"rlkv.slot_tokens = {st.slot_tokens} is not allowed: must be at most max_model_len = {max_len}, "
            'or "auto"'
        )
    if st.ring_slots != "auto":
        slots, by = int(st.ring_slots), "rlkv.ring_slots"
    elif not budget and not predicted:
        slots, by = plan.max_num_seqs, ("max_num_seqs (rlkv.ring_slots auto: vLLM sizes the KV cache after "
                                        "profiling; set --kv-cache-memory-bytes or rlkv.ring_slots to size the ring)")
    else:
        block = compat.block_size(vllm_config)
        tokens = int(st.slot_tokens) if st.slot_tokens != "auto" else max(1, int(max_len * AUTO_SLOT_TOKENS_FRACTION))
        tokens = -(-tokens // block) * block
        size = budget or predicted[0]
        slots = budget_ring_slots(size, plan.ring_slot_nbytes, plan.paged_bytes_per_token(), tokens,
                                  plan.max_num_seqs)
        asked = (f"auto: max_model_len x {AUTO_SLOT_TOKENS_FRACTION:g}" if st.slot_tokens == "auto"
                 else st.slot_tokens)
        which = "the KV budget" if budget else f"the predicted KV budget ({predicted[1]})"
        fits = f"{which} holds {slots} requests of {tokens} tokens (rlkv.slot_tokens = {asked})"
        by = f"max_num_seqs ({fits} or more)" if slots == plan.max_num_seqs else f"budget: {fits}"
    plan = plan.with_slots(slots, by)
    if slots < plan.max_num_seqs:
        knob = compat.cap_running_requests(vllm_config, slots)
        plan.slots_by += f"; vLLM runs at most {slots} requests at once ({knob} = {slots}), the rest wait"
    return plan


def summary_lines(plan: RLKVPlan, *, cpu: bool, budget: int | None) -> list[str]:
    """The start-up summary: heads, sparsity asked and effective, KV budget, kernels.

    budget: the whole KV budget (paged + ring) in bytes; None where vLLM sizes the paged
    cache itself from --gpu-memory-utilization.
    """
    st = plan.settings
    mask = plan.mask
    full, total = int(mask.sum()), int(mask.size)
    effective = plan.sparsity_actual
    if st.selection == "explicit":
        sparsity = f"sparsity {effective:.4g} from the explicit pattern (rlkv.sparsity is not used)"
    elif abs(effective - st.sparsity) > 1e-9:
        sparsity = (f"sparsity {st.sparsity:g} asked -> {effective:.4g} effective "
                    f"(whole heads: {total - full} of {total} streaming)")
    else:
        sparsity = f"sparsity {st.sparsity:g} (effective {effective:.4g})"
    empty = [i for i, row in enumerate(mask) if not row.any()]
    which = ", ".join(map(str, empty[:16])) + (", ..." if len(empty) > 16 else "")
    no_full = f"{len(empty)} of {len(mask)} (layers {which})" if empty else "none"
    window = f"{st.sink} sink + {st.recent} recent tokens"
    if plan.serve:
        heads = f"KV heads {full} full (paged), {total - full} streaming (ring, {window})"
    else:
        heads = (f"KV heads: all {total} paged and ringed ({window}), mixed alpha*full + "
                 f"(1-alpha)*streaming; serve mode would keep {full} full")
    lines = [
        f"RLKV {st.mode} ({plan.shape.model_id}): {sparsity}, {st.selection} selection; {heads}; "
        f"layers with no full head: {no_full}"
    ]
    slots = f"{plan.num_slots} slots + 1 scratch x {st.window} tokens"
    fp8 = is_fp8(plan.cache_dtype)
    kv = f", KV {str(plan.cache_dtype).replace('torch.', '')}" if fp8 else ""
    per_token = f"{plan.paged_bytes_per_token()} B/token vs stock {plan.stock_bytes_per_token()}{kv}"
    rank = " per TP rank" if plan.tp_size > 1 else ""
    if budget:
        lines.append(
            f"RLKV KV budget{rank} {_gib(budget)} = paged {_gib(budget - plan.ring_nbytes)} ({per_token}) "
            f"+ streaming ring {_gib(plan.ring_nbytes)} ({plan.ring_nbytes} B, {slots})"
        )
    else:
        lines.append(
            f"RLKV KV{rank}: paged cache sized by vLLM from --gpu-memory-utilization ({per_token}) "
            f"+ streaming ring {_gib(plan.ring_nbytes)} ({plan.ring_nbytes} B, {slots})"
        )
    lines.append(f"RLKV ring slots {plan.num_slots} of max_num_seqs {plan.max_num_seqs}, from {plan.slots_by}")
    if cpu:
        lines.append(
            f"RLKV kernels: streaming heads the torch ring path (rlkv.kernel = {st.kernel}); full heads "
            "vLLM's CPU attention (CPU_ATTN)"
        )
    else:
        kernel = resolve_kernel(st.kernel, torch.device("cuda"))
        full_kernel = {"auto": "flash_attn where usable, else triton (chosen in the worker)"}.get(
            st.full_kernel, st.full_kernel)
        if fp8 and st.full_kernel == "auto":  # FA3 takes e4m3 caches (queries quantised as for stock)
            full_kernel = ("flash_attn (FA3 fp8, queries quantised) where usable, else triton (chosen in the worker)"
                           if plan.cache_dtype == torch.float8_e4m3fn else "triton (fp8_e5m2 KV)")
        decode = "cuda" if kernel == "triton" and st.decode_kernel == "cuda" and not fp8 else (
            "triton" if kernel == "triton" else "none (torch path)")
        lines.append(
            f"RLKV kernels: streaming {kernel} (rlkv.kernel = {st.kernel}); full heads {full_kernel} "
            f"(rlkv.full_kernel = {st.full_kernel}); decode step {decode} (rlkv.decode_kernel = "
            f"{st.decode_kernel})"
        )
    return lines
