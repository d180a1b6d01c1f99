"""RLKV settings: the one place that reads and validates ``additional_config["rlkv"]``.

Every message names the field, the value and what is allowed, on one line, so a
bad setting is refused at startup instead of failing later inside a worker.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import MISSING, asdict, dataclass
from typing import Any, Literal

SELECTIONS = ("global", "per_layer", "explicit")
MODES = ("serve", "gated")
KERNELS = ("auto", "triton", "torch")
FULL_KERNELS = ("auto", "flash_attn", "triton")
DECODE_KERNELS = ("auto", "triton", "cuda")

Selection = Literal["global", "per_layer", "explicit"]
Mode = Literal["serve", "gated"]


class RLKVConfigError(ValueError):
    """A setting that RLKV cannot run with. The message is one line."""


def config_error(field_name: str, value: Any, allowed: str) -> RLKVConfigError:
    return RLKVConfigError(f"rlkv.{field_name} = {value!r} is not allowed: {allowed}")


@dataclass(frozen=True)
class RLKVSettings:
    """Validated RLKV settings.

    heads: path of a head pattern (TSV, JSON or safetensors); None only with
        selection="explicit" and ``full_heads`` given.
    sparsity: fraction of KV heads made streaming, in [0, 1).
    sink, recent: the streaming window: ``sink`` first tokens plus the ``recent`` last.
    selection: "global" quantile over all heads (the paper's), "per_layer" top-k, or
        "explicit" (the pattern is a 0/1 mask, or ``full_heads`` lists the full heads).
    mode: "serve" (split KV cache, memory saved) or "gated" (full cache for every
        head, outputs mixed with per-head alpha; used by the trainer's rollouts).
    full_heads: explicit (layer, kv_head) pairs of full heads, for selection="explicit".
    kernel: streaming-pool implementation: "triton" (fused kernels, CUDA graphs),
        "torch" (the PyTorch path), or "auto" (triton on CUDA, torch elsewhere).
    full_kernel: CUDA kernel for the full heads: "flash_attn", "triton" (vLLM's
        Triton unified attention; also float32), or "auto" (flash_attn where usable).
    decode_kernel: the one-launch write + ring kernel of decode batches (kernel "triton"):
        "triton", "cuda" (csrc/rlkv_decode.cu), or "auto" (see runtime.resolve_decode_kernel).
    ring_slots: streaming-ring slots, one per running request: "auto" (as many requests as the
        KV budget holds at ``slot_tokens`` each, at most max_num_seqs; the budget is predicted where
        vLLM sizes it from gpu_memory_utilization; see ``core.plan.budget_ring_slots``) or a
        number, at most max_num_seqs. Fewer slots than max_num_seqs cap vLLM's running requests
        at the slot count; the rest wait.
    slot_tokens: the request length "auto" sizes the ring for: "auto" (max_model_len / 4) or
        a number of tokens, at most max_model_len.
    permute_heads: serve mode: reorder each layer's KV heads (with their query heads) once
        after weight loading, full heads first, by permuting the fused QKV projection's rows
        and o_proj's input columns, so the full heads are a contiguous slice (no per-step
        gather/scatter). "auto" (the default): on, unless the engine has sleep mode (its
        level-2 wake reloads weights past the permutation seam); true / false force it.
        Gated mode never reorders. Gates, patterns, metrics and logs keep
        the model's head numbering (``core.head_order``).
    """

    heads: str | None = None
    sparsity: float = 0.5
    sink: int = 16
    recent: int = 64
    selection: Selection = "global"
    mode: Mode = "serve"
    full_heads: tuple[tuple[int, int], ...] | None = None
    kernel: str = "auto"
    full_kernel: str = "auto"
    decode_kernel: str = "auto"
    ring_slots: int | str = "auto"
    slot_tokens: int | str = "auto"
    permute_heads: bool | str = "auto"

    @property
    def window(self) -> int:
        """Tokens a streaming head keeps per request."""
        return self.sink + self.recent

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        if self.full_heads is not None:
            d["full_heads"] = [list(p) for p in self.full_heads]
        return {k: v for k, v in d.items() if v is not None}


_KEYS = tuple(RLKVSettings.__dataclass_fields__)

# what each key means, for `rlkv serve --help` and the README's settings table (a test keeps both in step)
SETTING_MEANINGS: dict[str, str] = {
    "heads": "head pattern: RLKV/DuoAttention `L x H_kv` TSV, or our JSON / safetensors (gates + metadata)",
    "sparsity": "fraction of KV heads made streaming, in [0, 1)",
    "sink": "streaming window: a streaming head keeps the first `sink` tokens of a request",
    "recent": "streaming window: a streaming head also keeps the last `recent` tokens",
    "selection": "`global` quantile over all heads (the paper's), `per_layer` top-k, or `explicit` "
                 "(0/1 pattern, or `full_heads`)",
    "mode": "`serve` (split KV cache, memory saved) or `gated` (full cache, "
            "`alpha*full + (1-alpha)*streaming`, for training rollouts)",
    "full_heads": 'with selection `explicit`: the full heads as `["layer:head", ...]` or `[[layer, head], ...]`',
    "kernel": "streaming-pool kernels: `triton` (what `auto` runs on CUDA) or `torch` "
              "(the CPU path; on CUDA a reference path without CUDA graphs)",
    "full_kernel": "CUDA, full heads: `flash_attn` (what `auto` runs for fp16/bf16, and for an fp8/fp8_e4m3 KV "
                   "cache with FA3 on SM90, where usable) or `triton` (vLLM's Triton attention; what `auto` runs "
                   "for fp8_e5m2 or fp8 without FA3)",
    "decode_kernel": "CUDA, the one-launch decode step: `triton` (what `auto` runs) or `cuda` "
                     "(`csrc/rlkv_decode.cu`, opt-in: slower so far; no fp8 path, Triton's runs instead)",
    "ring_slots": "streaming-ring slots (one per running request): `auto` (the requests the KV budget holds at "
                  "`slot_tokens` each, at most max_num_seqs; predicted under `--gpu-memory-utilization`) "
                  "or a number <= max_num_seqs; running requests are capped at it, the rest wait",
    "slot_tokens": "the request length `auto` ring slots are sized for: `auto` (max_model_len / 4) or tokens "
                   "<= max_model_len",
    "permute_heads": "serve mode: reorder each layer's heads once at weight load, full heads first (QKV rows, "
                     "o_proj columns), so no step gathers or scatters them: `auto` (on unless sleep mode is "
                     "enabled), `true`, or `false` (the gather path)",
}


def setting_default(key: str) -> str:
    """A key's default as users write it in JSON; ``heads`` shows as required."""
    default = RLKVSettings.__dataclass_fields__[key].default
    if key == "heads":
        return "required"
    if default is None or default is MISSING:
        return "none"
    return json.dumps(default).strip('"')


def settings_table() -> list[tuple[str, str, str]]:
    """(key, default, meaning) of every ``additional_config["rlkv"]`` key, in field order."""
    return [(key, setting_default(key), SETTING_MEANINGS[key]) for key in _KEYS]


def _as_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        elif isinstance(value, str) and value.strip().lstrip("+-").isdigit():
            value = int(value)
        else:
            raise config_error(name, value, "must be a positive integer")
    if value <= 0:
        raise config_error(name, value, "must be a positive integer")
    return value


def _as_auto_int(name: str, value: Any, allowed: str) -> int | str:
    """ "auto" or a positive integer (ring_slots, slot_tokens)."""
    if value == "auto":
        return value
    try:
        return _as_int(name, value)
    except RLKVConfigError:
        raise config_error(name, value, f'must be "auto" or a positive integer ({allowed})') from None


def _as_bool(name: str, value: Any, allowed: str = "must be true or false") -> bool:
    if not isinstance(value, bool):
        raise config_error(name, value, allowed)
    return value


def _as_sparsity(value: Any) -> float:
    try:
        if isinstance(value, bool):
            raise TypeError
        s = float(value)
    except (TypeError, ValueError):
        raise config_error("sparsity", value, "must be a number in [0, 1)") from None
    if not math.isfinite(s) or not 0.0 <= s < 1.0:
        raise config_error("sparsity", value, "must be a number in [0, 1)")
    return s


def _as_full_heads(value: Any) -> tuple[tuple[int, int], ...]:
    allowed = 'must be a list of [layer, kv_head] pairs or "layer:kv_head" strings'
    if not isinstance(value, (list, tuple)):
        raise config_error("full_heads", value, allowed)
    pairs: list[tuple[int, int]] = []
    for item in value:
        if isinstance(item, str) and item.count(":") == 1:
            a, b = item.split(":")
            if not (a.strip().isdigit() and b.strip().isdigit()):
                raise config_error("full_heads", value, allowed)
            pairs.append((int(a), int(b)))
        elif (
            isinstance(item, (list, tuple))
            and len(item) == 2
            and all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in item)
        ):
            pairs.append((int(item[0]), int(item[1])))
        else:
            raise config_error("full_heads", value, allowed)
    return tuple(sorted(set(pairs)))


def _as_choice(raw: dict[str, Any], name: str, default: str, allowed: tuple[str, ...]) -> str:
    value = raw.get(name, default)
    if value not in allowed:
        raise config_error(name, value, f"must be one of {', '.join(allowed)}")
    return value


def parse_settings(raw: Any, base_dir: str | None = None) -> RLKVSettings:
    """Validate the ``rlkv`` section of ``additional_config``.

    raw: the dict the user gave (from JSON or Python).
    base_dir: relative ``heads`` paths are resolved against it (default: cwd).
    """
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise RLKVConfigError(
            f"additional_config.rlkv = {raw!r} is not allowed: must be a JSON object "
            f"with keys {', '.join(_KEYS)}"
        )
    unknown = sorted(set(raw) - set(_KEYS))
    if unknown:
        raise RLKVConfigError(
            f"rlkv.{unknown[0]} is not a known setting: allowed keys are {', '.join(_KEYS)}"
        )

    selection = _as_choice(raw, "selection", "global", SELECTIONS)
    mode = _as_choice(raw, "mode", "serve", MODES)
    kernel = _as_choice(raw, "kernel", "auto", KERNELS)
    full_kernel = _as_choice(raw, "full_kernel", "auto", FULL_KERNELS)
    decode_kernel = _as_choice(raw, "decode_kernel", "auto", DECODE_KERNELS)
    if decode_kernel == "cuda" and kernel == "torch":
        raise config_error("decode_kernel", decode_kernel,
                           "the CUDA decode kernel runs with rlkv.kernel = 'triton' or 'auto', not 'torch'")

    sparsity = _as_sparsity(raw.get("sparsity", 0.5))
    sink = _as_int("sink", raw.get("sink", 16))
    recent = _as_int("recent", raw.get("recent", 64))
    ring_slots = _as_auto_int("ring_slots", raw.get("ring_slots", "auto"), "at most max_num_seqs")
    slot_tokens = _as_auto_int("slot_tokens", raw.get("slot_tokens", "auto"), "at most max_model_len")
    permute_heads = raw.get("permute_heads", "auto")
    if permute_heads != "auto":
        permute_heads = _as_bool("permute_heads", permute_heads, 'must be "auto", true or false')

    full_heads = None
    if "full_heads" in raw:
        if selection != "explicit":
            raise config_error(
                "full_heads", raw["full_heads"], 'is only used with rlkv.selection = "explicit"'
            )
        full_heads = _as_full_heads(raw["full_heads"])

    heads = raw.get("heads")
    if heads is None:
        if full_heads is None:
            raise config_error(
                "heads",
                None,
                "a head pattern file is required (TSV, JSON or safetensors); "
                'or set selection = "explicit" with full_heads',
            )
    else:
        if not isinstance(heads, str) or not heads:
            raise config_error("heads", heads, "must be the path of a head pattern file")
        path = os.path.expanduser(heads)
        if not os.path.isabs(path):
            path = os.path.abspath(os.path.join(base_dir or os.getcwd(), path))
        if not os.path.isfile(path):
            raise config_error("heads", heads, "no such file: give a readable pattern file")
        if not os.access(path, os.R_OK):
            raise config_error("heads", heads, "file is not readable")
        heads = path

    return RLKVSettings(
        heads=heads,
        sparsity=sparsity,
        sink=sink,
        recent=recent,
        selection=selection,
        mode=mode,
        full_heads=full_heads,
        kernel=kernel,
        full_kernel=full_kernel,
        decode_kernel=decode_kernel,
        ring_slots=ring_slots,
        slot_tokens=slot_tokens,
        permute_heads=permute_heads,
    )


@dataclass
class ModelShape:
    """What RLKV needs to know of a model: layers, KV heads, query heads, head size."""

    num_layers: int
    num_kv_heads: int
    num_q_heads: int
    head_size: int
    model_id: str = ""

    @property
    def group_size(self) -> int:
        return self.num_q_heads // self.num_kv_heads

    def check(self) -> None:
        """Refuse a model whose query heads do not group evenly over its KV heads."""
        if self.num_q_heads % self.num_kv_heads:
            raise RLKVConfigError(
                f"model {self.model_id} has {self.num_q_heads} query heads, not a multiple of "
                f"its {self.num_kv_heads} KV heads"
            )


def _config_int(config: dict[str, Any], path: str, *names: str) -> int | None:
    """The first of ``names`` present in a model config, as a positive int (None if none is)."""
    for name in names:
        value = config.get(name)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise RLKVConfigError(f"model = {path!r} is not allowed: its config.json has {name} = {value!r}, "
                                  "expected a positive integer")
        return value
    return None


def model_shape_from_config(path: str) -> ModelShape:
    """The shape of a local model (its directory or its config.json), read as vLLM reads it.

    Multimodal configs keep the language model in ``text_config``. The model id is the
    directory, as ``vllm serve DIR`` names the model.
    """
    config_path = os.path.join(path, "config.json") if os.path.isdir(path) else path
    if not os.path.isfile(config_path):
        raise RLKVConfigError(f"model = {path!r} is not allowed: no such config.json; give a local model "
                              "directory or its config.json")
    try:
        with open(config_path, encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise RLKVConfigError(f"model = {path!r} is not allowed: config.json could not be read "
                              f"({type(e).__name__}: {' '.join(str(e).split())})") from None
    if not isinstance(config, dict):
        raise RLKVConfigError(f"model = {path!r} is not allowed: config.json is not a JSON object")
    text = config.get("text_config")
    if isinstance(text, dict):
        config = {**config, **text}
    num_layers = _config_int(config, path, "num_hidden_layers", "num_layers", "n_layer")
    num_q_heads = _config_int(config, path, "num_attention_heads", "n_head")
    if num_layers is None or num_q_heads is None:
        raise RLKVConfigError(f"model = {path!r} is not allowed: config.json names no num_hidden_layers "
                              "or num_attention_heads")
    num_kv_heads = _config_int(config, path, "num_key_value_heads", "num_kv_heads") or num_q_heads
    head_size = _config_int(config, path, "head_dim")
    if head_size is None:
        hidden = _config_int(config, path, "hidden_size") or 0
        head_size = hidden // num_q_heads
    model_dir = os.path.dirname(os.path.abspath(config_path))
    return ModelShape(num_layers=num_layers, num_kv_heads=num_kv_heads, num_q_heads=num_q_heads,
                      head_size=head_size, model_id=model_dir)
