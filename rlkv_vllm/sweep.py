"""``rlkv eval sweep``: accuracy against sparsity, with the eval's own throughput beside it.

Every config gets its own server (``rlkv serve`` = ``vllm serve`` with the plugin), is evaluated on every
task through the OpenAI endpoint (``rlkv_trainer.evaluate``, the trainer's grading), and is torn down
before the next starts. Configs:

- ``full``: stock vLLM, every head's full cache (the accuracy and throughput reference);
- ``rlkv:S``: the pattern under test at sparsity S (``--pattern``), for each ``--sparsities`` value;
- ``duo:S``: another pattern (``--compare duo:FILE``, e.g. DuoAttention's) at the same sparsities;
- ``random:S``: random gates (seeded) at the same sparsities, the baseline a learned pattern must beat;
- ``streaming``: every head streaming. Serve mode needs at least one full head to page, so this runs
  RLKV's gated mode with every gate 0, whose output is exactly every head's streaming attention.

A config that fails to start is recorded with the reason from its log, and the sweep goes on. The result
is ``DIR/sweep.json`` (every config's eval summary, throughput, and its eval file), a table, and
``DIR/sweep.png`` (accuracy vs sparsity with 95% intervals per method, throughput beside).

  rlkv eval sweep --model MODEL --pattern heads.tsv --sparsities 0 0.2 0.4 0.5 0.6 0.8 \\
      --tasks gsm8k=../shared/data/eval/gsm8k_test.jsonl --compare duo:duo.tsv random streaming --out sweep/
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Any, NoReturn

import numpy as np

PROG = "rlkv eval sweep"
# a server sized for the 2-core CPU machine and the tiny models; --serve-args replaces it
CPU_SERVE_ARGS = ("--dtype float32 --max-model-len 2048 --max-num-seqs 16 --kv-cache-memory-bytes 134217728")


class SweepError(ValueError):
    """Bad sweep input. The message is one line."""


@dataclass(frozen=True)
class SweepConfig:
    """name: table label; method: full, rlkv, duo, random, streaming; rlkv: the server's rlkv settings."""

    name: str
    method: str
    sparsity: float | None
    rlkv: dict[str, Any] | None


@dataclass
class ConfigResult:
    config: SweepConfig
    status: str = "ok"
    reason: str = ""
    start_s: float = 0.0
    tasks: dict[str, dict[str, Any]] = field(default_factory=dict)


def _model_grid(model: str) -> tuple[int, int]:
    from .core.settings import model_shape_from_config

    shape = model_shape_from_config(model)
    return shape.num_layers, shape.num_kv_heads


def parse_rlkv_settings(items: list[str]) -> dict[str, Any]:
    """``--rlkv sink=4 recent=8`` -> {"sink": 4, "recent": 8}: rlkv settings every RLKV config gets (values
    read as JSON where they parse, else kept as text; the server validates them)."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise SweepError(f"--rlkv {item!r} is not allowed: use KEY=VALUE, e.g. sink=4")
        if key.strip() in ("heads", "sparsity", "mode"):
            raise SweepError(f"--rlkv {item!r} is not allowed: the sweep sets {key.strip()} per config")
        try:
            out[key.strip()] = json.loads(value)
        except ValueError:
            out[key.strip()] = value
    return out


def plan_configs(model: str, pattern: str, sparsities: list[float], compare: list[str], out_dir: str,
                 seed: int = 0, rlkv: dict[str, Any] | None = None) -> list[SweepConfig]:
    """The sweep's configs in run order (full first: the reference); ``rlkv``: settings every RLKV config
    shares (window, kernels)."""
    common = dict(rlkv or {})
    from .core.patterns import HeadPattern

    layers, heads = _model_grid(model)
    configs = [SweepConfig("full", "full", 0.0, None)]
    others: list[tuple[str, str]] = [("rlkv", pattern)]
    extra: list[SweepConfig] = []
    os.makedirs(out_dir, exist_ok=True)
    for spec in compare:
        if spec.startswith("duo:"):
            path = spec[4:]
            if not os.path.isfile(path):
                raise SweepError(f"--compare {spec} is not allowed: no such pattern file {path!r}")
            others.append(("duo", path))
        elif spec == "random":
            rng = np.random.default_rng(seed)
            path = os.path.join(out_dir, f"random-gates-seed{seed}.json")
            HeadPattern(rng.uniform(size=(layers, heads)).astype(np.float32),
                        {"source": f"rlkv eval sweep: uniform random gates, seed {seed}"}).save(path)
            others.append(("random", path))
        elif spec == "streaming":
            path = os.path.join(out_dir, "all-streaming-gates.json")
            HeadPattern(np.zeros((layers, heads), dtype=np.float32),
                        {"source": "rlkv eval sweep: every gate 0 (gated mode: every head streaming)"}).save(path)
            extra.append(SweepConfig("streaming", "streaming", 1.0, {**common, "heads": path, "mode": "gated"}))
        else:
            raise SweepError(f"--compare {spec!r} is not allowed: use duo:FILE, random or streaming")
    for s in sparsities:
        if not 0.0 <= s < 1.0:
            raise SweepError(f"--sparsities {s} is not allowed: each must be in [0, 1)")
        for method, path in others:
            configs.append(SweepConfig(f"{method}:{s:g}", method, s, {**common, "heads": path, "sparsity": s}))
    return configs + extra


def parse_tasks(specs: list[str]) -> list[tuple[str, str | None]]:
    """``task`` or ``task=DATA`` -> (task, data or None for the task's default file)."""
    out = []
    for spec in specs:
        task, _, data = spec.partition("=")
        if data and not os.path.exists(data):
            raise SweepError(f"--tasks {spec} is not allowed: no such data file {data!r}")
        out.append((task, data or None))
    return out


def run_config(cfg: SweepConfig, args: argparse.Namespace, tasks: list[tuple[str, str | None]],
               grader: Any) -> ConfigResult:
    from rlkv_trainer.eval_tasks import default_data_path, get_task
    from rlkv_trainer.evaluate import evaluate

    from .demo import failure_reason
    from .server import start_server

    res = ConfigResult(cfg)
    logs = os.path.join(args.out, "logs")
    os.makedirs(logs, exist_ok=True)
    log_path = os.path.join(logs, cfg.name.replace(":", "_") + ".log")
    t0 = time.perf_counter()
    try:
        server = start_server(args.model, rlkv=cfg.rlkv, extra_args=args.serve_args.split(), log_path=log_path,
                              startup_timeout=args.startup_timeout,
                              env={"VLLM_ENABLE_V1_MULTIPROCESSING": "1"})
    except (RuntimeError, TimeoutError) as e:
        log = open(log_path, errors="replace").read() if os.path.exists(log_path) else str(e)
        res.status, res.reason = "failed to start", failure_reason(log)
        print(f"[{PROG}] {cfg.name}: failed to start: {res.reason} (log {log_path})", file=sys.stderr, flush=True)
        return res
    res.start_s = time.perf_counter() - t0
    try:
        for task_name, data in tasks:
            task = get_task(task_name)
            path = data or default_data_path(task)
            if path is None:
                raise SweepError(f"--tasks {task_name} is not allowed without data: give {task_name}=FILE")
            out_file = os.path.join(args.out, "evals", f"{cfg.name.replace(':', '_')}-{task.label.replace(':', '_')}.json")
            r = evaluate(server.base_url + "/v1", "tiny", task, data=path, samples=args.samples,
                         concurrency=args.concurrency, max_tokens=args.max_tokens, temperature=args.temperature,
                         limit=args.limit, cache_path=out_file + ".cache.jsonl", grader=grader, progress=False)
            r.write(out_file)
            tokens = sum(s.completion.completion_tokens or 0 for it in r.items for s in it.samples)
            res.tasks[task.label] = {**r.summary.to_json(), "eval_file": os.path.relpath(out_file, args.out),
                                     "seconds": r.seconds, "completion_tokens": tokens,
                                     "tok_s": tokens / max(r.seconds, 1e-9), "statuses": r.statuses()}
            print(f"[{PROG}] {cfg.name} {task.label}: pass@1 {r.summary.pass_at_1:.3f} "
                  f"[{r.summary.ci95[0]:.3f}, {r.summary.ci95[1]:.3f}], {tokens / max(r.seconds, 1e-9):,.0f} tok/s",
                  file=sys.stderr, flush=True)
    finally:
        server.stop()
    return res


def table(results: list[ConfigResult], tasks: list[str]) -> str:
    head = ["config", "status"] + [f"{t} pass@1 [95% CI]" for t in tasks] + [f"{t} tok/s" for t in tasks]
    rows = []
    for r in results:
        row = [r.config.name, r.status if r.status == "ok" else f"{r.status}: {r.reason[:60]}"]
        for t in tasks:
            s = r.tasks.get(t)
            row.append(f"{100 * s['pass_at_1']:.1f}% [{100 * s['ci95'][0]:.1f}, {100 * s['ci95'][1]:.1f}]" if s else "-")
        for t in tasks:
            s = r.tasks.get(t)
            row.append(f"{s['tok_s']:,.0f}" if s else "-")
        rows.append(row)
    widths = [max(len(x) for x in col) for col in zip(head, *rows)]
    return "\n".join("  ".join(x.ljust(w) for x, w in zip(line, widths)).rstrip() for line in [head, *rows])


def plot(results: list[ConfigResult], tasks: list[str], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, len(tasks), figsize=(5.5 * len(tasks), 7), squeeze=False)
    for j, t in enumerate(tasks):
        acc, thr = axes[0][j], axes[1][j]
        for method in ("rlkv", "duo", "random"):
            pts = sorted((r.config.sparsity, r.tasks[t]) for r in results
                         if r.config.method == method and t in r.tasks)
            if not pts:
                continue
            xs = [p[0] for p in pts]
            ys = [100 * p[1]["pass_at_1"] for p in pts]
            lo = [100 * (p[1]["pass_at_1"] - p[1]["ci95"][0]) for p in pts]
            hi = [100 * (p[1]["ci95"][1] - p[1]["pass_at_1"]) for p in pts]
            acc.errorbar(xs, ys, yerr=[lo, hi], marker="o", capsize=3, label=method)
            thr.plot(xs, [p[1]["tok_s"] for p in pts], marker="o", label=method)
        for r in results:
            if r.config.method in ("full", "streaming") and t in r.tasks:
                acc.axhline(100 * r.tasks[t]["pass_at_1"], ls="--", color="gray" if r.config.method == "full" else "red",
                            label=f"{r.config.method} ({100 * r.tasks[t]['pass_at_1']:.1f}%)")
                thr.axhline(r.tasks[t]["tok_s"], ls="--", color="gray" if r.config.method == "full" else "red",
                            label=r.config.method)
        acc.set(title=t, xlabel="sparsity", ylabel="pass@1 (%)")
        thr.set(xlabel="sparsity", ylabel="eval output tok/s")
        for ax in (acc, thr):
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # type: ignore[override]
        raise SweepError(message)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="a local model folder (served by each config's server)")
    p.add_argument("--pattern", required=True, help="the head pattern under test (TSV, JSON or safetensors)")
    p.add_argument("--sparsities", type=float, nargs="+", default=[0.0, 0.2, 0.4, 0.5, 0.6, 0.8],
                   help="sparsities of the pattern (and of duo/random) to evaluate")
    p.add_argument("--tasks", nargs="+", required=True, metavar="TASK[=DATA]",
                   help="rlkv eval tasks, each with its data file (default: the task's file under $RLKV_EVAL_DATA)")
    p.add_argument("--compare", nargs="*", default=[], metavar="duo:FILE|random|streaming",
                   help="baselines beside the pattern: another pattern, random gates, every head streaming")
    p.add_argument("--samples", type=int, default=1, help="samples per item (pass@1 averaged over them)")
    p.add_argument("--max-tokens", type=int, default=512, help="max new tokens per sample")
    p.add_argument("--temperature", type=float, default=None, help="default: 0 for one sample, 0.6 for several")
    p.add_argument("--concurrency", type=int, default=8, help="requests in flight per config")
    p.add_argument("--limit", type=int, default=None, help="the first N items of each task")
    p.add_argument("--rlkv", nargs="*", default=[], metavar="KEY=VALUE",
                   help="rlkv settings for every RLKV config, e.g. sink=4 recent=8 (the window the pattern was "
                        "trained for)")
    p.add_argument("--serve-args", default=CPU_SERVE_ARGS,
                   help=f"extra `rlkv serve` arguments for every config (default: {CPU_SERVE_ARGS!r})")
    p.add_argument("--startup-timeout", type=float, default=600, help="seconds for each server to come up")
    p.add_argument("--seed", type=int, default=0, help="the random-gates baseline's seed")
    p.add_argument("--out", required=True, help="output folder (sweep.json, sweep.png, evals/, logs/)")
    return p


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        args.out = os.path.abspath(args.out)
        if not os.path.isfile(os.path.join(args.model, "config.json")):
            raise SweepError(f"--model {args.model} is not allowed: no config.json there (a local model folder)")
        tasks = parse_tasks(args.tasks)
        configs = plan_configs(args.model, args.pattern, args.sparsities, args.compare, args.out, args.seed,
                               parse_rlkv_settings(args.rlkv))
    except SweepError as e:
        print(f"{PROG}: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    from rlkv_trainer.eval_tasks import get_task
    from rlkv_trainer.grading import Grader

    labels = [get_task(t).label for t, _ in tasks]
    t0 = time.perf_counter()
    results = []
    with Grader() as grader:
        for i, cfg in enumerate(configs, 1):
            print(f"[{PROG}] [{i}/{len(configs)}] {cfg.name}: starting", file=sys.stderr, flush=True)
            results.append(run_config(cfg, args, tasks, grader))
    import vllm

    doc = {
        "study": "eval-sweep", "date": datetime.date.today().isoformat(), "vllm": vllm.__version__,
        "command": f"{PROG} " + " ".join(argv if argv is not None else sys.argv[1:]), "model": args.model,
        "pattern": args.pattern, "serve_args": args.serve_args, "seconds": time.perf_counter() - t0,
        "configs": [{"name": r.config.name, "method": r.config.method, "sparsity": r.config.sparsity,
                     "rlkv": r.config.rlkv, "status": r.status, "reason": r.reason, "start_s": r.start_s,
                     "tasks": r.tasks} for r in results],
    }
    with open(os.path.join(args.out, "sweep.json"), "w") as f:
        json.dump(doc, f, indent=1)
    print(table(results, labels))
    plot(results, labels, os.path.join(args.out, "sweep.png"))
    print(f"[{PROG}] wrote {os.path.join(args.out, 'sweep.json')} and sweep.png ({doc['seconds']:.0f} s)",
          file=sys.stderr)
    return 0
