#!/usr/bin/env python3
"""Plot a study JSON from benchmarks/results/ into a PNG next to it.

  python benchmarks/plot_study.py benchmarks/results/engine-...json    # engine_study.py (throughput)
  python benchmarks/plot_study.py benchmarks/results/steady-...json    # engine_study.py --steady
  python benchmarks/plot_study.py benchmarks/results/latency-...json   # engine_study.py --latency
  python benchmarks/plot_study.py benchmarks/results/kernel-...json    # kernel_study.py
  python benchmarks/plot_study.py --grid --out SWEEP.png engine-A.json engine-B.json ...
      # engine files of one workload as one sweep over sparsity (ratios within each run)

Engine: output tok/s, TPOT, KV capacity and mean running requests per config, each bar
labelled with its ratio to the first stock config. Latency: TPOT against context, one
panel per batch size, one line per config. Kernel: speedup of RLKV's per-layer decode
work over stock's against context, one panel per (stock kernel, decode kernel, batch),
one line per sparsity.

Needs matplotlib (pip install 'rlkv-vllm[bench]'); the GPU machine has none, so plot here
from the JSON that came back.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.axes import Axes  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from rlkv_vllm.bench.config import workload_keys  # noqa: E402


def _title(d: dict[str, Any], what: str) -> str:
    return f"{what} - {d.get('device')}, vLLM {d.get('vllm')}, {d.get('date')}"


def _ok(r: dict[str, Any]) -> bool:
    return r.get("status") in ("ok", "truncated")


def _bar_panels(d: dict[str, Any], rows: list[dict[str, Any]],
                panels: list[tuple[str, list[float], str]], title: str) -> Figure:
    """One bar panel per metric, one bar per config; each bar labelled with its ratio (key) to
    the first stock config."""
    ratios = {q["config"]: q for q in d["ratios"]["rows"]}
    names = [r["config"] for r in rows]
    colors = ["tab:gray" if r["kind"] == "stock" else "tab:blue" for r in rows]
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 4.2), squeeze=False)
    for ax, (label, vals, key) in zip(axes[0], panels):
        bars = ax.bar(range(len(vals)), vals, color=colors)
        ax.set_xticks(range(len(vals)), names, rotation=30, ha="right")
        ax.set_title(label)
        for b, n in zip(bars, names):
            x = ratios.get(n, {}).get(key) if key else None
            if x is not None:
                ax.annotate(f"{x:.2f}x", (b.get_x() + b.get_width() / 2, b.get_height()), ha="center",
                            va="bottom", fontsize=8)
    fig.suptitle(_title(d, title), fontsize=10)
    fig.tight_layout()
    return fig


def _budget(s: dict[str, Any]) -> str:
    return f"gpu_mem {s['gpu_mem']:g}" if s.get("gpu_mem") else f"KV budget {s['kv_bytes'] / 2**30:g} GiB"


def plot_engine(d: dict[str, Any]) -> Figure:
    """Four bar panels; each bar's label is its value over the first stock config's."""
    rows = [r for r in d["results"] if _ok(r)]
    panels = [
        ("output tok/s", [r["throughput"]["output_tok_s"] for r in rows], "output_tok_s"),
        ("TPOT mean (ms)", [(r["throughput"]["tpot_mean_s"] or 0) * 1e3 for r in rows], "tpot_mean"),
        ("KV capacity (tokens)", [r["capacity_tokens"] for r in rows], "capacity"),
        ("mean running requests", [r["throughput"]["mean_running"] or 0 for r in rows], "mean_running"),
    ]
    s = d["settings"]
    return _bar_panels(d, rows, panels, f"engine study: {s['num_prompts']} x {s['input_len']} in / "
                       f"{s['output_len']} out, {_budget(s)}, max_num_seqs {s['max_num_seqs']}; "
                       f"labels: vs {d['ratios']['base']}")


def plot_steady(d: dict[str, Any]) -> Figure:
    """The steady-state window: output tok/s, mean running, mean step, KV capacity and
    preemptions per config (labels: vs the first stock config)."""
    rows = [r for r in d["results"] if _ok(r) and r.get("steady")]
    panels = [
        ("output tok/s (window)", [r["steady"]["output_tok_s"] for r in rows], "output_tok_s"),
        ("mean running requests", [r["steady"]["mean_running"] or 0 for r in rows], "mean_running"),
        ("mean step (ms)", [(r["steady"]["step_mean_s"] or 0) * 1e3 for r in rows], "step_mean"),
        ("KV capacity (tokens)", [r["capacity_tokens"] for r in rows], "capacity"),
        ("preemptions in the window", [r["steady"].get("preemptions") or 0 for r in rows], ""),
    ]
    s = d["settings"]
    return _bar_panels(d, rows, panels, f"steady state: prompts {s['input_min']}-{s['input_max']}, outputs "
                       f"{s['output_dist']}, {_budget(s)}, max_num_seqs {s['max_num_seqs']}, window "
                       f"{s['window_s']:g} s after {s['warmup_s']:g} s; labels: vs {d['ratios']['base']}")


def plot_latency(d: dict[str, Any]) -> Figure:
    """TPOT against context, one panel per batch size; a second row with the decode-only step
    time (steps without prefill chunks) when the file has it."""
    rows = [r for r in d["results"] if _ok(r)]
    batches = sorted({c["batch"] for r in rows for c in r.get("latency") or []})
    metrics = [("tpot_mean_s", "TPOT (ms)")]
    if any(c.get("decode_step_mean_s") is not None for r in rows for c in r.get("latency") or []):
        metrics.append(("decode_step_mean_s", "decode-only step (ms)"))
    ncols = max(len(batches), 1)
    fig, axes = plt.subplots(len(metrics), ncols, figsize=(5 * ncols, 4 * len(metrics)), squeeze=False)
    for i, (key, label) in enumerate(metrics):
        for ax, b in zip(axes[i], batches):
            for r in rows:
                cells = sorted((c["context"], c[key] * 1e3) for c in r["latency"]
                               if c["batch"] == b and _ok(c) and c.get(key) is not None)
                if cells:
                    ax.plot(*zip(*cells), marker="o", label=r["config"],
                            linestyle="--" if r["kind"] == "stock" else "-")
            ax.set_xscale("log", base=2)
            ax.set_xlabel("context (tokens)")
            ax.set_ylabel(label)
            ax.set_title(f"batch {b}")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
    fig.suptitle(_title(d, f"latency study, {d['settings']['latency_output_len']} tokens generated"), fontsize=10)
    fig.tight_layout()
    return fig


def plot_kernel(d: dict[str, Any]) -> Figure:
    """Speedup of RLKV's per-layer decode work (decode_step + the stock kernel on the full heads)
    over stock's (KV write + the kernel), one panel per (stock kernel, decode_step kernel, batch)."""
    rows = d["rows"]
    combos = sorted({(r["kernel"][5:], r.get("decode", "triton")) for r in rows if r["kernel"].startswith("RLKV+")})
    batches = sorted({r["batch"] for r in rows})
    fig, axes = plt.subplots(len(combos), len(batches), figsize=(4 * len(batches), 3.5 * len(combos)),
                             squeeze=False)
    for i, (k, dec) in enumerate(combos):
        for j, b in enumerate(batches):
            ax: Axes = axes[i][j]
            mine = [r for r in rows if r["kernel"] == f"RLKV+{k}" and r.get("decode", "triton") == dec
                    and r["batch"] == b]
            for s in sorted({r["sparsity"] for r in mine}):
                pts = sorted((r["context"], r["speedup_vs_stock_same_kernel"]) for r in mine if r["sparsity"] == s)
                ax.plot(*zip(*pts), marker="o", label=f"s={s:g}")
            ax.axhline(1.0, color="gray", linewidth=0.8)
            ax.set_xscale("log", base=2)
            ax.set_title(f"RLKV ({dec} decode) + {k}, batch {b}", fontsize=8)
            ax.set_xlabel("context")
            ax.set_ylabel(f"speedup vs {k}+write")
            ax.grid(alpha=0.3)
            if i == 0 and j == 0:
                ax.legend(fontsize=7)
    fig.suptitle(_title(d, "decode kernel study: KV write + attention per layer"), fontsize=10)
    fig.tight_layout()
    return fig


PLOTTERS = {"engine": plot_engine, "steady": plot_steady, "latency": plot_latency, "kernel": plot_kernel}


def plot_grid(studies: list[dict[str, Any]]) -> Figure:
    """Several engine-study files of one workload as one sweep over sparsity: each run's RLKV
    configs over the stock config of that same run (``ratios_within_run``), so no ratio divides by
    another run's stock. Other configs (gated, other stock backends) are drawn as level lines."""
    pts: dict[str, list[tuple[float, float]]] = {"output_tok_s": [], "capacity": [], "mean_running": []}
    levels: dict[str, float] = {}
    for d in studies:
        runs = d.get("runs", [])
        for run in runs:
            # files written before runs kept their own ratios hold one run: the top level is that run's
            ratios = run.get("ratios_within_run") or (d.get("ratios") if len(runs) == 1 else None) or {}
            for row in ratios.get("rows", []):
                name = row["config"]
                if name.startswith("rlkv:"):
                    for k, xs in pts.items():
                        if row.get(k) is not None:
                            xs.append((float(name[5:]), row[k]))
                elif name != ratios.get("base") and row.get("output_tok_s") is not None:
                    levels[name] = row["output_tok_s"]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    labels = {"output_tok_s": "output tok/s", "capacity": "KV capacity", "mean_running": "mean running"}
    for k, xs in pts.items():
        if xs:
            ax.plot(*zip(*sorted(xs)), marker="o", linestyle="-", label=labels[k])
    grid = sorted({x for x, _ in pts["capacity"]} | {0.0})
    ax.plot(grid, [1 / (1 - x) for x in grid], color="gray", linestyle=":", label="1 / (1 - s)")
    for name, v in sorted(levels.items()):
        ax.axhline(v, linestyle="--", linewidth=0.8, color="black", alpha=0.5)
        ax.annotate(f"{name} {v:.2f}x", (0.0, v), textcoords="offset points", xytext=(2, 3), fontsize=7)
    # the paper's own engine (SGLang fork, A100, its workload): a reference, not this run
    ax.plot([0.5, 0.6], [1.80, 2.06], marker="x", linestyle="none", color="black",
            label="paper's SGLang fork, tok/s (A100)")
    ax.set_yscale("log", base=2)
    ticks = [0.8, 1, 1.25, 1.5, 2, 3, 4, 5]
    ax.set_yticks(ticks, [f"{t:g}x" for t in ticks])
    ax.set_xlabel("sparsity s (fraction of KV heads streaming)")
    ax.set_ylabel("ratio to stock FLASH_ATTN in the same run")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    first = studies[0]
    runs = sum(len(d.get("runs", [])) for d in studies)
    ax.set_title(_title(first, f"engine study, {runs} runs of one workload"), fontsize=9)
    fig.tight_layout()
    return fig


def _grid_mismatch(paths: list[str], studies: list[dict[str, Any]]) -> str | None:
    """Why these files cannot form one sweep (None if they can)."""
    for path, d in zip(paths, studies):
        if d.get("study") != "engine":
            return f"study = {d.get('study')!r} in {path}: --grid takes engine-study files only"
    first = studies[0]
    for path, d in zip(paths[1:], studies[1:]):
        for k in ("device", "vllm"):
            if d.get(k) != first.get(k):
                return (f"{k} = {d.get(k)!r} in {path}, {first.get(k)!r} in {paths[0]}: "
                        "--grid takes files of one device and vLLM version")
        for k in workload_keys("engine"):
            if d["settings"].get(k) != first["settings"].get(k):
                return (f"settings.{k} = {d['settings'].get(k)!r} in {path}, {first['settings'].get(k)!r} in "
                        f"{paths[0]}: --grid takes files of one workload")
    return None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("study_json", nargs="+")
    p.add_argument("--out", default=None, help="PNG path (default: the JSON's path with .png)")
    p.add_argument("--grid", action="store_true",
                   help="engine files of one workload: one sweep over sparsity, ratios within each run")
    a = p.parse_args(argv)
    if a.grid:
        if not a.out:
            print("plot_study.py: error: --grid needs --out PNG", file=sys.stderr)
            return 2
        studies = []
        for path in a.study_json:
            with open(path) as f:
                studies.append(json.load(f))
        problem = _grid_mismatch(a.study_json, studies)
        if problem:
            print(f"plot_study.py: error: {problem}", file=sys.stderr)
            return 2
        fig = plot_grid(studies)
        fig.savefig(a.out, dpi=110)
        plt.close(fig)  # main() runs once per file in the tests: pyplot keeps every open figure
        print(f"wrote {os.path.relpath(a.out)}")
        return 0
    if len(a.study_json) > 1:
        print("plot_study.py: error: give one study file (or --grid with several)", file=sys.stderr)
        return 2
    with open(a.study_json[0]) as f:
        d = json.load(f)
    kind = d.get("study")
    if kind not in PLOTTERS:
        print(f"plot_study.py: error: study = {kind!r} is not allowed: must be one of {', '.join(PLOTTERS)}",
              file=sys.stderr)
        return 2
    fig = PLOTTERS[kind](d)
    out = a.out or os.path.splitext(a.study_json[0])[0] + ".png"
    fig.savefig(out, dpi=110)
    plt.close(fig)
    print(f"wrote {os.path.relpath(out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
