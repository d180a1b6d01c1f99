"""The results algebra: ratios against stock, merging runs into one study file, its JSON and path.

A study file holds the results of one workload on one device, gathered over any number of
runs; each run keeps the ratios measured within it, since the file's top-level ratios may
divide by another run's stock config.
"""

from __future__ import annotations

import datetime
import json
import os
import re
from dataclasses import asdict
from typing import Any

from .config import BenchSettings, bench_error, workload_keys


def _base(results: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The first stock config that produced figures: ratios are relative to it."""
    return next((r for r in results if r.get("kind") == "stock" and r.get("status") in ("ok", "truncated")), None)


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def _kv_dtype(r: dict[str, Any]) -> str:
    return r.get("kv_cache_dtype") or "auto"


def _row_ratios(r: dict[str, Any], base: dict[str, Any]) -> dict[str, Any]:
    """One config's figures divided by ``base``'s."""
    bt = base.get("throughput") or base.get("steady") or {}
    bcells = {(c["batch"], c["context"]): c for c in base.get("latency") or []}
    row: dict[str, Any] = {"config": r["config"],
                           "capacity": _ratio(r.get("capacity_tokens"), base.get("capacity_tokens"))}
    t = r.get("throughput") or r.get("steady")
    if t is not None:
        row["output_tok_s"] = _ratio(t.get("output_tok_s"), bt.get("output_tok_s"))
        row["total_tok_s"] = _ratio(t.get("total_tok_s"), bt.get("total_tok_s"))
        row["tpot_mean"] = _ratio(t.get("tpot_mean_s"), bt.get("tpot_mean_s"))
        row["tpot_p90"] = _ratio(t.get("tpot_p90_s"), bt.get("tpot_p90_s"))
        row["mean_running"] = _ratio(t.get("mean_running"), bt.get("mean_running"))
        if "steady" in r:  # the step against stock's at its own running count
            row["step_mean"] = _ratio(t.get("step_mean_s"), bt.get("step_mean_s"))
            row["decode_step_mean"] = _ratio(t.get("decode_step_mean_s"), bt.get("decode_step_mean_s"))
    if r.get("latency") is not None:
        row["tpot"] = [
            dict(batch=c["batch"], context=c["context"],
                 **{k: _ratio(c.get(k + "_s"), bcells.get((c["batch"], c["context"]), {}).get(k + "_s"))
                    for k in ("tpot_mean", "decode_step_mean")})
            for c in r["latency"] if c.get("status") in ("ok", "truncated")]
    return row


def compute_ratios(results: list[dict[str, Any]]) -> dict[str, Any]:
    """Each config's output tok/s, TPOT and capacity divided by the first stock config's.

    TPOT ratio < 1 means faster decoding than stock. Latency studies get one TPOT ratio
    per (batch, context) cell. A config whose KV-cache dtype differs from the base's (e.g.
    RLKV+FP8 against stock BF16) also gets ``same_kv``: the same ratios against the first
    stock config of its own KV-cache dtype (stock FP8), where one was measured. A config that ran
    another model runner than the base (``model_runner_kind``, V1 or V2) is marked
    ``model_runner_differs``.
    """
    base = _base(results)
    if base is None:
        return {"base": None, "note": "no stock config with figures: nothing to divide by", "rows": []}
    measured = [r for r in results if r.get("status") in ("ok", "truncated")]
    rows = []
    for r in measured:
        row = _row_ratios(r, base)
        kind, base_kind = r.get("model_runner_kind"), base.get("model_runner_kind")
        if kind and base_kind and kind != base_kind:  # a ratio across model runners measures them too
            row["model_runner_differs"] = f"{kind} vs the base's {base_kind}"
        if _kv_dtype(r) != _kv_dtype(base):
            same = _base([x for x in measured if _kv_dtype(x) == _kv_dtype(r)])
            if same is not None and same is not r:  # stock FP8 itself: its own base
                row["same_kv"] = {"base": same["config"], **_row_ratios(r, same)}
        rows.append(row)
    return {"base": base["config"], "rows": rows}


def merge_results(old: list[dict[str, Any]], new: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Replace same-named configs in place, append the others. Skipped configs never
    replace figures measured earlier (a later call that ran out of time keeps them)."""
    out = list(old)
    index = {r["config"]: i for i, r in enumerate(out)}
    for r in new:
        i = index.get(r["config"])
        if i is None:
            index[r["config"]] = len(out)
            out.append(r)
        elif r.get("status") != "skipped" or out[i].get("status") == "skipped":
            out[i] = r
    return out


def merge_study(old: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    """Merge a new run into an existing study file; refuse if the workload or device differs."""
    if old.get("study") != new["study"]:
        raise bench_error("out", old.get("study"), f"the file holds another study; this run is {new['study']!r}")
    keys = workload_keys(new["study"])
    for k, v in new["settings"].items():
        if k in keys and k in old.get("settings", {}) and old["settings"][k] != v:
            raise bench_error(k, v, f"the study file was measured with {old['settings'][k]!r}; "
                                    "use the same workload or another --out/--tag")
    for k in ("device", "vllm"):
        if old.get(k) and new.get(k) and old[k] != new[k]:
            raise bench_error(k, new[k], f"the study file was measured with {old[k]!r}; use another --out/--tag")
    merged = dict(new)
    merged["results"] = merge_results(old.get("results", []), new["results"])
    merged["runs"] = old.get("runs", []) + new["runs"]
    merged["ratios"] = compute_ratios(merged["results"])
    return merged


def check_mergeable(path: str, s: BenchSettings) -> None:
    """Before spending device time: refuse an existing study file measured with another workload."""
    if not os.path.isfile(path):
        return
    with open(path) as f:
        old = json.load(f)
    probe = dict(study=s.study, settings=s.workload(), results=[], runs=[])
    merge_study(old, probe)


METHOD = ("one engine per subprocess; engine core in-process (VLLM_ENABLE_V1_MULTIPROCESSING=0), driven by "
          "LLMEngine.add_request + step(); token times taken when step() returns them; mean running = "
          "scheduler len(running) at each batch that ran the model")


def build_study(s: BenchSettings, results: list[dict[str, Any]], command: str,
                extra: dict[str, Any]) -> dict[str, Any]:
    """The study JSON for one run (device and versions come from the children)."""
    measured = [r for r in results if r.get("device")]
    dev = measured[0]["device"] if measured else None
    vllm_v = measured[0]["vllm"] if measured else None
    torch_v = measured[0]["torch"] if measured else None
    now = datetime.datetime.now()
    # a merged file's top-level ratios may divide by another run's stock config; these never do
    run = dict(date=now.date().isoformat(), time=now.isoformat(timespec="seconds"), command=command,
               device=dev, vllm=vllm_v, configs=[r["config"] for r in results],
               ratios_within_run=compute_ratios(results), **extra)
    return dict(study=s.study, device=dev, vllm=vllm_v, torch=torch_v, date=run["date"], command=command,
                method=METHOD, settings=asdict(s), runs=[run], results=results, ratios=compute_ratios(results))


def default_out_path(results_dir: str, study: dict[str, Any], tag: str = "") -> str:
    """<study>-<device>-vllm<version>-<date>[-tag].json under results_dir."""
    dev = re.sub(r"[^A-Za-z0-9_.-]+", "_", study.get("device") or "unknown")
    name = f"{study['study']}-{dev}-vllm{study.get('vllm') or 'unknown'}-{study['date']}"
    return os.path.join(results_dir, name + (f"-{tag}" if tag else "") + ".json")


def write_study(path: str, study: dict[str, Any]) -> dict[str, Any]:
    """Write the study, merged into the file if one exists; return what was written."""
    if os.path.isfile(path):
        with open(path) as f:
            study = merge_study(json.load(f), study)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(study, f, indent=1)
    return study
