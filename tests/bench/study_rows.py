"""Result rows as a child writes them, for the results and report tests."""

from __future__ import annotations

from typing import Any

from rlkv_vllm.bench.config import parse_config


def result_row(name: str, tok_s: float, tpot: float, cap: int, status: str = "ok") -> dict[str, Any]:
    cfg = parse_config(name)
    return dict(config=name, kind=cfg.kind, kv_cache_dtype=cfg.kv_cache_dtype or "auto", status=status, capacity_tokens=cap, device="dev", vllm="0.26.0",
                torch="2.11", throughput=dict(output_tok_s=tok_s, total_tok_s=2 * tok_s, tpot_mean_s=tpot,
                                              tpot_p90_s=tpot, mean_running=tok_s / 10))
