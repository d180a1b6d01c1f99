"""The training run behind ``rlkv train``: Ray, rollout workers, the learner, rewards, the loop.

One step (synchronous mode): the step's prompts, ``group_size`` samples of each from the rollout
workers (vLLM gated mode, the current gates, seeds derived from (run seed, step, prompt id) so a
redone step draws the same samples), raw rewards from the grader, one learner update, the new gates
pushed to every worker (checksums checked, version = step), one metrics row, and a checkpoint every
``run.checkpoint_every`` steps. ``--resume`` continues from the last checkpoint exactly (gates,
optimiser, data position, RNGs). At the end: ``pattern.json``, ``gates.png``, ``curves.png``.

The agreement reward's reference answers (what the model says with every gate 1) are sampled once
per prompt before the first step, and kept in ``reference-answers.json`` for a resume.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import os
import shutil
import sys
import time
from typing import Any

from .config import TrainConfig, TrainConfigError, config_to_dict, with_model_path

# environment the Ray actors need from the driver (the CPU's OpenMP preload, tokenizer and vLLM settings)
FORWARDED_ENV = ("LD_PRELOAD", "PYTHONPATH", "TOKENIZERS_PARALLELISM", "VLLM_CPU_KVCACHE_SPACE", "VLLM_LOGGING_LEVEL",
                 "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "TRITON_F32_DEFAULT", "RLKV_CUDA_CACHE")
REFERENCE_FILE = "reference-answers.json"
WORKERS_FILE = "workers.json"
DUMMY_WEIGHTS = "dummy-weights"  # model.load_format dummy: the learner's random weights, for the rollout engines


def stable_seed(*parts: Any) -> int:
    """A 31-bit seed from the parts, the same in every process and Python version."""
    return int(hashlib.sha256(":".join(map(str, parts)).encode()).hexdigest()[:8], 16) & 0x7FFFFFFF


def _say(msg: str) -> None:
    print(f"[rlkv train] {msg}", file=sys.stderr, flush=True)


def _device(cfg: TrainConfig) -> str:
    if cfg.learner.device != "auto":
        return cfg.learner.device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _model_path(cfg: TrainConfig) -> TrainConfig:
    """Build the tiny model where the config asks for it (idempotent)."""
    if not cfg.model.tiny:
        return cfg
    from rlkv_vllm.tiny_model import TinyModelSpec, build_tiny_model

    path = cfg.model.path or os.path.join(os.path.expanduser("~"), ".cache", "rlkv_vllm", "tiny-model")
    return with_model_path(cfg, build_tiny_model(path, TinyModelSpec()))


class LearnerActor:
    """The learner inside its Ray actor: the policy is built there, on its device."""

    def __init__(self, cfg_dict: dict[str, Any], model_path: str, device: str) -> None:
        import torch

        from .config import parse_config
        from .learner import Learner
        from .objective import Objective
        from .policy import GatedPolicy
        from .sampling import SamplingSpec

        cfg = parse_config(cfg_dict)
        torch.manual_seed(cfg.run.seed)
        dtype = getattr(torch, cfg.learner.dtype)
        policy = GatedPolicy.from_pretrained(model_path, dtype=dtype, device=device, sink=cfg.rollout.sink,
                                             dummy_weights=cfg.model.load_format == "dummy", seed=cfg.run.seed,
                                             recent=cfg.rollout.recent,
                                             gradient_checkpointing=cfg.learner.gradient_checkpointing,
                                             attention=cfg.learner.attention)
        s, o = cfg.rollout.sampling, cfg.optim
        self.learner = Learner(policy, Objective(cfg.objective), spec=SamplingSpec(s.temperature, s.top_k, s.top_p),
                               lr=o.lr, weight_decay=o.weight_decay, betas=tuple(o.betas), eps=o.eps,
                               grad_clip=o.grad_clip, micro_batch_tokens=cfg.learner.micro_batch_tokens)

    def gates(self) -> list[list[float]]:
        return self.learner.gates()

    def export_weights(self, out_dir: str, source_dir: str) -> str:
        return self.learner.policy.export_weights(out_dir, source_dir)

    def step(self, samples: list[Any], rewards: list[float]) -> dict[str, Any]:
        return self.learner.step(samples, rewards)

    def state_dict(self) -> dict[str, Any]:
        return self.learner.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.learner.load_state_dict(state)


class Run:
    """One ``rlkv train`` run (see the module docstring)."""

    def __init__(self, cfg: TrainConfig, out_dir: str, *, resume: bool = False) -> None:
        if cfg.rollout.sleep and _device(cfg) == "cpu":
            raise TrainConfigError("train.rollout.sleep = true is not allowed: vLLM's sleep mode needs a CUDA GPU "
                                   "and this run rolls out on the CPU; use false")
        if cfg.learner.attention == "flex" and _device(cfg) == "cpu":
            raise TrainConfigError("train.learner.attention = 'flex' is not allowed: FlexAttention runs on CUDA and "
                                   "learner.device = 'auto' found none; use 'batched' or 'auto'")
        self.cfg = _model_path(cfg)
        self.out_dir = out_dir
        self.resume = resume
        os.makedirs(out_dir, exist_ok=True)

    # ------------------------------------------------------------------ setup
    def _prompts(self) -> tuple[list[Any], dict[str, list[int]]]:
        from transformers import AutoTokenizer

        from .data import PromptFormat, load_prompts, render_prompts

        cfg = self.cfg
        records = load_prompts(cfg.data.path)
        records = [dataclasses.replace(r, prompt=cfg.data.prompt_template.replace("{prompt}", r.prompt))
                   for r in records]
        tok = AutoTokenizer.from_pretrained(cfg.model.path)
        if cfg.data.chat_template:
            rendered = {p.record.id: p.token_ids
                        for p in render_prompts(tok, records, PromptFormat(system_prompt=cfg.data.system_prompt))}
        else:
            rendered = {r.id: list(tok(r.prompt, add_special_tokens=True)["input_ids"]) for r in records}
        kept = [r for r in records if len(rendered[r.id]) <= cfg.data.max_prompt_tokens]
        if cfg.data.max_prompts is not None:
            kept = kept[: cfg.data.max_prompts]
        if not kept:
            raise TrainConfigError(f"train.data.max_prompt_tokens = {cfg.data.max_prompt_tokens} is not allowed: it "
                                   f"leaves none of the {len(records)} prompts of {cfg.data.path}")
        self.tokenizer = tok
        return kept, rendered

    def _ray(self) -> Any:
        import ray

        cfg = self.cfg.ray
        env = {k: os.environ[k] for k in FORWARDED_ENV if k in os.environ}
        kwargs: dict[str, Any] = dict(address=cfg.address or "local", include_dashboard=cfg.include_dashboard,
                                      runtime_env={"env_vars": env}, log_to_driver=True)
        if cfg.address is None:
            kwargs.update(num_cpus=cfg.num_cpus, num_gpus=cfg.num_gpus, object_store_memory=cfg.object_store_memory)
        ray.init(**{k: v for k, v in kwargs.items() if v is not None}, ignore_reinit_error=True)
        self.runtime_env = {"env_vars": env}
        return ray

    def _engine_kwargs(self) -> dict[str, Any]:
        r, device = self.cfg.rollout, _device(self.cfg)
        kw: dict[str, Any] = dict(dtype=self.cfg.model.dtype, max_num_seqs=r.max_num_seqs,
                                  load_format=self.cfg.model.load_format,
                                  max_model_len=r.max_model_len, seed=self.cfg.run.seed,
                                  enforce_eager=r.enforce_eager if r.enforce_eager is not None else device == "cpu")
        if r.kv_cache_memory_bytes is not None:
            kw["kv_cache_memory_bytes"] = r.kv_cache_memory_bytes
        else:
            kw["gpu_memory_utilization"] = r.gpu_memory_utilization
        return kw

    # ------------------------------------------------------------------ run
    def run(self) -> str:
        from rlkv_vllm.core.gates import gates_checksum

        from . import checkpoint, outputs
        from .actors import RolloutPool
        from .data import PromptIterator, with_reference_answers
        from .grading import Grader
        from .rewards import build_reward, reference_answers
        from .run_log import RunLog
        from .sampling import SamplingSpec

        cfg, out = self.cfg, self.out_dir
        records, token_ids = self._prompts()
        ray = self._ray()
        r, t = cfg.rollout, cfg.run.timeouts
        s = r.sampling
        spec = SamplingSpec(s.temperature, s.top_k, s.top_p)
        device = _device(cfg)
        learner_opts = dict(num_cpus=cfg.learner.num_cpus, num_gpus=cfg.learner.num_gpus if device != "cpu" else 0,
                            runtime_env=self.runtime_env)
        strategies = self._placement(ray, device)
        learner = ray.remote(**learner_opts)(LearnerActor).options(scheduling_strategy=strategies[0]).remote(
            config_to_dict(cfg), cfg.model.path, device)
        rollout_model, engine_kwargs = cfg.model.path, self._engine_kwargs()
        if cfg.model.load_format == "dummy":
            # the learner's random weights, written once for the rollout engines: one model on both sides
            # (the out dir must be reachable from every worker, as it is for the workers' own files)
            rollout_model = ray.get(learner.export_weights.remote(os.path.join(out, DUMMY_WEIGHTS), cfg.model.path),
                                    timeout=t.startup_s)
            engine_kwargs["load_format"] = "auto"
        pool = RolloutPool(
            r.num_workers,
            dict(model=rollout_model, sink=r.sink, recent=r.recent, work_dir=os.path.join(out, "rollout"),
                 model_id=cfg.model.model_id or os.path.basename(cfg.model.path.rstrip("/")),
                 engine_kwargs=engine_kwargs, sleep_level=r.sleep_level if r.sleep else 0),
            actor_options=dict(num_cpus=r.num_cpus_per_worker, num_gpus=r.num_gpus_per_worker if device != "cpu" else 0,
                               runtime_env=self.runtime_env),
            timeout_s=t.rollout_s, start_timeout_s=t.startup_s, scheduling=strategies[1:])
        grader = Grader(cfg.reward.num_workers, timeout_s=cfg.reward.timeout_s)
        try:
            ray.get(learner.gates.remote(), timeout=t.startup_s)
            self._write_workers(pool)
            reward_fn = build_reward(cfg.reward.plugin if cfg.reward.kind == "plugin" else cfg.reward.kind, grader)
            if cfg.data.filter_n > 0:
                records = self._self_distillation(records, token_ids, pool, spec, grader)
            if cfg.reward.kind == "agreement":
                records = self._reference_answers(records, token_ids, pool, spec, grader, reference_answers,
                                                  with_reference_answers)
            it = PromptIterator(records, r.prompts_per_step, seed=cfg.data.shuffle_seed or 0,
                                shuffle=cfg.data.shuffle_seed is not None, num_epochs=cfg.run.epochs)
            total = it.steps_per_epoch * cfg.run.epochs
            if cfg.run.steps is not None:
                total = min(total, cfg.run.steps)
            start = 0
            state = checkpoint.load_latest(out) if self.resume else None
            if self.resume and state is None:
                raise TrainConfigError(f"--resume is not allowed here: {out} holds no checkpoint")
            if state is not None:
                ray.get(learner.load_state_dict.remote({"alpha": state.alpha, "optimizer": state.optimizer}),
                        timeout=t.learn_s)
                it.load_state_dict(state.data)
                checkpoint.restore_rng(state.rng)
                start = state.step
                _say(f"resumed from step {start} ({out})")
            log = RunLog(out, resume_after=start if state is not None else None)
            gates = ray.get(learner.gates.remote(), timeout=t.learn_s)
            pool.push(gates, version=start)
            k = cfg.run.staleness
            in_flight: collections.deque = collections.deque()

            def launch(step: int) -> None:
                """Submit step's rollouts; the data position after its batch is what a checkpoint of
                the step must hold (asynchronous runs have drawn later batches already)."""
                batch = next(it)
                pending = pool.submit([token_ids[rec.id] for rec in batch], spec, n=s.group_size,
                                      max_tokens=s.max_new_tokens,
                                      seeds=[stable_seed(cfg.run.seed, step, rec.id) for rec in batch])
                in_flight.append((step, batch, pending, it.state_dict()))

            for ahead in range(start + 1, min(start + k, total) + 1):
                launch(ahead)  # asynchronous: k steps sampled with the starting gates
            for step in range(start + 1, total + 1):
                if step + k <= total:
                    if k == 0:
                        launch(step)
                _, batch, pending, data_state = in_flight.popleft() if k == 0 else in_flight[0]
                samples = pool.collect(pending)
                rollout_s = time.perf_counter() - pending.started
                if k:
                    in_flight.popleft()
                    pool.settle()  # the previous step's push, queued behind this rollout: checksums checked
                    if step + k <= total:
                        launch(step + k)  # runs with the gates of step - 1 while the learner trains
                texts: list[list[str]] = [[] for _ in batch]
                for smp in samples:
                    texts[smp.prompt_index].append(self.tokenizer.decode(smp.completion, skip_special_tokens=True))
                t1 = time.perf_counter()
                result = reward_fn(list(zip(batch, texts)))
                reward_s = time.perf_counter() - t1
                per_prompt = [iter(rw) for rw in result.rewards]
                raw = [float(next(per_prompt[smp.prompt_index])) for smp in samples]
                # sleep mode (colocated, synchronous): the engines release their GPU memory while the
                # learner trains and take it back before the gates are pushed
                sleep_s = pool.sleep() if r.sleep else 0.0
                stats = ray.get(learner.step.remote(samples, raw), timeout=t.learn_s)
                gates = ray.get(learner.gates.remote(), timeout=t.learn_s)
                wake_s = pool.wake_up() if r.sleep else 0.0
                if k:
                    pool.push_async(gates, version=step)
                    push_s = 0.0  # it settles behind the next rollout: its time is the rollout's
                else:
                    _, push_s = pool.push(gates, version=step)
                checksum = gates_checksum(gates)  # what every worker confirmed (or confirms at the next settle)
                tokens = sum(len(smp.completion) for smp in samples)
                row = {
                    "epoch": (step - 1) // it.steps_per_epoch, "reward_mean": stats["reward_mean"],
                    "alpha_mean": stats["alpha_mean"], "alpha_min": stats["alpha_min"],
                    "penalty": stats.get("penalty", 0.0), "loss": stats.get("loss", 0.0),
                    "pg_loss": stats.get("pg_loss", 0.0), "grad_norm": stats["grad_norm"],
                    "logprob_diff_max": stats.get("logprob_diff_max", 0.0),
                    "logprob_diff_mean": stats.get("logprob_diff_mean", 0.0),
                    "masked_share": stats.get("masked_fraction", 0.0),
                    "truncated_share": stats.get("truncated_fraction", 0.0),
                    "ratio_max": stats.get("ratio_max", 0.0), "response_tokens": tokens,
                    "rollout_s": rollout_s, "rollout_tok_s": tokens / max(rollout_s, 1e-9), "reward_s": reward_s,
                    "learn_s": stats["learn_s"], "learner_peak_gib": stats.get("peak_memory_gib", 0.0),
                    "gate_push_s": push_s, "sleep_s": sleep_s, "wake_s": wake_s, "gate_version": step,
                    # learner version that trained these samples minus the version they were sampled with
                    "staleness": max(step - 1 - smp.gate_version for smp in samples) if samples else 0,
                    "gates_checksum": checksum, "worker_restarts": pool.restarts,
                }
                log.log(step, row, total_steps=total)
                self._write_workers(pool)
                if cfg.run.checkpoint_every and (step % cfg.run.checkpoint_every == 0 or step == total):
                    ls = ray.get(learner.state_dict.remote(), timeout=t.learn_s)
                    checkpoint.save(out, checkpoint.TrainState(step, step, ls["alpha"], ls["optimizer"],
                                                               data_state, checkpoint.capture_rng()))
            if k:
                pool.settle()
            log.close()
            final = ray.get(learner.gates.remote(), timeout=t.learn_s)
            _say(f"final gates: mean {sum(map(sum, final)) / sum(map(len, final)):.4f}, checksum "
                 f"{gates_checksum(final):.6f}")
            path = outputs.write_pattern(out, final, model_id=cfg.model.model_id or os.path.basename(
                cfg.model.path.rstrip("/")), sink=r.sink, recent=r.recent, step=total,
                training_config=config_to_dict(cfg))
            outputs.plot_gates(out, final)
            if log.rows:
                outputs.plot_curves(out, log.rows)
            _say(f"wrote {path}")
            return path
        finally:
            grader.close()
            pool.shutdown()
            try:
                ray.kill(learner)
            except Exception:  # noqa: BLE001 - already gone
                pass
            if getattr(self, "placement_group", None) is not None:
                ray.util.remove_placement_group(self.placement_group)
            ray.shutdown()
            shutil.rmtree(os.path.join(out, DUMMY_WEIGHTS), ignore_errors=True)  # a model's size of scratch

    def _placement(self, ray: Any, device: str) -> list[Any]:
        """One placement group for the run's actors, the learner first (bundle 0) then each rollout
        worker: colocated on a GPU, one bundle holding them all (fractional GPU shares inside it);
        otherwise a bundle each, packed onto as few nodes as fit. A group the cluster cannot hold
        fails within the startup timeout with one line, instead of actors pending forever."""
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        r, lc = self.cfg.rollout, self.cfg.learner
        gpu = device != "cpu"

        def bundle(cpus: float, gpus: float) -> dict[str, float]:
            return {"CPU": cpus, **({"GPU": gpus} if gpu and gpus > 0 else {})}

        if r.colocate and gpu:
            bundles = [bundle(lc.num_cpus + r.num_workers * r.num_cpus_per_worker, 1.0)]
            index = [0] * (1 + r.num_workers)
        else:
            bundles = [bundle(lc.num_cpus, lc.num_gpus)] + [bundle(r.num_cpus_per_worker, r.num_gpus_per_worker)
                                                           for _ in range(r.num_workers)]
            index = list(range(1 + r.num_workers))
        pg = placement_group(bundles, strategy="PACK")
        try:
            ray.get(pg.ready(), timeout=self.cfg.run.timeouts.startup_s)
        except ray.exceptions.GetTimeoutError:
            ray.util.remove_placement_group(pg)
            raise TrainConfigError(
                f"train.rollout.num_workers = {r.num_workers} is not allowed on this Ray cluster: the run's actors "
                f"need {bundles} (learner first), the cluster has {ray.cluster_resources()}") from None
        self.placement_group = pg
        return [PlacementGroupSchedulingStrategy(placement_group=pg, placement_group_bundle_index=i) for i in index]

    def _write_workers(self, pool: Any) -> None:
        """The rollout workers' pids (a supervisor, or the fault test, reads them)."""
        tmp = os.path.join(self.out_dir, WORKERS_FILE + ".tmp")
        with open(tmp, "w") as f:
            json.dump({"pids": pool.pids, "restarts": pool.restarts}, f)
        os.replace(tmp, os.path.join(self.out_dir, WORKERS_FILE))

    def _self_distillation(self, records: list[Any], token_ids: dict[str, list[int]], pool: Any, spec: Any,
                           grader: Any) -> list[Any]:
        """Keep the prompts the model with every gate 1 solves in >= k of n samples (the paper's recipe),
        cached by (data, model, k, n, sampling) under ``DIR/../.rlkv-filter`` so runs share it."""
        from .data import FilterKey, data_fingerprint, self_distill_filter
        from .rewards import CorrectnessReward

        cfg, s = self.cfg, self.cfg.rollout.sampling
        n, k = cfg.data.filter_n, cfg.data.filter_k
        key = FilterKey(data_fingerprint(cfg.data.path), cfg.model.model_id or cfg.model.path, k, n,
                        {**spec.vllm_kwargs(), "max_tokens": s.max_new_tokens, "seed": cfg.run.seed,
                         "template": cfg.data.prompt_template, "system": cfg.data.system_prompt})

        def correctness(recs: Any) -> dict[str, list[bool]]:
            samples = pool.generate([token_ids[r.id] for r in recs], spec, n=n, max_tokens=s.max_new_tokens,
                                    seeds=[stable_seed(cfg.run.seed, "filter", r.id) for r in recs])
            texts: list[list[str]] = [[] for _ in recs]
            for smp in samples:
                texts[smp.prompt_index].append(self.tokenizer.decode(smp.completion, skip_special_tokens=True))
            result = CorrectnessReward(grader)(list(zip(recs, texts)))
            return {r.id: [v > 0.5 for v in rw] for r, rw in zip(recs, result.rewards)}

        kept, hit = self_distill_filter(records, key, os.path.join(os.path.dirname(self.out_dir), ".rlkv-filter"),
                                        correctness)
        _say(f"self-distillation filter ({k} of {n}{', cached' if hit else ''}): {len(kept)} of {len(records)} "
             "prompts kept")
        if len(kept) < cfg.rollout.prompts_per_step:
            raise TrainConfigError(f"train.data.filter_k = {k} is not allowed here: the filter keeps {len(kept)} "
                                   f"prompts, fewer than rollout.prompts_per_step = {cfg.rollout.prompts_per_step}")
        return kept

    def _reference_answers(self, records: list[Any], token_ids: dict[str, list[int]], pool: Any, spec: Any,
                           grader: Any, reference_answers: Any, with_reference_answers: Any) -> list[Any]:
        """What the model with every gate 1 answers, once per prompt (cached for a resume)."""
        path = os.path.join(self.out_dir, REFERENCE_FILE)
        if os.path.exists(path):
            with open(path) as f:
                cached = json.load(f)
            if set(cached) == {r.id for r in records}:
                return with_reference_answers(records, [cached[r.id] for r in records])
        s = self.cfg.rollout.sampling
        n = self.cfg.reward.agreement_samples
        samples = pool.generate([token_ids[r.id] for r in records], spec, n=n, max_tokens=s.max_new_tokens,
                                seeds=[stable_seed(self.cfg.run.seed, "reference", r.id) for r in records])
        groups: list[list[str]] = [[] for _ in records]
        for smp in samples:
            groups[smp.prompt_index].append(self.tokenizer.decode(smp.completion, skip_special_tokens=True))
        answers = reference_answers(grader, records, groups)
        with open(path, "w") as f:
            json.dump({r.id: a for r, a in zip(records, answers)}, f)
        _say(f"reference answers (every gate 1): {sum(a is not None for a in answers)} of {len(records)} prompts")
        return with_reference_answers(records, answers)
