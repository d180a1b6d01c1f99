"""Ray actors: rollout workers that are restarted when they die, and bounded waits on every call.

``RolloutPool`` is the driver's handle on N rollout workers (each a ``RolloutEngine`` in a Ray
actor with ``max_restarts``). Every remote wait has a timeout and fails with one line naming the
worker. A worker that dies mid-step is restarted by Ray; the pool waits for it, pushes the current
gates again (a restarted actor starts from the all-ones pattern), checks the checksum, and redoes
its share of the step with the same seeds, so the step's samples are the ones an uninterrupted run
draws.
"""

from __future__ import annotations

import os
import time
from typing import Any

from .rollout import RolloutEngine, Sample
from .sampling import SamplingSpec


class WorkerError(RuntimeError):
    """A rollout worker failed or did not answer in time. The message is one line."""


class RolloutWorker:
    """The object each rollout actor holds (constructed again by Ray after a restart)."""

    def __init__(self, index: int, model: str, sink: int, recent: int, work_dir: str, model_id: str,
                 engine_kwargs: dict[str, Any]) -> None:
        self.index = index
        self.engine = RolloutEngine(model, sink=sink, recent=recent, work_dir=os.path.join(work_dir, f"w{index}"),
                                    model_id=model_id, engine_kwargs=engine_kwargs)

    def info(self) -> tuple[int, int]:
        """(pid, gate version held)."""
        return os.getpid(), self.engine.gate_version

    def set_gates(self, rows: list[list[float]], version: int) -> float:
        return self.engine.set_gates(rows, version)

    def generate(self, prompts: list[list[int]], spec: SamplingSpec, n: int, max_tokens: int,
                 seeds: list[int], prompt_offset: int) -> list[Sample]:
        samples = self.engine.generate(prompts, spec, n=n, max_tokens=max_tokens, seeds=seeds)
        # indices into the whole step's prompt list
        return [Sample(s.prompt_index + prompt_offset, s.prompt, s.completion, s.logprobs, s.finish_reason,
                       s.gate_version) for s in samples]


def _shards(n: int, parts: int) -> list[tuple[int, int]]:
    """[start, end) of ``parts`` contiguous shards of ``n`` items (earlier shards one larger)."""
    base, extra = divmod(n, parts)
    out, start = [], 0
    for i in range(parts):
        end = start + base + (1 if i < extra else 0)
        out.append((start, end))
        start = end
    return out


class RolloutPool:
    """N rollout actors.

    actor_options: Ray options of each actor (num_cpus, num_gpus, runtime_env, ...);
    timeout_s: the longest any single remote call may take; start_timeout_s: an engine's start.
    """

    def __init__(self, num_workers: int, worker_kwargs: dict[str, Any], *, actor_options: dict[str, Any],
                 timeout_s: float, start_timeout_s: float, max_restarts: int = 3) -> None:
        import ray

        self.ray = ray
        cls = ray.remote(max_restarts=max_restarts, max_task_retries=0, **actor_options)(RolloutWorker)
        self.workers = [cls.remote(i, **worker_kwargs) for i in range(num_workers)]
        self.timeout_s, self.start_timeout_s = timeout_s, start_timeout_s
        self.max_restarts = max_restarts
        self.restarts = 0
        self.gates: list[list[float]] | None = None
        self.gate_version = 0
        self.pids = [self._get(i, w.info.remote(), "start", start_timeout_s)[0] for i, w in enumerate(self.workers)]

    def _get(self, index: int, ref: Any, what: str, timeout: float) -> Any:
        ray = self.ray
        try:
            return ray.get(ref, timeout=timeout)
        except ray.exceptions.GetTimeoutError:
            ray.cancel(ref, force=True)
            raise WorkerError(f"rollout worker {index} did not answer {what} within {timeout:.0f} s") from None

    def push(self, rows: list[list[float]], version: int) -> tuple[float, float]:
        """Send the gates to every worker; returns (checksum, seconds). Each worker checks its checksum."""
        t0 = time.perf_counter()
        self.gates, self.gate_version = rows, version
        refs = [w.set_gates.remote(rows, version) for w in self.workers]
        sums = [self._call_with_restart(i, refs[i], "set_gates", lambda i=i: self.workers[i].set_gates.remote(
            rows, version)) for i in range(len(self.workers))]
        return sums[0], time.perf_counter() - t0

    def _resync(self, index: int) -> None:
        """A restarted worker: wait for its engine (Ray answers "restarting" until it is up), then give
        it the current gates."""
        ray = self.ray
        deadline = time.monotonic() + self.start_timeout_s
        while True:
            try:
                pid, version = self._get(index, self.workers[index].info.remote(), "start after a restart",
                                         max(1.0, deadline - time.monotonic()))
                break
            except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError):
                if time.monotonic() > deadline:
                    raise WorkerError(f"rollout worker {index} did not come back within "
                                      f"{self.start_timeout_s:.0f} s of a restart") from None
                time.sleep(1.0)
        self.pids[index] = pid
        if self.gates is not None and version != self.gate_version:
            self._get(index, self.workers[index].set_gates.remote(self.gates, self.gate_version), "set_gates",
                      self.timeout_s)

    def _call_with_restart(self, index: int, ref: Any, what: str, again: Any) -> Any:
        ray = self.ray
        for attempt in range(self.max_restarts + 1):
            try:
                return self._get(index, ref, what, self.timeout_s)
            except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError) as e:
                if attempt == self.max_restarts:
                    raise WorkerError(f"rollout worker {index} died during {what} and did not come back after "
                                      f"{self.max_restarts} restarts: {type(e).__name__}") from None
                self.restarts += 1
                self._resync(index)
                ref = again()
        raise AssertionError("unreachable")

    def generate(self, prompts: list[list[int]], spec: SamplingSpec, *, n: int, max_tokens: int,
                 seeds: list[int]) -> list[Sample]:
        """``n`` samples per prompt, the prompts split over the workers; a dead worker's share is redone."""
        shards = _shards(len(prompts), len(self.workers))

        def call(i: int) -> Any:
            s, e = shards[i]
            return self.workers[i].generate.remote(prompts[s:e], spec, n, max_tokens, seeds[s:e], s)

        refs = [call(i) for i in range(len(self.workers))]
        out: list[Sample] = []
        for i in range(len(self.workers)):
            out.extend(self._call_with_restart(i, refs[i], "generate", lambda i=i: call(i)))
        return out

    def shutdown(self) -> None:
        for w in self.workers:
            try:
                self.ray.kill(w, no_restart=True)
            except Exception:  # noqa: BLE001 - already gone
                pass
