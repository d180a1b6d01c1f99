"""Drive a streaming-attention implementation through a random serving schedule and
compare every output with the oracle.

Requests get ring slots in random order; each step serves a random subset of them
with a random chunk (decode = 1 token), sometimes followed by CUDA-graph style padding
(extra tokens past query_start_loc[B], extra rows with seq_len 0); the ring starts
poisoned with NaN so a read of a never-written slot shows up.

With ``Case.kv_dtype`` fp8 the ring holds fp8 (NaN-poisoned too) and each step carries the
layer's k/v scales (``Step.k_scale`` / ``v_scale``, random per case): the error against the
oracle is then fp8's, and ``paired`` checks a kernel bit for bit against the PyTorch path.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Callable

import torch

from rlkv_vllm.ops.torch_stream import StreamPlan, build_stream_plan
from rlkv_vllm.core.reference import oracle_attention



@dataclass
class Step:
    """One step's batch as vLLM hands it to a backend (padding included).

    query_start_loc: [B + 1] (non-decreasing; padding rows repeat the last value);
    seq_lens: [B] (0 for padding rows); slot_ids: [B] ring slot per row;
    plan: the PyTorch path's gather plan for the same batch.
    """

    query_start_loc: torch.Tensor
    seq_lens: torch.Tensor
    slot_ids: torch.Tensor
    num_tokens: int
    plan: StreamPlan
    max_query_len: int = 0  # the host-side figure vLLM's metadata carries
    k_scale: torch.Tensor | None = None  # [] float32: the layer's k/v scales (fp8 rings)
    v_scale: torch.Tensor | None = None


# fn(q [T,H,G,D], k [T,H,D], v, ring_k, ring_v, step, scale, out [T,H,G,D]) -> None,
# reading the ring and then writing this step's keys into it.
StreamFn = Callable[..., None]


@dataclass
class Case:
    num_reqs: int
    max_len: int
    kv_heads: int
    group: int
    head_dim: int
    sink: int
    recent: int
    dtype: torch.dtype = torch.float32
    max_chunk: int = 40
    seed: int = 0
    pad: bool = False  # add CUDA-graph style padding tokens and rows to some steps
    decode_steps: float = 0.0  # probability that a step gives every row one token (max_query_len 1)
    kv_dtype: torch.dtype | None = None  # the ring's element type (None: dtype; fp8: scaled)


def run_case(case: Case, fn: StreamFn, device: str = "cpu") -> tuple[float, int]:
    """Returns (max relative error over requests, tokens checked)."""
    rng = random.Random(case.seed)
    gen = torch.Generator().manual_seed(case.seed)
    h, g, d = case.kv_heads, case.group, case.head_dim
    lens = [rng.randint(1, case.max_len) for _ in range(case.num_reqs)]
    lens[0] = min(lens[0], max(1, case.sink - 1))  # one request shorter than the sink
    q = [torch.randn(n, h * g, d, generator=gen).to(case.dtype) for n in lens]
    k = [torch.randn(n, h, d, generator=gen).to(case.dtype) for n in lens]
    v = [torch.randn(n, h, d, generator=gen).to(case.dtype) for n in lens]
    num_slots = case.num_reqs + 2
    slots = rng.sample(range(num_slots), case.num_reqs)  # permuted slot table
    c = case.sink + case.recent
    ring_dtype = case.kv_dtype or case.dtype
    ring_k = torch.full(((num_slots + 1) * c, h, d), float("nan"), dtype=ring_dtype, device=device)
    ring_v = torch.full_like(ring_k, float("nan"))
    k_scale = v_scale = None
    if case.kv_dtype is not None and case.kv_dtype != case.dtype:
        # scales around 1, as checkpoints carry; some inputs saturate at 1/4
        k_scale = torch.tensor(rng.choice([0.25, 0.7, 1.0, 1.9]), device=device)
        v_scale = torch.tensor(rng.choice([0.25, 0.5, 1.0, 1.3]), device=device)
    out = [torch.full((n, h * g, d), float("nan"), dtype=case.dtype) for n in lens]
    done = [0] * case.num_reqs
    scale = d**-0.5
    while any(done[i] < lens[i] for i in range(case.num_reqs)):
        live = [i for i in range(case.num_reqs) if done[i] < lens[i]]
        batch = rng.sample(live, rng.randint(1, len(live)))
        chunks = []
        decode = rng.random() < case.decode_steps
        for i in batch:
            n = 1 if decode or (done[i] and rng.random() < 0.5) else rng.randint(1, case.max_chunk)
            chunks.append(min(n, lens[i] - done[i]))
        qsl = [0]
        for n in chunks:
            qsl.append(qsl[-1] + n)
        seq = [done[i] + n for i, n in zip(batch, chunks)]
        slot_rows = [slots[i] for i in batch]
        n_real = qsl[-1]
        pad_tokens = pad_rows = 0
        if case.pad and rng.random() < 0.5:
            pad_tokens, pad_rows = rng.randint(0, 5), rng.randint(0, 3)
        qsl += [n_real] * pad_rows
        seq += [0] * pad_rows
        slot_rows += [num_slots] * pad_rows
        num_tokens = n_real + pad_tokens

        def packed(x: list[torch.Tensor]) -> torch.Tensor:
            y = torch.cat([x[i][done[i] : done[i] + n] for i, n in zip(batch, chunks)])
            return torch.cat([y, torch.randn(pad_tokens, *y.shape[1:], generator=gen).to(y.dtype)])

        qs, ks, vs = packed(q), packed(k), packed(v)
        qsl_t = torch.tensor(qsl, device=device, dtype=torch.int32)
        seq_t = torch.tensor(seq, device=device, dtype=torch.int32)
        slot_t = torch.tensor(slot_rows, device=device, dtype=torch.int32)
        plan = build_stream_plan(qsl_t, seq_t, slot_t, num_tokens, case.sink, case.recent, num_slots)
        step = Step(qsl_t, seq_t, slot_t, num_tokens, plan, max_query_len=max(chunks), k_scale=k_scale,
                    v_scale=v_scale)
        o = torch.full((num_tokens, h, g, d), float("nan"), dtype=case.dtype, device=device)
        fn(qs.view(-1, h, g, d).to(device), ks.to(device), vs.to(device), ring_k, ring_v, step, scale, o)
        assert torch.isfinite(o[n_real:]).all(), "padding tokens got a non-finite output"
        o = o.view(-1, h * g, d).cpu()
        for j, (i, n) in enumerate(zip(batch, chunks)):
            out[i][done[i] : done[i] + n] = o[qsl[j] : qsl[j + 1]]
            done[i] += n
    worst = 0.0
    for i in range(case.num_reqs):
        ref = oracle_attention(
            q[i], k[i], v[i], scale=scale, full_heads=torch.zeros(h, dtype=torch.bool),
            sink=case.sink, recent=case.recent,
        )
        assert not torch.isnan(out[i]).any(), f"request {i}: output not written or NaN read"
        err = (out[i].double() - ref.double()).norm() / ref.double().norm()
        worst = max(worst, float(err))
    return worst, sum(lens)


def paired(fn: StreamFn, ref: StreamFn, out_tol: float) -> StreamFn:
    """A StreamFn running ``fn`` and the reference ``ref`` on their own rings each step: the
    rings must stay bit for bit equal (same quantisation, same rows) and the outputs agree
    within ``out_tol`` (max abs, relative to the output's max abs)."""
    state: dict[str, torch.Tensor] = {}

    def both(q, k, v, ring_k, ring_v, step: Step, scale, out):  # type: ignore[no-untyped-def]
        if not state:
            state["k"], state["v"] = ring_k.clone(), ring_v.clone()
        o_ref = torch.full_like(out, float("nan"))
        ref(q, k, v, state["k"], state["v"], step, scale, o_ref)
        fn(q, k, v, ring_k, ring_v, step, scale, out)
        # the last slot is scratch: the PyTorch path dumps unread keys there, the kernels skip them
        live = ring_k.shape[0] - step.plan.window
        for name, a, b in (("ring_k", ring_k, state["k"]), ("ring_v", ring_v, state["v"])):
            same = (a[:live].view(torch.uint8) == b[:live].view(torch.uint8)).all(-1)
            assert bool(same.all()), f"{name} rows differ from the reference: {same.logical_not().nonzero()[:5].tolist()}"
        n = int(step.query_start_loc[-1])  # padding tokens: the paths' outputs differ (both finite)
        o, r = out[:n].double(), o_ref[:n].double()
        err = (o - r).abs().max() / r.abs().max().clamp(min=1e-6) if n else torch.zeros(())
        assert float(err) <= out_tol, f"output vs reference: {float(err)}"

    return both
