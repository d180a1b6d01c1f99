"""vLLM plugin entry point (``vllm.general_plugins``) and startup validation.

``register()`` runs once in every vLLM process (front-end, engine core, workers). It
needs no config, model or CUDA. The engine config is checked in the front-end, as
soon as vLLM builds it, so a bad setting stops the start with one line.
"""

from __future__ import annotations

import os

import sys
from typing import Any

from . import compat, startup
from .core.plan import FP8_KV_DTYPES
from .core.settings import RLKVConfigError

logger = compat.plugin_logger()

SUPPORTED_DTYPES_CUDA = ("float16", "bfloat16", "float32")
SUPPORTED_DTYPES_CPU = ("float16", "bfloat16", "float32")

# Whether the engine args being turned into a config ask for a memory fraction themselves
# (set by _before_engine_config, read by check_engine_config right after, in the same call).
_fraction_asked = False


def register() -> None:
    """Idempotent: registers the backend names and installs the hooks."""
    compat.install(on_config=check_engine_config, before=_before_engine_config)
    _install_excepthook()


def _before_engine_config(engine_args: Any) -> None:
    global _fraction_asked
    _fraction_asked = compat.asks_memory_fraction(engine_args)
    compat.prepare_engine_args(engine_args)


def _dtype_name(dtype: Any) -> str:
    return str(dtype).replace("torch.", "")


def _supported_head_sizes() -> list[int] | None:
    return compat.cpu_supported_head_sizes() if compat.is_cpu_platform() else None


def check_engine_config(vllm_config: Any) -> None:
    """Validate RLKV against a freshly built engine config and prepare the engine.

    Raises RLKVConfigError (one line: field, value, what is allowed). On success it
    sizes the ring slots (capping vLLM's running requests at them), writes the normalised
    settings back, reserves the ring inside an explicit KV budget, installs the worker extension and publishes the metrics.
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
    variant = os.environ.get("RLKV_DECODE_STEP_VARIANT")
    if variant is not None:  # a benchmark knob (ops.triton_stream): refuse a typo here, not in a worker
        from .ops.triton_stream import DECODE_STEP_VARIANTS

        if variant not in DECODE_STEP_VARIANTS:
            raise RLKVConfigError(f"RLKV_DECODE_STEP_VARIANT = {variant!r} is not allowed: one of "
                                  f"{', '.join(DECODE_STEP_VARIANTS)}")
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

    cache = vllm_config.cache_config
    cpu = compat.is_cpu_platform()
    if cpu and not getattr(cache, "kv_cache_memory_bytes", None) and not _fraction_asked:
        cache.kv_cache_memory_bytes = startup.pick_cpu_kv_budget(vllm_config, plan, compat.cpu_worker_free_memory())
    budget = getattr(cache, "kv_cache_memory_bytes", None) or None
    # no budget given: where vLLM sizes the cache after profiling, predict it for an "auto" ring
    predicted = compat.predicted_kv_budget(vllm_config) if not budget and plan.settings.ring_slots == "auto" else None
    decided_before = compat.ring_slots_by(vllm_config) if plan.settings.ring_slots != "auto" else None
    plan = startup.size_ring_slots(vllm_config, plan, budget, predicted)
    if decided_before is not None:  # a config this hook already decided (written back below): keep its reason
        plan.slots_by = decided_before
    # the settings as decided (ring_slots a number), so every worker builds the same ring
    vllm_config.additional_config = {**extra, "rlkv": plan.settings.to_dict(),
                                     compat.RING_SLOTS_BY_KEY: plan.slots_by}
    if budget and plan.ring_nbytes:
        if plan.ring_nbytes >= budget:
            raise RLKVConfigError(
                f"kv_cache_memory_bytes = {budget} is not allowed: the streaming ring for "
                f"{plan.num_slots} slots ({plan.slots_by}) needs {plan.ring_nbytes} bytes of it; raise the "
                "budget or set rlkv.ring_slots lower"
            )
        cache.kv_cache_memory_bytes = budget - plan.ring_nbytes
    par = vllm_config.parallel_config
    if not getattr(par, "worker_extension_cls", ""):
        par.worker_extension_cls = "rlkv_vllm.worker_ext.RLKVWorkerExtension"
    publish_plan(plan)
    for line in startup.summary_lines(plan, cpu=cpu, budget=budget):
        logger.info(line)
    logger.info(compat.model_runner_line(vllm_config))
    for warning in getattr(plan, "warnings", None) or []:
        logger.warning("RLKV: %s", warning)


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
    # build_plan has refused the kv_cache_dtype names RLKV cannot store (runtime.kv_dtype_of);
    # an fp8 one must also suit the platform's kernels
    kv_dtype = compat.kv_cache_dtype_name(vllm_config)
    if kv_dtype in FP8_KV_DTYPES:
        if cpu:
            problem = compat.cpu_fp8_kv_problem(plan.shape.head_size)
        else:
            problem = _cuda_fp8_kv_problem()
        if problem is not None:
            raise RLKVConfigError(f"kv_cache_dtype = {kv_dtype!r} is not allowed with RLKV here: {problem}; "
                                  "allowed: auto")
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
    # both modes keep streaming windows in the ring (gated: every head's streaming branch)
    mode = plan.settings.mode
    if vllm_config.speculative_config is not None:
        raise RLKVConfigError(
            f"speculative_config is not allowed with RLKV (rlkv.mode = '{mode}'): rejected draft tokens "
            "would overwrite ring entries still in the recent window; turn it off"
        )
    if getattr(vllm_config.cache_config, "enable_prefix_caching", False):
        raise RLKVConfigError(
            f"enable_prefix_caching = True is not allowed with RLKV (rlkv.mode = '{mode}'): a prefix-cache "
            "hit restores only paged blocks, not the streaming ring; turn it off"
        )
    get_sw = getattr(mc, "get_sliding_window", None)
    sw = get_sw() if callable(get_sw) else None
    if sw:
        raise RLKVConfigError(
            f"sliding_window = {sw} (model {plan.shape.model_id}) is not allowed with RLKV: "
            "models with sliding-window layers are not supported"
        )


def _cuda_fp8_kv_problem() -> str | None:
    """Why the CUDA path cannot hold this fp8 KV cache (None if it can). The full heads run
    on TRITON_ATTN (``backends.cuda.flash_attn_unavailable_reason``), which needs SM89+."""
    if compat.fp8_cuda_capability_missing():
        return "the Triton fp8 kernels need compute capability 8.9 or newer"
    return None


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
