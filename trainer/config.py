"""The trainer's configuration: one frozen dataclass tree, read from YAML and validated at start.

``load_config(FILE, overrides)`` reads the YAML, applies ``--set key=value`` overrides (values
typed as YAML), checks every field and the cross-field rules, and returns a ``TrainConfig``;
anything wrong raises ``TrainConfigError`` with one line naming the field, the value and what
is allowed. Defaults are the paper's recipe (METHOD.md) for DeepSeek-R1-Distill-Llama-8B;
the shipped configs in ``trainer/configs/`` set what differs per model.

Pure Python (yaml only): a bad config is refused before Ray, vLLM or torch is imported.
"""

from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass, replace
from typing import Any, Collection, Literal, Mapping, Sequence

import yaml

from .schema import (
    Rule, TrainConfigError, build, config_error, field_names, field_of, integer, knob, not_a_mapping_error, number,
    section, to_plain, unknown_key_error,
)

__all__ = [
    "TrainConfig", "TrainConfigError", "ModelConfig", "DataConfig", "SamplingConfig", "RolloutConfig",
    "LearnerConfig", "ObjectiveConfig", "RewardConfig", "OptimConfig", "TimeoutsConfig", "RunConfig",
    "RayConfig", "parse_config", "load_config", "apply_overrides", "config_to_dict", "config_to_yaml",
    "check_data_fields", "check_paths", "data_format", "with_model_path", "CONFIG_DIR", "shipped_configs",
]

CONFIG_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")

POSITIVE_INT = integer(ge=1)
NONNEG_INT = integer(ge=0)
FRACTION = number(ge=0, le=1)
_DEVICE_RE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")
_DOTTED_RE = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*([:.][A-Za-z_]\w*)$")


@dataclass(frozen=True)
class ModelConfig:
    """The frozen model whose KV-head gates are learned.

    path: local model directory (required unless ``tiny``). The shipped recipes carry a
        placeholder: set it with ``--set model.path=DIR``.
    tiny: build rlkv's tiny local Llama-shaped model (random weights, ``rlkv tiny-model``) and
        train on it; ``path`` is then the folder to build it in (null: the trainer's cache).
    dtype: weights' dtype in the rollout engine (vLLM's ``dtype``).
    model_id: the model's name in the output pattern's metadata (null: the folder's name).
    load_format: "auto" (the folder's weights) or "dummy" (random weights of the folder's config, in the
        rollout engines and the learner alike: for speed runs of a model shape whose weights are absent).
    """

    path: str | None = knob(None, Rule("must be a local model directory"), path=True,
                            null="only with model.tiny = true")
    tiny: bool = False
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = "bfloat16"
    model_id: str | None = knob(None, null="the model folder's name")
    load_format: Literal["auto", "dummy"] = "auto"


@dataclass(frozen=True)
class DataConfig:
    """The training prompts.

    path: the prompt file (required).
    format: "auto" (by the file's ending), "jsonl", "json" or "parquet".
    prompt_key, answer_key: the record fields of the problem and of its reference answer;
        answer_key null: the data has no answers (only the "agreement" or a plugin reward).
    prompt_template: the user message; "{prompt}" is replaced by the problem (other braces,
        such as \\boxed{}, stay as written).
    system_prompt: a system message, or null for none (the R1 distills are trained without one).
    chat_template: wrap the messages in the tokenizer's chat template.
    max_prompt_tokens: longer prompts are left out.
    max_prompts: use at most this many prompts (after the filter), or null for all.
    filter_n, filter_k: self-distillation filter: sample each prompt filter_n times with the
        dense model (alpha = 1) and keep it if at least filter_k answers are correct
        (filter_n 0: no filter).
    shuffle_seed: the order of prompts, reshuffled each epoch from this seed (null: file order).
    """

    path: str | None = knob(None, Rule("must be the path of a prompt file"), path=True,
                            null="the default; a run needs a file")
    format: Literal["auto", "jsonl", "json", "parquet"] = "auto"
    prompt_key: str = "prompt"
    answer_key: str | None = knob("answer", null="the data has no answers")
    prompt_template: str = knob("{prompt}", Rule('must be a string containing "{prompt}"', lambda v: "{prompt}" in v))
    system_prompt: str | None = knob(None, null="no system message")
    chat_template: bool = True
    max_prompt_tokens: int = knob(1024, POSITIVE_INT)
    max_prompts: int | None = knob(None, POSITIVE_INT, null="all prompts")
    filter_n: int = knob(0, NONNEG_INT)
    filter_k: int = knob(1, POSITIVE_INT)
    shuffle_seed: int | None = knob(0, null="keep the file's order")


@dataclass(frozen=True)
class SamplingConfig:
    """How rollouts sample (vLLM SamplingParams; log-probs are vLLM's processed log-probs,
    so the learner must apply the same temperature and top-k / top-p truncation).

    temperature: > 0 (1.0 for the R1 distills, 0.6 for Qwen3-Thinking).
    top_p: in (0, 1]; 1 keeps every token.
    top_k: -1 (off) or >= 1.
    max_new_tokens: generation cap per sample.
    group_size: samples per prompt (the GRPO group).
    """

    temperature: float = knob(1.0, number(gt=0))
    top_p: float = knob(1.0, number(gt=0, le=1))
    top_k: int = knob(-1, Rule("must be -1 (off) or an integer >= 1", lambda v: v == -1 or v >= 1))
    max_new_tokens: int = knob(7168, POSITIVE_INT)
    group_size: int = knob(4, POSITIVE_INT)


@dataclass(frozen=True)
class RolloutConfig:
    """The rollout workers: vLLM ``LLM`` engines in RLKV's gated mode, one per Ray actor.

    num_workers: rollout actors.
    num_gpus_per_worker, num_cpus_per_worker: each actor's Ray resources (fractions share a device).
    prompts_per_step: prompts per training step; each is sampled ``sampling.group_size`` times.
    gpu_memory_utilization: vLLM's share of the GPU, in (0, 1].
    kv_cache_memory_bytes: an explicit KV budget (bytes, or "4GiB"); overrides
        gpu_memory_utilization, as in vLLM (null: vLLM profiles the budget).
    max_num_seqs, max_model_len: vLLM's concurrency cap and context length.
    enforce_eager: null: eager on CPU, CUDA graphs on GPU.
    sink, recent: the training window of the streaming branch (the learner uses the same).
    colocate: rollout workers and the learner share GPUs (fractional num_gpus).
    sleep, sleep_level: put vLLM to sleep while the learner trains (colocated, synchronous, CUDA only);
        level 1 offloads the weights to host memory and drops the KV cache, level 2 drops both and reloads
        the weights from the model path at wake-up. The gates are pushed after every wake.
    """

    num_workers: int = knob(1, POSITIVE_INT)
    num_gpus_per_worker: float = knob(1.0, number(ge=0))
    num_cpus_per_worker: float = knob(1.0, number(gt=0))
    prompts_per_step: int = knob(32, POSITIVE_INT)
    gpu_memory_utilization: float = knob(0.9, number(gt=0, le=1))
    kv_cache_memory_bytes: int | None = knob(None, integer(ge=1, extra=' (bytes, or a size such as "4GiB")'),
                                             size=True, null="vLLM profiles the budget")
    max_num_seqs: int = knob(128, POSITIVE_INT)
    max_model_len: int = knob(8192, POSITIVE_INT)
    enforce_eager: bool | None = knob(None, null="eager on CPU, CUDA graphs on GPU")
    sink: int = knob(128, POSITIVE_INT)
    recent: int = knob(256, POSITIVE_INT)
    colocate: bool = False
    sleep: bool = False
    sleep_level: Literal[1, 2] = 1
    sampling: SamplingConfig = section(SamplingConfig)


@dataclass(frozen=True)
class LearnerConfig:
    """The learner: the frozen HF model with the gated reference attention; only alpha trains.

    device: "auto" (cuda if there is one), "cpu", "cuda" or "cuda:N".
    dtype: the frozen weights' compute dtype (the gates stay float32).
    num_gpus, num_cpus: the learner actor's Ray resources.
    micro_batch_tokens: token budget of one forward/backward; must hold the longest sequence.
    gradient_checkpointing: recompute activations in backward (long rollouts need it on GPU).
    attention: "batched" (the PyTorch oracle's batched form: CPU and reference; memory grows with
        the square of the sequence length), "flex" (``rlkv_vllm.core.fused``: FlexAttention with the
        Lambda BlockMask for the streaming branch, FlashAttention/SDPA or flex for the full one, in the
        model's dtype; memory linear in the sequence length; CUDA only, as torch has no CPU backward
        for it) or "auto" (flex on CUDA, batched elsewhere).
    """

    device: str = knob("auto", Rule('must be "auto", "cpu", "cuda" or "cuda:N"', lambda v: bool(_DEVICE_RE.match(v))))
    dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"
    num_gpus: float = knob(1.0, number(ge=0))
    num_cpus: float = knob(1.0, number(gt=0))
    micro_batch_tokens: int = knob(8192, POSITIVE_INT)
    gradient_checkpointing: bool = True
    attention: Literal["auto", "batched", "flex"] = "auto"


@dataclass(frozen=True)
class ObjectiveConfig:
    """The loss (objective.py): decoupled PPO on the gates plus the adaptive sparsity penalty.

    clip: PPO clip epsilon; the trust-region ratio is clipped to [1 - clip, 1 + clip].
    correction: off-policy correction of the sampler-to-learner weight
        exp(learner_logp - sampler_logp): "mask" drops tokens whose weight exceeds
        ratio_threshold (the reference; no lower cap), "tis" truncates it at tis_cap (verl's TIS).
    ratio_threshold: > 1; the "mask" threshold (5 in the reference).
    tis_cap: >= 1; the "tis" cap (2 as verl).
    advantage: "batch" (token-weighted mean and std over the whole batch, the reference) or
        "group" (each prompt's group, GRPO).
    beta: penalty weight (0: no penalty); 1e-3 for Llama-8B and Qwen-7B, 2.5e-3 for Qwen3-4B.
    tau: the penalty is on only while the mean raw reward r exceeds tau (0.5; 0.55 for Qwen-7B).
    penalty_scope: r over the "micro_batch" (the reference) or the whole "batch".
    reward_scale, reward_bias: raw reward x in [0, 1] maps to (x + bias) * scale (0/1 -> -5/+5).
    """

    clip: float = knob(0.4, number(gt=0))
    correction: Literal["mask", "tis"] = "mask"
    ratio_threshold: float = knob(5.0, number(gt=1))
    tis_cap: float = knob(2.0, number(ge=1))
    advantage: Literal["batch", "group"] = "batch"
    beta: float = knob(1e-3, number(ge=0))
    tau: float = knob(0.5, FRACTION)
    penalty_scope: Literal["micro_batch", "batch"] = "micro_batch"
    reward_scale: float = knob(10.0, number(gt=0))
    reward_bias: float = -0.5


@dataclass(frozen=True)
class RewardConfig:
    """The reward of one sample, in [0, 1] (raw; the objective maps it to +-5).

    kind: "correctness" (math-verify against the data's answer), "agreement" (the final answer
        agrees with the dense model's, alpha = 1; needs no answers) or "plugin".
    plugin: with kind "plugin": the function, as "package.module:function" or "package.module.function".
    agreement_samples: with kind "agreement": the dense model's answer is the majority over this many samples.
    timeout_s: a grading that takes longer scores 0.
    num_workers: grading processes.
    """

    kind: Literal["correctness", "agreement", "plugin"] = "correctness"
    plugin: str | None = knob(None, Rule('must be a dotted path such as "package.module:function"',
                                         lambda v: bool(_DOTTED_RE.match(v))), null="only with reward.kind = plugin")
    agreement_samples: int = knob(1, POSITIVE_INT)
    timeout_s: float = knob(15.0, number(gt=0))
    num_workers: int = knob(1, POSITIVE_INT)


@dataclass(frozen=True)
class OptimConfig:
    """AdamW on the gates, constant learning rate.

    lr, weight_decay: 1e-2 and 0.017 (the reference; decay pulls alpha toward 0 too).
    grad_clip: max gradient norm (null: no clipping).
    betas, eps: AdamW's (torch's defaults).
    """

    lr: float = knob(1e-2, number(gt=0))
    weight_decay: float = knob(0.017, number(ge=0))
    grad_clip: float | None = knob(1.0, number(gt=0), null="no clipping")
    betas: tuple[float, float] = knob((0.9, 0.999), Rule("must be a list of 2 numbers in [0, 1)",
                                                         lambda v: all(0 <= b < 1 for b in v)))
    eps: float = knob(1e-8, number(gt=0))


@dataclass(frozen=True)
class TimeoutsConfig:
    """Longest waits on remote work, in seconds; past one the run stops with a one-line error.

    startup_s: actors up and engines built. rollout_s: one step's samples.
    learn_s: one learner step. sync_s: a gate push to every worker (and its checksum).
    reward_s: one step's grading.
    """

    startup_s: float = knob(900.0, number(gt=0))
    rollout_s: float = knob(3600.0, number(gt=0))
    learn_s: float = knob(3600.0, number(gt=0))
    sync_s: float = knob(120.0, number(gt=0))
    reward_s: float = knob(600.0, number(gt=0))


@dataclass(frozen=True)
class RunConfig:
    """Length, seeds, checkpoints and logging.

    steps: stop after this many steps (null: run ``epochs`` passes over the data); the run ends
        at whichever of steps and epochs comes first.
    epochs: passes over the prompts.
    seed: seeds sampling and the learner.
    checkpoint_every: save gates and optimiser state every N steps (0: only at the end).
    staleness: async rollouts may be this many gate versions behind (0: synchronous;
        the reference's AReaL ran with 2).
    log_every: write metrics every N steps.
    """

    steps: int | None = knob(None, POSITIVE_INT, null="run the epochs")
    epochs: int = knob(2, POSITIVE_INT)
    seed: int = 0
    checkpoint_every: int = knob(10, NONNEG_INT)
    staleness: int = knob(0, NONNEG_INT)
    log_every: int = knob(1, POSITIVE_INT)
    timeouts: TimeoutsConfig = section(TimeoutsConfig)


@dataclass(frozen=True)
class RayConfig:
    """ray.init's arguments.

    address: a cluster to join ("auto", "ray://host:10001", ...) or null: start a local Ray
        (address="local", so a stray RAY_ADDRESS cannot attach the job elsewhere).
    num_cpus, num_gpus: the local Ray's resources (null: what the machine has).
    object_store_memory: bytes, or "200MiB" (null: Ray's ~30% of RAM; set it on small machines).
    include_dashboard: start Ray's dashboard.
    """

    address: str | None = knob(None, Rule("must be a Ray address string", lambda v: bool(v.strip())),
                               null="start a local Ray")
    num_cpus: int | None = knob(None, POSITIVE_INT, null="the machine's")
    num_gpus: int | None = knob(None, NONNEG_INT, null="the machine's")
    object_store_memory: int | None = knob(None, integer(ge=1, extra=' (bytes, or a size such as "200MiB")'),
                                           size=True, null="Ray's default")
    include_dashboard: bool = False


@dataclass(frozen=True)
class TrainConfig:
    """Everything ``rlkv train`` runs with."""

    model: ModelConfig = section(ModelConfig)
    data: DataConfig = section(DataConfig)
    rollout: RolloutConfig = section(RolloutConfig)
    learner: LearnerConfig = section(LearnerConfig)
    objective: ObjectiveConfig = section(ObjectiveConfig)
    reward: RewardConfig = section(RewardConfig)
    optim: OptimConfig = section(OptimConfig)
    run: RunConfig = section(RunConfig)
    ray: RayConfig = section(RayConfig)

    @property
    def samples_per_step(self) -> int:
        return self.rollout.prompts_per_step * self.rollout.sampling.group_size

    @property
    def max_sequence_tokens(self) -> int:
        """The longest prompt + completion a rollout can produce."""
        return self.data.max_prompt_tokens + self.rollout.sampling.max_new_tokens


# ---------------------------------------------------------------- cross-field rules


def _check_cross(c: TrainConfig) -> None:
    """Rules that tie fields together; each names the field to change."""
    if c.model.path is None and not c.model.tiny:
        raise config_error("model.path", None, "give the local model directory (or set model.tiny = true)")
    if c.data.path is None:
        raise config_error("data.path", None, "give the prompt file (jsonl, json or parquet)")
    if c.reward.kind == "correctness" and c.data.answer_key is None:
        raise config_error("data.answer_key", None,
                           "reward.kind = 'correctness' grades against answers; name the answer field "
                           "or use reward.kind = 'agreement'")
    if c.data.filter_n > 0:
        if c.data.answer_key is None:
            raise config_error("data.filter_n", c.data.filter_n,
                               "the self-distillation filter grades against answers; set data.answer_key")
        if c.data.filter_k > c.data.filter_n:
            raise config_error("data.filter_k", c.data.filter_k,
                               f"must be at most data.filter_n = {c.data.filter_n}")
    if c.reward.kind == "plugin" and c.reward.plugin is None:
        raise config_error("reward.plugin", None, 'reward.kind = "plugin" needs the function\'s dotted path')
    if c.reward.kind != "plugin" and c.reward.plugin is not None:
        raise config_error("reward.plugin", c.reward.plugin, 'is only used with reward.kind = "plugin"')
    if c.max_sequence_tokens > c.rollout.max_model_len:
        raise config_error("rollout.max_model_len", c.rollout.max_model_len,
                           f"must hold data.max_prompt_tokens + rollout.sampling.max_new_tokens = "
                           f"{c.max_sequence_tokens}")
    if c.learner.micro_batch_tokens < c.max_sequence_tokens:
        raise config_error("learner.micro_batch_tokens", c.learner.micro_batch_tokens,
                           f"a micro-batch must hold the longest sequence: at least data.max_prompt_tokens + "
                           f"rollout.sampling.max_new_tokens = {c.max_sequence_tokens}")
    if c.objective.advantage == "group" and c.rollout.sampling.group_size < 2:
        raise config_error("objective.advantage", "group",
                           "a group baseline needs rollout.sampling.group_size >= 2 (use 'batch')")
    if c.rollout.sleep and not c.rollout.colocate:
        raise config_error("rollout.sleep", True,
                           "sleeping frees GPU memory for a colocated learner; set rollout.colocate = true")
    if c.rollout.sleep and c.run.staleness > 0:
        raise config_error("rollout.sleep", True,
                           f"a sleeping engine cannot roll out while the learner trains, and run.staleness = "
                           f"{c.run.staleness} overlaps the two; set run.staleness = 0 (synchronous)")
    if c.rollout.colocate and c.rollout.num_gpus_per_worker + c.learner.num_gpus > 1:
        raise config_error("rollout.colocate", True,
                           f"colocated actors share one GPU: rollout.num_gpus_per_worker + learner.num_gpus = "
                           f"{c.rollout.num_gpus_per_worker + c.learner.num_gpus:g} must be <= 1")
    if c.learner.attention == "flex" and c.learner.device == "cpu":
        raise config_error("learner.attention", "flex", "FlexAttention runs on CUDA; use 'batched' on the CPU")
    _check_resources(c)


def _check_resources(c: TrainConfig) -> None:
    """A local Ray too small for the actors would leave one pending forever: fail now."""
    r = c.rollout
    if c.ray.address is not None:
        return  # a cluster's resources are not known here
    cpus = r.num_workers * r.num_cpus_per_worker + c.learner.num_cpus
    if c.ray.num_cpus is not None and cpus > c.ray.num_cpus:
        raise config_error("ray.num_cpus", c.ray.num_cpus,
                           f"the actors ask for {cpus:g} CPUs (rollout.num_workers x rollout.num_cpus_per_worker "
                           "+ learner.num_cpus); give more or ask for fractions")
    gpus = r.num_workers * r.num_gpus_per_worker + (0 if r.colocate else c.learner.num_gpus)
    if c.ray.num_gpus is not None and gpus > c.ray.num_gpus:
        raise config_error("ray.num_gpus", c.ray.num_gpus,
                           f"the actors ask for {gpus:g} GPUs (rollout workers + learner); give more, "
                           "colocate, or ask for fractions")


# ---------------------------------------------------------------- YAML


class _Loader(yaml.SafeLoader):
    """SafeLoader that reads 1e-2 as a float (YAML 1.1 wants 1.0e-2) and refuses duplicate keys."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:\d+\.?\d*|\.\d+)[eE][-+]?\d+$"),
    list("-+0123456789."),
)


def _mapping_without_duplicates(loader: _Loader, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
    seen: set[Any] = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
        seen.add(key)
    return loader.construct_mapping(node, deep=deep)


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping_without_duplicates)


def _yaml_problem(e: yaml.YAMLError) -> str:
    mark = getattr(e, "problem_mark", None)
    problem = getattr(e, "problem", None) or str(e)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    return " ".join(f"{problem}{where}".split())


def _read_yaml(path: str) -> Any:
    if not os.path.isfile(path):
        raise config_error("config", path, "no such file: give a YAML config (see trainer/configs/)")
    try:
        with open(path, encoding="utf-8") as f:
            return yaml.load(f, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as e:
        raise config_error("config", path, f"not valid YAML: {_yaml_problem(e)}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise config_error("config", path, f"cannot be read ({type(e).__name__}: {' '.join(str(e).split())})") from None


def _yaml_value(text: str) -> Any:
    try:
        return yaml.load(text, Loader=_Loader)  # noqa: S506
    except yaml.YAMLError:
        return text  # not YAML (an unbalanced bracket, ...): the text itself, and the field's rule decides


# ---------------------------------------------------------------- loading


def _resolver(base_dir: str) -> Any:
    def resolve(p: str) -> str:
        p = os.path.expanduser(p)
        return p if os.path.isabs(p) else os.path.normpath(os.path.join(base_dir, p))

    return resolve


def apply_overrides(raw: Mapping[str, Any] | None, overrides: Sequence[str], cwd: str | None = None) -> dict[str, Any]:
    """``raw`` with each ``key.sub=value`` applied in order (value typed as YAML: 0.3 is a number,
    true a bool, null None, [0.9, 0.99] a list, {a: 1} merged into a section). Relative paths
    given here resolve against ``cwd`` (the shell's folder), not the config file's."""
    out: dict[str, Any] = _merged({}, raw or {})
    resolve = _resolver(cwd or os.getcwd())
    for item in overrides:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise TrainConfigError(f"--set {item!r} is not allowed: must be key=value, e.g. objective.clip=0.3")
        _check_key(key)
        value = _yaml_value(text)
        leaf = field_of(TrainConfig, key)
        if leaf is not None and leaf.metadata.get("path") and isinstance(value, str):
            value = resolve(value)
        *parents, last = key.split(".")
        node, cls = out, TrainConfig
        for i, part in enumerate(parents):
            cls = field_of(cls, part).default_factory  # type: ignore[union-attr]  # _check_key: a section
            if node.get(part) is None:
                node[part] = {}
            elif not isinstance(node[part], dict):
                raise not_a_mapping_error(".".join(parents[:i + 1]), node[part], field_names(cls))
            node = node[part]
        both_mappings = isinstance(value, Mapping) and isinstance(node.get(last), dict)
        node[last] = _merged(node[last], value) if both_mappings else value
    return out


def _check_key(key: str) -> None:
    """Refuse a --set key that names no field, listing the keys allowed where it left the tree."""
    cls: Any = TrainConfig
    parts = key.split(".")
    for i, part in enumerate(parts):
        fields = {f.name: f for f in dataclasses.fields(cls)}
        if part not in fields:
            raise unknown_key_error(".".join(parts[:i]), part, tuple(fields))
        sub = fields[part].default_factory
        if dataclasses.is_dataclass(sub):
            cls = sub
        elif i < len(parts) - 1:
            raise TrainConfigError(f"--set {key!r} is not allowed: train.{'.'.join(parts[:i + 1])} is a value, "
                                   "not a section")


def _merged(base: dict[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    """A deep copy of ``base`` with ``extra`` merged in (nested mappings merge, other values replace)."""
    out = {k: _merged({}, v) if isinstance(v, Mapping) else v for k, v in base.items()}
    for k, v in extra.items():
        out[k] = _merged(out[k] if isinstance(out.get(k), dict) else {}, v) if isinstance(v, Mapping) else v
    return out


def parse_config(raw: Any, base_dir: str | None = None) -> TrainConfig:
    """Validate a config mapping (from YAML) and return the frozen tree.

    base_dir: relative model/data paths resolve against it (the config file's folder; default cwd).
    """
    config = build(TrainConfig, raw, "", _resolver(base_dir or os.getcwd()))
    _check_cross(config)
    return config


def load_config(path: str, overrides: Sequence[str] = (), cwd: str | None = None) -> TrainConfig:
    """Read the YAML file ``path``, apply ``--set`` overrides, validate.

    Relative paths in the file resolve against the file's folder; --set makes its own absolute
    (against ``cwd``) first, so the two never mix."""
    raw = _read_yaml(path)
    if raw is not None and not isinstance(raw, Mapping):
        raise config_error("config", path,
                           f"must be a YAML mapping of the sections {', '.join(field_names(TrainConfig))}")
    return parse_config(apply_overrides(raw, overrides, cwd), base_dir=os.path.dirname(os.path.abspath(path)))


def config_to_dict(config: TrainConfig) -> dict[str, Any]:
    """The resolved config as plain data (sections in field order): what the run writes next to its outputs."""
    return to_plain(config)


def config_to_yaml(config: TrainConfig) -> str:
    return yaml.safe_dump(config_to_dict(config), sort_keys=False, default_flow_style=False)


def with_model_path(config: TrainConfig, path: str) -> TrainConfig:
    """The config with ``model.path`` set (the trainer calls this after building the tiny model)."""
    return replace(config, model=replace(config.model, path=path))


def check_data_fields(config: TrainConfig, fields: Collection[str], source: str) -> None:
    """Hook for the data loader: refuse data whose records lack the fields the config reads.

    fields: the keys of the data's records (e.g. of its first record); source: the file, for the message.
    """
    have = ", ".join(sorted(map(str, fields))) or "none"
    if config.data.prompt_key not in fields:
        raise config_error("data.prompt_key", config.data.prompt_key, f"{source} has no such field (fields: {have})")
    needs_answers = config.reward.kind == "correctness" or config.data.filter_n > 0
    if needs_answers and config.data.answer_key not in fields:
        why = "reward.kind = 'correctness'" if config.reward.kind == "correctness" else "the self-distillation filter"
        raise config_error("data.answer_key", config.data.answer_key,
                           f"{source} has no such field (fields: {have}); {why} grades against answers"
                           + ("; use reward.kind = 'agreement' for data without answers"
                              if config.reward.kind == "correctness" else ""))


DATA_ENDINGS = {".jsonl": "jsonl", ".json": "json", ".parquet": "parquet"}


def data_format(config: TrainConfig) -> str:
    """``data.format``, with "auto" resolved from the file's ending (raises if it cannot be)."""
    if config.data.format != "auto":
        return config.data.format
    ending = os.path.splitext(config.data.path or "")[1].lower()
    if ending not in DATA_ENDINGS:
        raise config_error("data.format", "auto", f"cannot tell the format of {config.data.path!r} from its ending; "
                                                  f"set data.format to one of {', '.join(DATA_ENDINGS.values())}")
    return DATA_ENDINGS[ending]


def check_paths(config: TrainConfig) -> None:
    """The start-of-run check that the model and the prompt file exist (not part of validation, so the
    shipped recipes, whose paths are placeholders, validate and ``--dry-run`` anywhere)."""
    path = config.model.path
    if path is not None and not config.model.tiny and not os.path.isfile(os.path.join(path, "config.json")):
        raise config_error("model.path", path, "no model directory with a config.json there; set it with "
                                               "--set model.path=DIR (the shipped recipes carry a placeholder)")
    if not os.path.isfile(config.data.path or ""):
        raise config_error("data.path", config.data.path, "no such file; set it with --set data.path=FILE")
    data_format(config)


def shipped_configs() -> list[str]:
    """The YAML files in trainer/configs/, sorted."""
    return sorted(os.path.join(CONFIG_DIR, n) for n in os.listdir(CONFIG_DIR) if n.endswith((".yaml", ".yml")))
