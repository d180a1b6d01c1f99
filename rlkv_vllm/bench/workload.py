"""The steady-state study's workload: request shapes drawn, seeded, from a reasoning-trace distribution.

Pure Python (no numpy, vLLM or torch), so the supervisor and the tests import it for free.

Output lengths. ``reasoning`` is a log-normal with median 2,640 tokens and sigma 0.75, capped at 8,192
(a capped request stops at the cap, as ``max_tokens 8192`` would stop it): mean 3,252, p50 2,640, p90
6,903. It models the published shape of DeepSeek-R1-Distill traces on MATH-500: a mean of about 3-4K
tokens and a long right tail reaching the 8K budget on the hardest problems. It is a model, not a fit:
no per-trace lengths can be fetched here. ``--output-lens FILE`` (one integer per line, e.g. the
``completion_tokens`` of real traces from ``rlkv eval``) replaces it with an empirical distribution.

Steady state from the first step. A closed loop that starts with every request at age 0 runs in
synchronised waves for several mean lifetimes. So the first ``concurrency`` requests are drawn from the
equilibrium of the renewal process instead: a total length L with probability proportional to L f(L)
(a random request in flight is more likely a long one), an age A uniform in [0, L), the A tokens already
generated folded into its prompt (random ids), and L - A still to generate. Later requests are fresh
(age 0). The prefill of the primed ages is the warm-up's cost; it is excluded from the window.
"""

from __future__ import annotations

import bisect
import math
import random
from dataclasses import dataclass

REASONING_MEDIAN = 2640
REASONING_SIGMA = 0.75
REASONING_CAP = 8192
DISTRIBUTION_HELP = (f"reasoning (log-normal, median {REASONING_MEDIAN}, sigma {REASONING_SIGMA}, cap "
                     f"{REASONING_CAP}: R1-distill traces on MATH-500, modelled), fixed (every request --output-len)")


@dataclass(frozen=True)
class RequestShape:
    """One request of the closed loop: ``prompt_len`` prompt tokens (its primed age included), ``output_len``
    tokens still to generate, ``age`` tokens it had generated before the study began (0 for fresh ones)."""

    prompt_len: int
    output_len: int
    age: int = 0


class OutputLengths:
    """A seeded output-length distribution, sampled by inverse CDF over a fine grid (exact for an empirical
    list). ``lengths`` is the support; ``weights`` their probabilities."""

    def __init__(self, lengths: list[int], weights: list[float], source: str) -> None:
        if not lengths or len(lengths) != len(weights) or min(lengths) < 2:
            raise ValueError("an output-length distribution needs lengths >= 2 with one weight each")
        total = float(sum(weights))
        self.lengths, self.source = lengths, source
        self.probs = [w / total for w in weights]
        self._cdf = list(_accumulate(self.probs))
        biased = [p * n for p, n in zip(self.probs, lengths)]  # length-biased: the equilibrium in flight
        tb = sum(biased)
        self._biased_cdf = list(_accumulate([b / tb for b in biased]))

    @classmethod
    def reasoning(cls, median: int = REASONING_MEDIAN, sigma: float = REASONING_SIGMA,
                  cap: int = REASONING_CAP) -> "OutputLengths":
        """The capped log-normal on the integers 2..cap (the cap holds the tail's mass)."""
        mu = math.log(median)

        def cdf(x: float) -> float:
            return 0.5 * (1.0 + math.erf((math.log(x) - mu) / (sigma * math.sqrt(2.0))))

        lengths = list(range(2, cap + 1))
        weights = [cdf(n + 0.5) - cdf(max(n - 0.5, 1.0)) for n in lengths]
        weights[-1] += 1.0 - cdf(cap + 0.5)
        return cls(lengths, weights, f"reasoning: log-normal median {median}, sigma {sigma}, capped at {cap} "
                                     "(a model of R1-distill MATH-500 trace lengths: mean 3,252, p90 6,903)")

    @classmethod
    def fixed(cls, n: int) -> "OutputLengths":
        return cls([n], [1.0], f"fixed: {n} tokens")

    @classmethod
    def from_file(cls, path: str, cap: int) -> "OutputLengths":
        """One length per line (blank lines and ``#`` comments skipped), each clipped to [2, cap]."""
        counts: dict[int, int] = {}
        with open(path) as f:
            for lineno, line in enumerate(f, 1):
                line = line.split("#", 1)[0].strip()
                if not line:
                    continue
                try:
                    n = int(line)
                except ValueError:
                    raise ValueError(f"{path}:{lineno}: {line!r} is not a token count") from None
                n = min(max(n, 2), cap)
                counts[n] = counts.get(n, 0) + 1
        if not counts:
            raise ValueError(f"{path}: no lengths")
        lengths = sorted(counts)
        return cls(lengths, [float(counts[n]) for n in lengths],
                   f"empirical: {sum(counts.values())} lengths from {path}, clipped to [2, {cap}]")

    def mean(self) -> float:
        return sum(p * n for p, n in zip(self.probs, self.lengths))

    def quantile(self, q: float) -> int:
        return self.lengths[min(bisect.bisect_left(self._cdf, q), len(self.lengths) - 1)]

    def sample(self, rng: random.Random) -> int:
        return self.lengths[min(bisect.bisect_left(self._cdf, rng.random()), len(self.lengths) - 1)]

    def sample_in_flight(self, rng: random.Random) -> int:
        """A total length drawn length-biased: the length of a request caught in flight at a random time."""
        return self.lengths[min(bisect.bisect_left(self._biased_cdf, rng.random()), len(self.lengths) - 1)]

    def describe(self) -> dict[str, object]:
        return dict(source=self.source, mean=round(self.mean(), 1), p50=self.quantile(0.5),
                    p90=self.quantile(0.9), p99=self.quantile(0.99), max=self.lengths[-1])


def _accumulate(xs: list[float]) -> list[float]:
    out, acc = [], 0.0
    for x in xs:
        acc += x
        out.append(acc)
    out[-1] = 1.0
    return out


class ClosedLoop:
    """The request stream of the steady-state study: the same seeded sequence for every config, so each
    engine sees the same requests in the same order; it takes as many as it can hold.

    ``primed(n)`` gives the first n requests (in equilibrium, see the module docstring); ``next()`` each
    later one (fresh). Prompt lengths are uniform in [input_min, input_max].
    """

    def __init__(self, lengths: OutputLengths, input_min: int, input_max: int, max_model_len: int,
                 seed: int) -> None:
        if not 1 <= input_min <= input_max:
            raise ValueError(f"input range [{input_min}, {input_max}] must satisfy 1 <= min <= max")
        if input_max + lengths.lengths[-1] > max_model_len:
            raise ValueError(f"input_max {input_max} + the longest output {lengths.lengths[-1]} must fit "
                             f"max_model_len {max_model_len}")
        self.lengths, self.input_min, self.input_max = lengths, input_min, input_max
        self.rng = random.Random(seed)

    def _prompt_len(self) -> int:
        return self.rng.randint(self.input_min, self.input_max)

    def in_flight_tokens(self) -> float:
        """The mean KV footprint of a request caught in flight: its prompt plus its age, E[L^2] / (2 E[L])."""
        d = self.lengths
        e_age = sum(p * n * n for p, n in zip(d.probs, d.lengths)) / (2.0 * d.mean())
        return (self.input_min + self.input_max) / 2.0 + e_age

    def primed_count(self, capacity_tokens: int, max_num_seqs: int) -> int:
        """How many requests an engine of this KV capacity holds in equilibrium (at most max_num_seqs)."""
        return max(1, min(max_num_seqs, int(capacity_tokens / self.in_flight_tokens())))

    def primed(self, n: int) -> list[RequestShape]:
        out = []
        for _ in range(n):
            total = self.lengths.sample_in_flight(self.rng)
            age = self.rng.randrange(0, total - 1)  # at least two tokens left: TPOT needs them
            out.append(RequestShape(self._prompt_len() + age, total - age, age))
        return out

    def next(self) -> RequestShape:
        return RequestShape(self._prompt_len(), self.lengths.sample(self.rng))
