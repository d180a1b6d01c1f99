"""The trainer's config: defaults are the paper's recipe, shipped YAMLs validate, --set overrides
nested keys with YAML-typed values, and every bad input is one line naming field, value and rule."""

from __future__ import annotations

import dataclasses
import os

import pytest

from rlkv_trainer.config import (
    CONFIG_DIR, TrainConfig, TrainConfigError, apply_overrides, check_data_fields, check_paths, config_to_dict,
    config_to_yaml, data_format, load_config, parse_config, shipped_configs, with_model_path,
)

TINY = os.path.join(CONFIG_DIR, "tiny.yaml")
LLAMA = os.path.join(CONFIG_DIR, "deepseek-r1-distill-llama-8b.yaml")
PATHS = {"model": {"path": "/m"}, "data": {"path": "/d.jsonl"}}


def refused(path: str = TINY, *overrides: str) -> str:
    with pytest.raises(TrainConfigError) as e:
        load_config(path, list(overrides))
    msg = str(e.value)
    assert "\n" not in msg
    return msg


# ---------------------------------------------------------------- defaults and shipped configs


def test_defaults_are_the_recipe():
    c = parse_config(PATHS)
    s = c.rollout.sampling
    assert (s.group_size, s.temperature, s.top_p, s.top_k, s.max_new_tokens) == (4, 1.0, 1.0, -1, 7168)
    assert (c.rollout.prompts_per_step, c.samples_per_step) == (32, 128)
    assert (c.rollout.sink, c.rollout.recent) == (128, 256)
    o = c.objective
    assert (o.clip, o.correction, o.ratio_threshold, o.tis_cap) == (0.4, "mask", 5.0, 2.0)
    assert (o.advantage, o.beta, o.tau, o.penalty_scope) == ("batch", 1e-3, 0.5, "micro_batch")
    assert (o.reward_scale, o.reward_bias) == (10.0, -0.5)
    assert (c.optim.lr, c.optim.weight_decay, c.optim.grad_clip) == (1e-2, 0.017, 1.0)
    assert (c.run.epochs, c.run.steps, c.run.staleness) == (2, None, 0)
    assert c.reward.kind == "correctness"
    assert c.ray.address is None


def test_config_is_frozen():
    c = parse_config(PATHS)
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.objective.clip = 0.2  # type: ignore[misc]


def test_shipped_configs_are_the_four():
    names = sorted(os.path.basename(p) for p in shipped_configs())
    assert names == ["deepseek-r1-distill-llama-8b.yaml", "deepseek-r1-distill-qwen-7b.yaml",
                     "qwen3-4b-thinking-2507.yaml", "tiny.yaml"]


@pytest.mark.parametrize("path", shipped_configs(), ids=os.path.basename)
def test_shipped_config_loads_and_round_trips(path, tmp_path):
    c = load_config(path)
    dumped = tmp_path / "resolved.yaml"
    dumped.write_text(config_to_yaml(c))
    assert load_config(str(dumped)) == c


@pytest.mark.parametrize("model_id, beta, tau, sampling", [
    ("deepseek-ai/DeepSeek-R1-Distill-Llama-8B", 1e-3, 0.5, (1.0, 1.0, -1)),
    ("deepseek-ai/DeepSeek-R1-Distill-Qwen-7B", 1e-3, 0.55, (1.0, 1.0, -1)),
    ("Qwen/Qwen3-4B-Thinking-2507", 2.5e-3, 0.5, (0.6, 0.95, 20)),
])
def test_recipes_per_model(model_id, beta, tau, sampling):
    c = load_config(os.path.join(CONFIG_DIR, model_id.split("/")[1].lower() + ".yaml"))
    assert c.model.model_id == model_id
    assert (c.objective.beta, c.objective.tau) == (beta, tau)
    s = c.rollout.sampling
    assert (s.temperature, s.top_p, s.top_k) == sampling
    assert (s.max_new_tokens, s.group_size, c.rollout.prompts_per_step, c.run.epochs) == (7168, 4, 32, 2)
    assert (c.optim.lr, c.optim.weight_decay) == (1e-2, 0.017)
    assert (c.objective.clip, c.objective.ratio_threshold) == (0.4, 5.0)
    assert c.model.path.startswith("/path/to/")  # a placeholder the user replaces


def test_tiny_config_is_a_cpu_smoke_run(tmp_path):
    c = load_config(TINY)
    assert c.model.tiny and c.model.path is None
    assert with_model_path(c, str(tmp_path)).model.path == str(tmp_path)  # what the trainer does once it is built
    assert c.run.steps == 2
    assert c.learner.device == "cpu" and c.learner.attention == "batched"
    assert c.rollout.num_gpus_per_worker == 0 and c.ray.num_gpus == 0
    assert c.ray.object_store_memory == 200 * 2**20
    assert c.rollout.kv_cache_memory_bytes == 64 * 2**20
    # the prompt file sits next to the config; relative paths resolve against the config's folder
    assert c.data.path == os.path.join(CONFIG_DIR, "tiny-prompts.jsonl") and os.path.isfile(c.data.path)
    assert c.reward.kind == "agreement"


# ---------------------------------------------------------------- --set


def test_set_overrides_nested_and_typed(tmp_path):
    c = load_config(TINY, [
        "rollout.sampling.top_k=20", "objective.clip=0.3", "rollout.colocate=true", "rollout.num_gpus_per_worker=0.5",
        "learner.num_gpus=0.5", "ray.num_gpus=1", "optim.betas=[0.9, 0.95]", "optim.lr=1e-3",
        "ray.object_store_memory=100MiB",
        "run.steps=null", "data.system_prompt=Think step by step.", "objective.correction=tis",
    ])
    assert c.rollout.sampling.top_k == 20 and isinstance(c.rollout.sampling.top_k, int)
    assert c.objective.clip == 0.3
    assert c.rollout.colocate is True
    assert c.optim.betas == (0.9, 0.95)
    assert c.optim.lr == 1e-3  # 1e-3 is a float here (plain YAML 1.1 would read a string)
    assert c.ray.object_store_memory == 100 * 2**20
    assert c.run.steps is None
    assert c.data.system_prompt == "Think step by step."
    assert c.objective.correction == "tis"
    # untouched keys keep the file's values
    assert c.rollout.sampling.max_new_tokens == 32


def test_set_later_wins_and_sections_merge():
    c = load_config(TINY, ["objective.clip=0.3", "objective.clip=0.2", "rollout.sampling={temperature: 0.7}"])
    assert c.objective.clip == 0.2
    assert c.rollout.sampling.temperature == 0.7 and c.rollout.sampling.max_new_tokens == 32


def test_set_paths_resolve_against_cwd(tmp_path):
    c = load_config(TINY, ["data.path=prompts.jsonl"], cwd=str(tmp_path))
    assert c.data.path == str(tmp_path / "prompts.jsonl")


def test_apply_overrides_leaves_the_input_alone():
    raw = {"objective": {"clip": 0.4}}
    out = apply_overrides(raw, ["objective.clip=0.1"])
    assert raw == {"objective": {"clip": 0.4}} and out["objective"]["clip"] == 0.1


def test_yaml_accepts_exponents_and_sizes(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("model: {path: /m}\ndata: {path: /d}\noptim: {lr: 1e-2}\nrollout: {kv_cache_memory_bytes: 4GiB}\n"
                 "ray: {object_store_memory: 2e8}\n")
    c = load_config(str(f))
    assert c.optim.lr == 0.01
    assert c.rollout.kv_cache_memory_bytes == 4 * 2**30
    assert c.ray.object_store_memory == 200_000_000


def test_dump_lists_every_section_in_order():
    d = config_to_dict(load_config(TINY))
    assert list(d) == [f.name for f in dataclasses.fields(TrainConfig)]
    assert d["optim"]["betas"] == [0.9, 0.999]


# ---------------------------------------------------------------- bad input: one line, field, value, rule


BAD = [
    # types and ranges
    ("objective.clip=-1", "train.objective.clip = -1 is not allowed: must be a number > 0"),
    ("objective.clip=abc", "train.objective.clip = 'abc' is not allowed: must be a number > 0"),
    ("objective.clip=.nan", "train.objective.clip = nan is not allowed: must be a number > 0"),
    ("objective.clip=true", "train.objective.clip = True is not allowed: must be a number > 0"),
    ("rollout.sampling.temperature=0", "train.rollout.sampling.temperature = 0 is not allowed: must be a number > 0"),
    ("rollout.sampling.top_p=1.5", "train.rollout.sampling.top_p = 1.5 is not allowed: must be a number in (0, 1]"),
    ("rollout.sampling.top_p=0", "train.rollout.sampling.top_p = 0 is not allowed: must be a number in (0, 1]"),
    ("rollout.sampling.top_k=0", "train.rollout.sampling.top_k = 0 is not allowed: must be -1 (off) or an "
                                 "integer >= 1"),
    ("rollout.sampling.top_k=-2", "train.rollout.sampling.top_k = -2 is not allowed: must be -1 (off) or an "
                                  "integer >= 1"),
    ("rollout.sampling.group_size=2.5", "train.rollout.sampling.group_size = 2.5 is not allowed: must be an "
                                        "integer >= 1"),
    ("rollout.num_workers=true", "train.rollout.num_workers = True is not allowed: must be an integer >= 1"),
    ("rollout.sink=0", "train.rollout.sink = 0 is not allowed: must be an integer >= 1"),
    ("rollout.gpu_memory_utilization=0", "train.rollout.gpu_memory_utilization = 0 is not allowed: "
                                         "must be a number in (0, 1]"),
    ("rollout.kv_cache_memory_bytes=lots", "train.rollout.kv_cache_memory_bytes = 'lots' is not allowed: must be an "
                                           'integer >= 1 (bytes, or a size such as "4GiB"), or null'),
    ("rollout.enforce_eager=maybe", "train.rollout.enforce_eager = 'maybe' is not allowed: must be true or false, "
                                    "or null (eager on CPU, CUDA graphs on GPU)"),
    ("rollout.sleep_level=3", "train.rollout.sleep_level = 3 is not allowed: must be one of 1, 2"),
    ("objective.tau=1.2", "train.objective.tau = 1.2 is not allowed: must be a number in [0, 1]"),
    ("objective.beta=-0.001", "train.objective.beta = -0.001 is not allowed: must be a number >= 0"),
    ("objective.ratio_threshold=1", "train.objective.ratio_threshold = 1 is not allowed: must be a number > 1"),
    ("objective.tis_cap=0.5", "train.objective.tis_cap = 0.5 is not allowed: must be a number >= 1"),
    ("objective.reward_scale=0", "train.objective.reward_scale = 0 is not allowed: must be a number > 0"),
    ("objective.correction=clip", "train.objective.correction = 'clip' is not allowed: must be one of mask, tis"),
    ("objective.advantage=token", "train.objective.advantage = 'token' is not allowed: must be one of batch, group"),
    ("objective.penalty_scope=step", "train.objective.penalty_scope = 'step' is not allowed: "
                                     "must be one of micro_batch, batch"),
    ("learner.attention=sdpa", "train.learner.attention = 'sdpa' is not allowed: must be one of auto, batched, flex"),
    ("learner.device=tpu", "train.learner.device = 'tpu' is not allowed: must be \"auto\", \"cpu\", \"cuda\" or "
                           "\"cuda:N\""),
    ("learner.dtype=int8", "train.learner.dtype = 'int8' is not allowed: must be one of bfloat16, float16, float32"),
    ("model.dtype=fp8", "train.model.dtype = 'fp8' is not allowed: must be one of auto, bfloat16, float16, float32"),
    ("model.tiny=1", "train.model.tiny = 1 is not allowed: must be true or false"),
    ("optim.lr=0", "train.optim.lr = 0 is not allowed: must be a number > 0"),
    ("optim.grad_clip=0", "train.optim.grad_clip = 0 is not allowed: must be a number > 0, or null (no clipping)"),
    ("optim.betas=[0.9, 1.0]", "train.optim.betas = [0.9, 1.0] is not allowed: must be a list of 2 numbers in [0, 1)"),
    ("optim.betas=0.9", "train.optim.betas = 0.9 is not allowed: must be a list of 2 numbers in [0, 1)"),
    ("reward.kind=llm", "train.reward.kind = 'llm' is not allowed: must be one of correctness, agreement, plugin"),
    ("reward.timeout_s=0", "train.reward.timeout_s = 0 is not allowed: must be a number > 0"),
    ("run.staleness=-1", "train.run.staleness = -1 is not allowed: must be an integer >= 0"),
    ("run.steps=0", "train.run.steps = 0 is not allowed: must be an integer >= 1, or null (run the epochs)"),
    ("run.timeouts.sync_s=-5", "train.run.timeouts.sync_s = -5 is not allowed: must be a number > 0"),
    ("ray.num_cpus=0", "train.ray.num_cpus = 0 is not allowed: must be an integer >= 1, or null (the machine's)"),
    ("ray.address=''", "train.ray.address = '' is not allowed: must be a Ray address string, or null "
                       "(start a local Ray)"),
    ("data.prompt_template=hello", "train.data.prompt_template = 'hello' is not allowed: "
                                   'must be a string containing "{prompt}"'),
    ("data.format=csv", "train.data.format = 'csv' is not allowed: must be one of auto, jsonl, json, parquet"),
    ("data.max_prompt_tokens=0", "train.data.max_prompt_tokens = 0 is not allowed: must be an integer >= 1"),
    # cross-field rules
    ("data.path=null", "train.data.path = None is not allowed: give the prompt file (jsonl, json or parquet)"),
    ("model.tiny=false", "train.model.path = None is not allowed: give the local model directory "
                         "(or set model.tiny = true)"),
    ("rollout.sampling.max_new_tokens=100", "train.rollout.max_model_len = 128 is not allowed: must hold "
                                            "data.max_prompt_tokens + rollout.sampling.max_new_tokens = 164"),
    ("learner.micro_batch_tokens=64", "train.learner.micro_batch_tokens = 64 is not allowed: a micro-batch must hold "
                                      "the longest sequence: at least data.max_prompt_tokens + "
                                      "rollout.sampling.max_new_tokens = 96"),
    ("rollout.sleep=true", "train.rollout.sleep = True is not allowed: sleeping frees GPU memory for a colocated "
                           "learner; set rollout.colocate = true"),
    ("ray.num_cpus=1", "train.ray.num_cpus = 1 is not allowed: the actors ask for 2 CPUs"),
    ("learner.attention=flex", "train.learner.attention = 'flex' is not allowed: FlexAttention runs on CUDA; "
                               "use 'batched' on the CPU"),
    ("reward.plugin=my.mod:fn", "train.reward.plugin = 'my.mod:fn' is not allowed: is only used with "
                                'reward.kind = "plugin"'),
]


@pytest.mark.parametrize("override, message", BAD, ids=[b[0] for b in BAD])
def test_bad_value_is_one_line(override, message):
    assert refused(TINY, override).startswith(message)


CROSS = [
    (["reward.kind=correctness", "data.answer_key=null"],
     "train.data.answer_key = None is not allowed: reward.kind = 'correctness' grades against answers"),
    (["reward.kind=plugin"], "train.reward.plugin = None is not allowed: reward.kind = \"plugin\" needs the function"),
    (["reward.kind=plugin", "reward.plugin=not a path"],
     "train.reward.plugin = 'not a path' is not allowed: must be a dotted path"),
    (["data.filter_n=2", "data.filter_k=3"],
     "train.data.filter_k = 3 is not allowed: must be at most data.filter_n = 2"),
    (["data.filter_n=4", "data.answer_key=null"],
     "train.data.filter_n = 4 is not allowed: the self-distillation filter grades against answers"),
    (["objective.advantage=group", "rollout.sampling.group_size=1"],
     "train.objective.advantage = 'group' is not allowed: a group baseline needs rollout.sampling.group_size >= 2"),
    (["rollout.colocate=true", "rollout.num_gpus_per_worker=1", "learner.num_gpus=0.5"],
     "train.rollout.colocate = True is not allowed: colocated actors share one GPU"),
    (["rollout.sleep=true", "rollout.colocate=true", "run.staleness=1"],
     "train.rollout.sleep = True is not allowed: a sleeping engine cannot roll out while the learner trains, and "
     "run.staleness = 1 overlaps the two; set run.staleness = 0 (synchronous)"),
]


@pytest.mark.parametrize("overrides, message", CROSS, ids=[" ".join(c[0]) for c in CROSS])
def test_cross_field_rules(overrides, message):
    assert refused(TINY, *overrides).startswith(message)


def test_gpu_accounting_on_a_local_ray():
    assert refused(LLAMA, "ray.num_gpus=1").startswith(
        "train.ray.num_gpus = 1 is not allowed: the actors ask for 2 GPUs")
    load_config(LLAMA, ["ray.num_gpus=2"])
    load_config(LLAMA, ["ray.num_gpus=1", "rollout.colocate=true", "rollout.num_gpus_per_worker=0.5",
                        "learner.num_gpus=0.5"])
    load_config(LLAMA, ["ray.num_gpus=1", "ray.address=auto"])  # a cluster's resources are not checked here


ALL_OBJECTIVE_KEYS = ("clip, correction, ratio_threshold, tis_cap, advantage, beta, tau, penalty_scope, "
                      "reward_scale, reward_bias")


def test_unknown_key_lists_the_allowed_ones():
    assert refused(TINY, "objective.cliprange=0.2") == (
        f"train.objective.cliprange is not a known key: allowed keys are {ALL_OBJECTIVE_KEYS}")
    assert refused(TINY, "optimizer.lr=1") == (
        "train.optimizer is not a known key: allowed keys are model, data, rollout, learner, objective, reward, optim, "
        "run, ray")
    assert refused(TINY, "rollout.sampling.n=8").startswith(
        "train.rollout.sampling.n is not a known key: allowed keys are temperature, top_p, top_k, max_new_tokens, "
        "group_size")


def test_unknown_key_in_the_file(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("model: {path: /m}\ndata: {path: /d}\nobjective:\n  clip: 0.4\n  kl_coef: 0.1\n")
    assert refused(str(f)) == f"train.objective.kl_coef is not a known key: allowed keys are {ALL_OBJECTIVE_KEYS}"


@pytest.mark.parametrize("text, message", [
    ("model: {path: /m\n", "is not allowed: not valid YAML:"),
    ("objective:\n  clip: 0.4\n  clip: 0.3\n", "is not allowed: not valid YAML: duplicate key 'clip' at line 3"),
    ("- a\n- b\n", "is not allowed: must be a YAML mapping of the sections model, data,"),
    ("rollout: 5\n", "train.rollout = 5 is not allowed: must be a mapping with keys num_workers,"),
])
def test_malformed_files(tmp_path, text, message):
    f = tmp_path / "c.yaml"
    f.write_text(text)
    assert message in refused(str(f))


def test_missing_file():
    assert refused("/nonexistent/c.yaml") == ("train.config = '/nonexistent/c.yaml' is not allowed: no such file: "
                                              "give a YAML config (see trainer/configs/)")


@pytest.mark.parametrize("override, message", [
    ("objective.clip", "--set 'objective.clip' is not allowed: must be key=value, e.g. objective.clip=0.3"),
    ("=3", "--set '=3' is not allowed: must be key=value"),
    ("rollout.sink.x=1", "--set 'rollout.sink.x' is not allowed: train.rollout.sink is a value, not a section"),
])
def test_malformed_set(override, message):
    assert refused(TINY, override).startswith(message)


def test_set_into_a_non_mapping_section(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("model: {path: /m}\ndata: {path: /d}\nrollout: 5\n")
    assert refused(str(f), "rollout.sink=4").startswith("train.rollout = 5 is not allowed: must be a mapping")


# ---------------------------------------------------------------- the data hook


def test_check_data_fields():
    c = load_config(TINY)  # agreement: answers not needed
    check_data_fields(c, {"prompt"}, "p.jsonl")
    with pytest.raises(TrainConfigError, match=r"^train.data.prompt_key = 'prompt' is not allowed: p.jsonl has no "
                                               r"such field \(fields: problem, solution\)"):
        check_data_fields(c, {"problem", "solution"}, "p.jsonl")
    graded = load_config(TINY, ["reward.kind=correctness"])
    check_data_fields(graded, {"prompt", "answer"}, "p.jsonl")
    with pytest.raises(TrainConfigError, match="reward.kind = 'correctness' grades against answers; use reward.kind "
                                               "= 'agreement' for data without answers"):
        check_data_fields(graded, {"prompt"}, "p.jsonl")


def test_check_paths(tmp_path):
    check_paths(load_config(TINY))  # the tiny model is built by the trainer; its prompts ship
    recipe = load_config(LLAMA)
    with pytest.raises(TrainConfigError, match=r"^train.model.path = '/path/to/DeepSeek-R1-Distill-Llama-8B' is not "
                                               r"allowed: no model directory with a config.json there"):
        check_paths(recipe)
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(TrainConfigError, match=r"^train.data.path = '/path/to/Sampled-Laser-Dataset.jsonl' is not "
                                               r"allowed: no such file"):
        check_paths(load_config(LLAMA, [f"model.path={tmp_path}"]))
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("")
    with pytest.raises(TrainConfigError, match=r"^train.data.format = 'auto' is not allowed: cannot tell the format"):
        check_paths(load_config(LLAMA, [f"model.path={tmp_path}", f"data.path={prompts}"]))
    assert data_format(load_config(LLAMA, [f"data.path={prompts}", "data.format=jsonl"])) == "jsonl"
    assert data_format(load_config(TINY)) == "jsonl"
