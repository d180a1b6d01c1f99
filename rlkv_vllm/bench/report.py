"""What the user reads: the study table, and one line per event of a running config.

Pure Python; the supervisor prints these lines as the children report, the table at the end.
"""

from __future__ import annotations

from typing import Any


def fmt_ms(x: float | None) -> str:
    return "-" if x is None else f"{x * 1e3:.2f}"


def _fx(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}x"


def _fnum(x: float | None, spec: str = ",.1f") -> str:
    return "-" if x is None else format(x, spec)


def format_profiles(results: list[dict[str, Any]]) -> list[str]:
    """One line per profiled config: wall and device ms per step, busy fraction, the biggest categories."""
    lines = []
    for r in results:
        p = r.get("profile")
        if not p:
            continue
        if "ms_per_step" not in p:
            lines.append(f"profile {r['config']}: {p.get('status', 'none')}")
            continue
        cats = ", ".join(f"{k} {v:.2f}" for k, v in list(p["ms_per_step"].items())[:6])
        lines.append(f"profile {r['config']} ({p['steps']} steps, {p['device']}): wall {p['wall_ms_per_step']:.2f} "
                     f"ms/step, device {p['device_ms_per_step']:.2f} (busy {p['busy_fraction']}); ms/step: {cats}")
    if lines:
        lines.insert(0, "")
    return lines


def format_step_split(config: str, split: dict[str, Any]) -> str:
    """One line: where a steady window's step time went, by what the scheduler put in the steps."""
    d, p = split["decode_only"], split["with_prefill"]
    share = split.get("recompute_share_of_prefill")
    return (f"{config}: decode-only steps {d['steps']:,} (mean {fmt_ms(d['mean_s'])} ms, "
            f"{_pct(d['share_of_time'])} of the time); steps with prefill {p['steps']:,} (mean {fmt_ms(p['mean_s'])} ms, "
            f"{_pct(p['share_of_time'])}); {split['prefill_tokens']:,} prefill tokens, "
            f"{_pct(share)} of them recompute of preempted requests")


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.0f} %"


def format_table(study: dict[str, Any]) -> str:
    """Readable figures and ratios (vs the first stock config) for an engine or latency study."""
    ratios = {r["config"]: r for r in study["ratios"]["rows"]}
    base = study["ratios"]["base"]
    lines = [f"{study['study']} study on {study.get('device') or '?'}, vLLM {study.get('vllm') or '?'}; "
             f"ratios vs {base or '- (no stock config measured)'}"]
    if study["study"] == "steady":
        st = study.get("settings", {})
        lines.append(f"steady state: {st.get('concurrency') or 'max_num_seqs + 25%'} requests kept in the engine, "
                     f"prompts {st.get('input_min')}-{st.get('input_max')}, outputs {st.get('output_dist')}; "
                     f"window {st.get('window_s')} s after {st.get('warmup_s')} s of warm-up")
        lines.append(f"{'config':<16} {'status':<9} {'out tok/s':>10} {'running':>8} {'TPOT ms':>8} {'step ms':>8} "
                     f"{'dec step':>8} {'preempt':>7} {'capacity':>10} | {'tok/s x':>7} {'run x':>6} "
                     f"{'step x':>6} {'cap x':>6}")
        for r in study["results"]:
            t = r.get("steady") or {}
            q = ratios.get(r["config"], {})
            lines.append(
                f"{r['config']:<16} {r['status']:<9} {_fnum(t.get('output_tok_s')):>10} "
                f"{_fnum(t.get('mean_running')):>8} {fmt_ms(t.get('tpot_mean_s')):>8} {fmt_ms(t.get('step_mean_s')):>8} "
                f"{fmt_ms(t.get('decode_step_mean_s')):>8} {_fnum(t.get('preemptions'), ',d'):>7} "
                f"{_fnum(r.get('capacity_tokens'), ',d'):>10} | {_fx(q.get('output_tok_s')):>7} "
                f"{_fx(q.get('mean_running')):>6} {_fx(q.get('step_mean')):>6} {_fx(q.get('capacity')):>6}")
        lines.extend(format_step_split(r["config"], (r.get("steady") or {}).get("step_split"))
                     for r in study["results"] if (r.get("steady") or {}).get("step_split"))
        lines.extend(format_profiles([{**r, "profile": (r.get("steady") or {}).get("profile")}
                                      for r in study["results"]]))
    elif study["study"] == "engine":
        lines.append(f"{'config':<16} {'status':<9} {'start s':>7} {'out tok/s':>10} {'TPOT ms':>8} {'p50':>7} "
                     f"{'p90':>7} {'running':>8} {'preempt':>7} {'capacity':>10} | "
                     f"{'tok/s x':>7} {'TPOT x':>7} {'cap x':>7}")
        for r in study["results"]:
            t = r.get("throughput") or {}
            q = ratios.get(r["config"], {})
            lines.append(
                f"{r['config']:<16} {r['status']:<9} {_fnum(r.get('engine_start_s')):>7} "
                f"{_fnum(t.get('output_tok_s')):>10} {fmt_ms(t.get('tpot_mean_s')):>8} "
                f"{fmt_ms(t.get('tpot_p50_s')):>7} {fmt_ms(t.get('tpot_p90_s')):>7} "
                f"{_fnum(t.get('mean_running')):>8} {_fnum(t.get('preemptions'), ',d'):>7} "
                f"{_fnum(r.get('capacity_tokens'), ',d'):>10} | "
                f"{_fx(q.get('output_tok_s')):>7} {_fx(q.get('tpot_mean')):>7} {_fx(q.get('capacity')):>7}")
        lines.extend(format_profiles(study["results"]))
    else:
        lines.append("TPOT ms per (batch, context); in brackets: vs the stock config")
        lines.extend(_latency_block(study, ratios, "tpot_mean"))
        lines.append("decode-only step ms (steps in which every request decoded: no prefill chunk); vs stock")
        lines.extend(_latency_block(study, ratios, "decode_step_mean"))
    lines.extend(_same_kv_lines(study))
    return "\n".join(lines)


def _same_kv_lines(study: dict[str, Any]) -> list[str]:
    """Configs whose KV-cache dtype differs from the base's (RLKV+FP8 vs stock BF16), also against
    stock of their own KV dtype (RLKV+FP8 vs stock FP8): one line each."""
    out = []
    for q in study["ratios"]["rows"]:
        same = q.get("same_kv")
        if not same:
            continue
        parts = [f"{label} {_fx(same.get(key))}" for key, label in (
            ("output_tok_s", "tok/s"), ("mean_running", "running"), ("tpot_mean", "TPOT"), ("capacity", "capacity"))
            if same.get(key) is not None]
        for c in same.get("tpot") or []:
            parts.append(f"b{c['batch']} c{c['context']} TPOT {_fx(c.get('tpot_mean'))}")
        out.append(f"{q['config']} vs {same['base']} (same KV dtype): {', '.join(parts) or '-'}")
    return out


def _latency_block(study: dict[str, Any], ratios: dict[str, Any], key: str) -> list[str]:
    """One row per config of ``key + '_s'`` per (batch, context) cell, with its ratio to stock."""
    cells = sorted({(c["batch"], c["context"]) for r in study["results"] for c in r.get("latency") or []})
    head = " ".join(f"{f'b{b} c{c}':>12}" for b, c in cells)
    lines = [f"{'config':<16} {'status':<9} {'capacity':>10} {'cap x':>6}  {head}"]
    for r in study["results"]:
        by = {(c["batch"], c["context"]): c for c in r.get("latency") or []}
        q = ratios.get(r["config"], {})
        qt = {(c["batch"], c["context"]): c.get(key) for c in q.get("tpot", [])}
        vals = []
        for cell in cells:
            c = by.get(cell, {})
            v = fmt_ms(c.get(key + "_s")) if c.get("status") in ("ok", "truncated") else "-"
            x = qt.get(cell)
            vals.append(f"{v + (f' ({x:.2f})' if x is not None else ''):>12}")
        lines.append(f"{r['config']:<16} {r['status']:<9} {_fnum(r.get('capacity_tokens'), ',d'):>10} "
                     f"{_fx(q.get('capacity')):>6}  {' '.join(vals)}")
    return lines


# ---------------------------------------------------------------- progress lines


def format_event(ev: dict[str, Any]) -> str | None:
    """One line for a child's progress event (see progress.py), None for a kind it does not know."""
    kind = ev.get("event")
    if kind == "engine_start":
        return f"engine up in {ev['engine_start_s']:.1f} s, KV capacity {_fnum(ev.get('capacity_tokens'), ',d')} tokens"
    if kind == "progress" and "phase" in ev:
        running = "" if ev.get("running") is None else f", {ev['running']} running"
        return f"steady state, {ev['phase']} {ev['elapsed_s']:.0f} s: {ev['tokens']:,} tokens in the window{running}"
    if kind == "progress":
        part = "" if ev.get("part") in (None, "throughput") else f"{ev['part']}, "
        running = "" if ev.get("running") is None else f", {ev['running']} running"
        return (f"{part}generating {ev['elapsed_s']:.0f} s: {ev['done']}/{ev['total']} requests done, "
                f"{ev['tokens']:,} tokens out{running}")
    if kind == "cell":
        return f"batch {ev['batch']} context {ev['context']}: TPOT {fmt_ms(ev.get('tpot_mean_s'))} ms"
    return None


def format_finished(r: dict[str, Any]) -> str:
    """The line that closes a config: its status, wall time and headline figures."""
    line = f"{r['status']} in {r['wall_s']:.0f} s"
    t = r.get("throughput") or r.get("steady")
    if t:
        line += (f": {_fnum(t.get('output_tok_s'))} out tok/s, mean running {_fnum(t.get('mean_running'))}, "
                 f"TPOT {fmt_ms(t.get('tpot_mean_s'))} ms")
    return line


def format_duration(seconds: float) -> str:
    """``1 min 05 s`` or ``42 s``."""
    m, sec = divmod(round(seconds), 60)
    return f"{m} min {sec:02d} s" if m else f"{sec} s"
