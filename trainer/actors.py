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
from dataclasses import dataclass
from typing import Any

from .rollout import RolloutEngine, Sample
from .sampling import SamplingSpec


class WorkerError(RuntimeError):
    """A rollout worker failed or did not answer in time. The message is one line."""


class RolloutWorker:
    """The object each rollout actor holds (constructed again by Ray after a restart)."""

    def __init__(self, index: int, model: str, sink: int, recent: int, work_dir: str, model_id: str,
                 engine_kwargs: dict[str, Any], sleep_level: int = 0) -> None:
        self.index = index
        self.engine = RolloutEngine(model, sink=sink, recent=recent, work_dir=os.path.join(work_dir, f"w{index}"),
                                    model_id=model_id, engine_kwargs=engine_kwargs, sleep_level=sleep_level)

    def info(self) -> tuple[int, int]:
        """(pid, gate version held)."""
        return os.getpid(), self.engine.gate_version

    def set_gates(self, rows: list[list[float]], version: int) -> float:
        return self.engine.set_gates(rows, version)

    def sleep(self) -> float:
        return self.engine.sleep()

    def wake_up(self) -> float:
        return self.engine.wake_up()

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


@dataclass
class PendingRollout:
    """A submitted rollout: one Ray reference per worker, the call that redoes each, when it started."""

    refs: list[Any]
    calls: list[Any]
    started: float


class RolloutPool:
    """N rollout actors.

    actor_options: Ray options of each actor (num_cpus, num_gpus, runtime_env, ...);
    timeout_s: the longest any single remote call may take; start_timeout_s: an engine's start.
    """

    def __init__(self, num_workers: int, worker_kwargs: dict[str, Any], *, actor_options: dict[str, Any],
                 timeout_s: float, start_timeout_s: float, max_restarts: int = 3,
                 scheduling: list[Any] | None = None) -> None:
        import ray

        self.ray = ray
        cls = ray.remote(max_restarts=max_restarts, max_task_retries=0, **actor_options)(RolloutWorker)
        # scheduling: one Ray scheduling strategy per worker (its placement-group bundle); a restarted
        # actor comes back in the same bundle
        self.workers = [(cls.options(scheduling_strategy=scheduling[i]) if scheduling else cls).remote(i, **worker_kwargs)
                        for i in range(num_workers)]
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
        except ray.exceptions.RayTaskError as e:  # the method raised inside the worker: its own one line
            cause = e.cause if getattr(e, "cause", None) is not None else e
            raise WorkerError(f"rollout worker {index}: {what} failed: {type(cause).__name__}: "
                              f"{' '.join(str(cause).split())[:500]}") from None

    def push(self, rows: list[list[float]], version: int) -> tuple[float, float]:
        """Send the gates to every worker and wait; returns (checksum, seconds). Each worker checks its
        checksum against the sender's."""
        self.push_async(rows, version)
        return self.settle()

    def push_async(self, rows: list[list[float]], version: int) -> None:
        """Queue the gates behind whatever each worker is doing (an actor runs one call at a time, so a
        rollout in flight finishes with the gates it started with); ``settle`` waits for them."""
        self.gates, self.gate_version = rows, version
        self._push_started = time.perf_counter()
        self._pending_pushes = [w.set_gates.remote(rows, version) for w in self.workers]

    def settle(self) -> tuple[float, float]:
        """Wait for the queued gate push; returns (checksum, seconds since it was queued)."""
        refs, self._pending_pushes = getattr(self, "_pending_pushes", []), []
        rows, version = self.gates, self.gate_version
        sums = [self._call_with_restart(i, ref, "set_gates",
                                        lambda i=i: self.workers[i].set_gates.remote(rows, version))
                for i, ref in enumerate(refs)]
        return (sums[0] if sums else 0.0), time.perf_counter() - getattr(self, "_push_started", time.perf_counter())

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

    def sleep(self) -> float:
        """Every worker's engine releases its GPU memory (vLLM sleep mode); returns the slowest's seconds."""
        return self._all("sleep", lambda w: w.sleep.remote())

    def wake_up(self) -> float:
        """Every worker's engine takes its memory back; returns the slowest's seconds. The caller pushes
        the gates next (a level-2 sleep dropped them; a worker restarted meanwhile starts awake)."""
        return self._all("wake_up", lambda w: w.wake_up.remote())

    def _all(self, what: str, call: Any) -> float:
        refs = [call(w) for w in self.workers]
        return max([float(self._call_with_restart(i, ref, what, lambda i=i: call(self.workers[i])))
                    for i, ref in enumerate(refs)], default=0.0)

    def submit(self, prompts: list[list[int]], spec: SamplingSpec, *, n: int, max_tokens: int,
               seeds: list[int]) -> "PendingRollout":
        """Start ``n`` samples per prompt, the prompts split over the workers; ``collect`` waits."""
        shards = _shards(len(prompts), len(self.workers))

        def call(i: int) -> Any:
            s, e = shards[i]
            return self.workers[i].generate.remote(prompts[s:e], spec, n, max_tokens, seeds[s:e], s)

        calls = [lambda i=i: call(i) for i in range(len(self.workers))]
        return PendingRollout([c() for c in calls], calls, time.perf_counter())

    def collect(self, pending: "PendingRollout") -> list[Sample]:
        """The samples of a submitted rollout; a dead worker's share is redone with the same seeds."""
        out: list[Sample] = []
        for i, (ref, again) in enumerate(zip(pending.refs, pending.calls)):
            out.extend(self._call_with_restart(i, ref, "generate", again))
        return out

    def generate(self, prompts: list[list[int]], spec: SamplingSpec, *, n: int, max_tokens: int,
                 seeds: list[int]) -> list[Sample]:
        """``submit`` then ``collect``."""
        return self.collect(self.submit(prompts, spec, n=n, max_tokens=max_tokens, seeds=seeds))

    def shutdown(self) -> None:
        for w in self.workers:
            try:
                self.ray.kill(w, no_restart=True)
            except Exception:  # noqa: BLE001 - already gone
                pass
