"""A rollout engine: one vLLM ``LLM`` in RLKV's gated mode at the training window.

It samples with ``logprobs_mode="processed_logprobs"``, so the log-prob of each sampled token is
taken from the distribution it was really drawn from (after temperature, top-k and top-p; see
``sampling``), and takes the learner's gates after every step through ``collective_rpc``. The
checksum every worker reads back from its gate buffer is compared with the sender's, and the gate
version is kept with every sample. ``rlkv_trainer.actors`` wraps it as a Ray actor; tests drive it
directly. It uses vLLM's public API only: ``LLM``, ``SamplingParams``, ``TokensPrompt``, the
attention-backend flag and the plugin's worker-extension RPCs.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from rlkv_vllm.core.gates import checked_gates, gate_rows, gates_checksum
from rlkv_vllm.core.patterns import HeadPattern

from .sampling import SamplingSpec

# vLLM's reserved plugin backend member: RLKV on every supported release (0.32+ also accepts "rlkv")
ATTENTION_BACKEND = "CUSTOM"
# the checksum is a float64 sum of float32 gates, read back from the worker's buffer
CHECKSUM_TOLERANCE = 1e-6


class GateSyncError(RuntimeError):
    """A worker's gates differ from what was sent. The message is one line."""


@dataclass(frozen=True)
class Sample:
    """One sampled completion.

    prompt_index: the prompt's index in the step's batch; completion: token ids; logprobs: each
    token's log-prob under the sampled distribution; gate_version: the gates it was sampled with.
    """

    prompt_index: int
    prompt: list[int]
    completion: list[int]
    logprobs: list[float]
    finish_reason: str
    gate_version: int


class RolloutEngine:
    """One vLLM engine in gated mode.

    model: a local model path; sink, recent: the training window; engine_kwargs: the rest of
    ``LLM(...)`` (dtype, memory, max_num_seqs, max_model_len, enforce_eager...); work_dir: where
    the starting pattern (every gate 1) is written.
    """

    def __init__(self, model: str, *, sink: int, recent: int, work_dir: str, model_id: str = "",
                 engine_kwargs: dict[str, Any] | None = None, sleep_level: int = 0) -> None:
        from vllm import LLM

        from transformers import AutoConfig

        cfg = AutoConfig.from_pretrained(model)
        text = getattr(cfg, "text_config", None) or cfg
        self.shape = (int(text.num_hidden_layers), int(getattr(text, "num_key_value_heads",
                                                               text.num_attention_heads)))
        os.makedirs(work_dir, exist_ok=True)
        start = os.path.join(work_dir, "rollout-start-pattern.json")
        HeadPattern(np.ones(self.shape, dtype=np.float32),
                    {"model_id": model_id or model, "source": "rlkv train: every gate 1 until the first push"}).save(start)
        rlkv = {"heads": start, "mode": "gated", "sink": sink, "recent": recent}
        kwargs = dict(engine_kwargs or {})
        kwargs.setdefault("enable_prefix_caching", False)
        if sleep_level:
            kwargs["enable_sleep_mode"] = True  # vLLM's CuMem pools: weights and KV cache can be released
        self.sleep_level = sleep_level
        self.sleeping = False
        self.llm = LLM(model=model, attention_backend=ATTENTION_BACKEND, additional_config={"rlkv": rlkv},
                       logprobs_mode="processed_logprobs", **kwargs)
        self.gate_version = 0

    def set_gates(self, gates: Any, version: int) -> float:
        """Push [L, H_kv] gates to every worker; returns the checksum after checking each worker's."""
        g = checked_gates(gates, *self.shape)
        want = gates_checksum(g)
        got = self.llm.collective_rpc("rlkv_set_gates", args=(gate_rows(g),))
        bad = [(rank, c) for rank, c in enumerate(got) if abs(float(c) - want) > CHECKSUM_TOLERANCE]
        if bad:
            rank, c = bad[0]
            raise GateSyncError(f"gate version {version}: worker rank {rank} reports checksum {c:.9g}, "
                                f"the learner sent {want:.9g}")
        self.gate_version = version
        return want

    def generate(self, prompts: list[list[int]], spec: SamplingSpec, *, n: int, max_tokens: int,
                 seeds: list[int]) -> list[Sample]:
        """``n`` samples of each prompt (token ids), seeded per prompt so a redone step samples the same."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        params = [SamplingParams(n=n, max_tokens=max_tokens, logprobs=0, seed=seed, **spec.vllm_kwargs())
                  for seed in seeds]
        outs = self.llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
        samples = []
        for i, out in enumerate(outs):
            for c in out.outputs:
                ids = list(c.token_ids)
                lps = [float(step[tok].logprob) for tok, step in zip(ids, c.logprobs)]
                samples.append(Sample(prompt_index=i, prompt=list(prompts[i]), completion=ids, logprobs=lps,
                                      finish_reason=str(c.finish_reason), gate_version=self.gate_version))
        return samples

    def sleep(self) -> float:
        """Release the engine's GPU memory for the learner's phase (vLLM sleep mode); returns seconds.

        Level 1 offloads the weights to host memory and drops the KV cache (rings included: no request
        outlives a rollout); level 2 drops the weights too, and ``wake_up`` reloads them from the model path.
        The gate buffer is dropped with them at level 2; the run pushes the gates after every wake.
        """
        if not self.sleep_level:
            raise RuntimeError("this rollout engine was built without sleep mode (sleep_level 0)")
        if self.sleeping:
            return 0.0
        t0 = time.perf_counter()
        self.llm.sleep(level=self.sleep_level)
        self.sleeping = True
        return time.perf_counter() - t0

    def wake_up(self) -> float:
        """Reallocate what ``sleep`` released (and reload the weights after level 2); returns seconds.
        A no-op on an awake engine (a worker restarted while the run slept starts awake)."""
        if not self.sleeping:
            return 0.0
        t0 = time.perf_counter()
        if self.sleep_level == 2:
            # weights first, reloaded from disk into the same addresses, then the KV cache: never both
            # at once, as vLLM's RLHF examples do, so the peak stays the engine's own
            self.llm.wake_up(tags=["weights"])
            self.llm.collective_rpc("reload_weights")
            self.llm.wake_up(tags=["kv_cache"])
        else:
            self.llm.wake_up()
        self.sleeping = False
        self.gate_version = -1 if self.sleep_level == 2 else self.gate_version  # the gates must be pushed again
        return time.perf_counter() - t0

    def shutdown(self) -> None:
        engine_core = getattr(getattr(self.llm, "llm_engine", None), "engine_core", None)
        if engine_core is not None:
            engine_core.shutdown()
