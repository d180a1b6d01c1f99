"""A study from the command line: options to settings (building the tiny model when no model is
given), each config run by the supervisor, the study file written or merged, the table printed.

``rlkv bench`` and ``benchmarks/engine_study.py`` are this with their own defaults.
"""

from __future__ import annotations

import argparse
import os
import time
from typing import Any

from .config import BenchError, BenchSettings, bench_error, parse_configs, validate_settings
from .report import format_duration, format_table
from .results import build_study, check_mergeable, default_out_path, write_study
from .supervise import run_configs


def tiny_defaults(cache_dir: str) -> tuple[str, str]:
    """Build (once) the tiny local model and its random pattern; return (model dir, pattern path)."""
    from ..tiny_model import TinyModelSpec, build_tiny_model, random_pattern

    model = build_tiny_model(cache_dir, TinyModelSpec())
    pattern = os.path.join(cache_dir, "rlkv_pattern.json")
    if not os.path.isfile(pattern):
        random_pattern(TinyModelSpec()).save(pattern)
    return model, pattern


def settings_from_args(a: argparse.Namespace, cache_dir: str) -> BenchSettings:
    """Settings for the parsed options; builds the tiny model when no model is given."""
    tiny = a.model is None
    model, pattern = a.model, a.pattern
    if tiny:
        model, tiny_pattern = tiny_defaults(cache_dir)
        pattern = pattern or tiny_pattern
    s = BenchSettings(
        model=model, pattern=os.path.abspath(pattern) if pattern else None,
        study="latency" if a.latency else "steady" if a.steady else "engine",
        # vLLM's "auto" casts fp32 checkpoints to 16 bits; the tiny model is meant for fp32
        dtype="float32" if tiny and a.dtype == "auto" else a.dtype, load_format=a.load_format,
        kv_bytes=a.kv_bytes, gpu_mem=a.gpu_mem, max_num_seqs=a.max_num_seqs,
        max_model_len=a.max_model_len or (4096 if tiny else 8192), block_size=a.block_size,
        enforce_eager=a.enforce_eager, num_prompts=a.num_prompts, input_len=a.input_len, output_len=a.output_len,
        temperature=a.temperature, seed=a.seed, detokenize=a.detokenize, batches=list(a.batches),
        contexts=list(a.contexts), latency_output_len=a.latency_output_len,
        concurrency=a.concurrency, output_dist=a.output_dist, input_min=a.input_range[0],
        input_max=a.input_range[1], warmup_s=a.warmup_s, window_s=a.window_s,
        profile_steps=a.profile_steps, profile_start=a.profile_start)
    validate_settings(s)
    if any(c.kind != "stock" for c in a.configs) and not s.pattern:
        raise bench_error("pattern", None,
                          "rlkv configs need --pattern FILE (RLKV/DuoAttention TSV, JSON or safetensors)")
    if s.pattern and not os.path.isfile(s.pattern):
        raise bench_error("pattern", s.pattern, "no such file: give a readable pattern file")
    return s


def run_from_args(a: argparse.Namespace, *, cache_dir: str, results_dir: str | None, command: str,
                  log: Any = print) -> dict[str, Any]:
    """Run the study the options describe, write its JSON (if results_dir or --out), print the table."""
    parse_configs([c.name for c in a.configs])  # refuses duplicates
    s = settings_from_args(a, cache_dir)
    if a.out:
        check_mergeable(a.out, s)
    log(f"{s.study} study: {' '.join(c.name for c in a.configs)} on {s.model}")
    t0 = time.time()
    results = run_configs(s, a.configs, deadline_s=a.deadline_s, config_timeout_s=a.config_timeout_s,
                          min_config_s=a.min_config_s, log=log)
    log(f"{len(results)} config{'s' if len(results) != 1 else ''} in {format_duration(time.time() - t0)}")
    study = build_study(s, results, command, dict(deadline_s=a.deadline_s))
    path = a.out or (default_out_path(results_dir, study, a.tag) if results_dir else None)
    if path:
        try:
            study = write_study(path, study)
        except BenchError as e:  # keep the figures: write them beside the study they do not fit
            path = path[:-5] + time.strftime("-%H%M%S") + ".json"
            log(f"not merged ({e}); writing {path}")
            study = write_study(path, study)
    log("")
    log(format_table(study))
    if path:
        log(f"\nwrote {os.path.relpath(path)}")
    return study
