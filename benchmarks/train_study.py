"""One `rlkv train` step at a realistic size, against stock generation measured in the same call.

Measures, for one model shape (dummy weights: the speed does not depend on them):
- stock vLLM generation tok/s on the step's workload (prompts x group samples x new tokens), then
- `rlkv train` for ``--steps`` steps, colocated (rollout engine and learner share the GPU): gated-mode
  rollout tok/s, learner seconds per step and its peak GPU memory, the gate push's seconds;
- the paper's recipe (185 steps) extrapolated from the measured step.

  python benchmarks/train_study.py --model /tmp/llama8b --prompts 32 --group 4 --input-len 256 \\
      --max-new-tokens 4096 --out benchmarks/results/train-DEVICE-vllmX-DATE.json
  python benchmarks/train_study.py --tiny --out /tmp/train-study.json    # the whole path on CPU, small

Prompts are random tokens of the shape's synthetic tokenizer (``t<id>`` words, see ../shared/gpu/dev/
make_model.py) or, with ``--tiny``, words of the tiny model's tokenizer; the reward is a deterministic
text hash (dummy weights answer noise), so the learner has non-zero advantages to back-propagate.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import os
import platform
import random
import subprocess
import sys
import tempfile
import time
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
RECIPE_STEPS = 185  # the paper's recipe: ~3,000 prompts / 32 per step x 2 epochs


def write_prompts(path: str, n: int, length: int, tiny: bool, seed: int) -> None:
    rng = random.Random(seed)
    words = ("Ada Bob apples coins count first next subtract plus times answer think step how many".split()
             if tiny else None)
    with open(path, "w") as f:
        for i in range(n):
            toks = [rng.choice(words) if tiny else f"t{rng.randrange(10, 120000)}" for _ in range(length)]
            f.write(json.dumps({"id": f"p{i}", "prompt": " ".join(toks)}) + "\n")


def stock_generation(a: argparse.Namespace, prompts_file: str) -> dict[str, Any]:
    """Stock vLLM (no RLKV) on the same prompts and sampling, in a child process (frees the GPU after)."""
    code = f"""
import json, time
from vllm import LLM, SamplingParams
prompts = [json.loads(l)["prompt"] for l in open({prompts_file!r})]
kw = dict(model={a.model!r}, dtype={a.dtype!r}, load_format={a.load_format!r}, max_model_len={a.max_model_len},
          max_num_seqs={a.max_num_seqs}, enable_prefix_caching=False, seed=0)
kw.update({a.engine_memory!r})
t0 = time.perf_counter(); llm = LLM(**kw); start = time.perf_counter() - t0
sp = SamplingParams(n={a.group}, temperature=1.0, max_tokens={a.max_new_tokens}, ignore_eos=True, seed=1)
t0 = time.perf_counter(); outs = llm.generate(prompts, sp, use_tqdm=False); dt = time.perf_counter() - t0
tokens = sum(len(c.token_ids) for o in outs for c in o.outputs)
print("STOCK", json.dumps(dict(engine_start_s=start, generate_s=dt, tokens=tokens, tok_s=tokens / dt)))
"""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p)}
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=a.stock_timeout)
    line = next((ln for ln in r.stdout.splitlines() if ln.startswith("STOCK ")), None)
    if r.returncode != 0 or line is None:
        raise SystemExit(f"stock generation failed (rc {r.returncode}): {(r.stderr or r.stdout)[-2000:]}")
    return json.loads(line[6:])


def train(a: argparse.Namespace, prompts_file: str, out: str) -> dict[str, Any]:
    cfg = os.path.join(ROOT, "trainer", "configs", "tiny.yaml" if a.tiny else "deepseek-r1-distill-llama-8b.yaml")
    gpu = not a.tiny
    sets = [
        f"model.path={a.model}", "model.tiny=false", f"model.dtype={a.dtype}", f"model.load_format={a.load_format}",
        f"data.path={prompts_file}", "data.chat_template=false",
        f"data.max_prompt_tokens={a.max_model_len - a.max_new_tokens}",
        "reward.kind=plugin", "reward.plugin=benchmarks.study_rewards:by_text_hash",
        f"rollout.prompts_per_step={a.prompts}", f"rollout.sampling.group_size={a.group}",
        f"rollout.sampling.max_new_tokens={a.max_new_tokens}", f"rollout.max_model_len={a.max_model_len}",
        f"rollout.max_num_seqs={a.max_num_seqs}", f"rollout.sink={a.sink}", f"rollout.recent={a.recent}",
        f"learner.micro_batch_tokens={a.micro_batch_tokens}", f"learner.dtype={a.learner_dtype}",
        f"learner.attention={a.learner_attention}",
        f"run.steps={a.steps}", "run.checkpoint_every=0", "data.shuffle_seed=0",
    ]
    if gpu:
        sets += ["rollout.colocate=true", "rollout.num_gpus_per_worker=0.5", "learner.num_gpus=0.5", "learner.device=cuda",
                 f"rollout.gpu_memory_utilization={a.gpu_mem}", "learner.gradient_checkpointing=true",
                 "ray.num_gpus=1", "rollout.enforce_eager=false"]
        if a.sleep_level:
            sets += ["rollout.sleep=true", f"rollout.sleep_level={a.sleep_level}"]
    cmd = [sys.executable, "-m", "rlkv_vllm.cli", "train", "--config", cfg, "--out", out]
    for s in sets:
        cmd += ["--set", s]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p)}
    t0 = time.perf_counter()
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=a.train_timeout)
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        raise SystemExit(f"rlkv train failed (rc {r.returncode}): {r.stderr[-3000:]}")
    rows = list(csv.DictReader(open(os.path.join(out, "metrics.csv"))))
    return {"command": " ".join(cmd), "wall_s": wall, "rows": rows}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="/tmp/llama8b", help="model folder (config + tokenizer; weights optional)")
    p.add_argument("--tiny", action="store_true", help="the tiny CPU model and a small workload (smoke run)")
    p.add_argument("--load-format", default="dummy", choices=["auto", "dummy"], help="vLLM's and the learner's")
    p.add_argument("--dtype", default="bfloat16", help="rollout engine dtype")
    p.add_argument("--learner-dtype", default="bfloat16", help="learner dtype")
    for flag, default, text in (("--prompts", 32, "prompts per step"), ("--group", 4, "samples per prompt"),
                                ("--input-len", 256, "prompt tokens"), ("--max-new-tokens", 4096, "new tokens per sample"),
                                ("--max-model-len", 4608, "vLLM max_model_len"), ("--max-num-seqs", 128, "vLLM max_num_seqs"),
                                ("--sink", 128, "training window: sink tokens"),
                                ("--recent", 256, "training window: recent tokens"),
                                ("--micro-batch-tokens", 8192, "learner token budget per micro-batch"),
                                ("--steps", 1, "training steps to time")):
        p.add_argument(flag, type=int, default=default, help=text)
    p.add_argument("--learner-attention", default="auto", choices=["auto", "batched", "flex"],
                   help="the learner's gated attention (auto: flex on CUDA, batched on the CPU)")
    p.add_argument("--sleep-level", type=int, default=0, choices=[0, 1, 2],
                   help="rollout.sleep with this level (0: no sleep; GPU only)")
    p.add_argument("--gpu-mem", type=float, default=0.45, help="vLLM's GPU share, colocated with the learner")
    p.add_argument("--stock-timeout", type=float, default=900, help="seconds for the stock generation child")
    p.add_argument("--train-timeout", type=float, default=1800, help="seconds for rlkv train")
    p.add_argument("--out", required=True, help="results JSON")
    a = p.parse_args(argv)
    if a.tiny:
        from tests.engine_utils import tiny_model_dir

        # dummy weights as on the GPU (the learner's, exported to the rollout engines): the logged
        # sampler-learner gap then checks that both sides run one model
        a.model, a.dtype, a.learner_dtype = tiny_model_dir(), "float32", "float32"
        a.prompts, a.group, a.input_len, a.max_new_tokens = min(a.prompts, 4), min(a.group, 2), 24, 16
        a.max_model_len, a.max_num_seqs, a.sink, a.recent, a.micro_batch_tokens = 128, 16, 4, 8, 512
    a.engine_memory = ({"kv_cache_memory_bytes": 64 << 20, "enforce_eager": True} if a.tiny
                       else {"gpu_memory_utilization": a.gpu_mem})
    work = tempfile.mkdtemp(prefix="rlkv-train-study-")
    prompts_file = os.path.join(work, "prompts.jsonl")
    write_prompts(prompts_file, a.prompts * max(1, a.steps), a.input_len, a.tiny, seed=0)
    stock = stock_generation(a, prompts_file)
    run = train(a, prompts_file, os.path.join(work, "run"))
    last = run["rows"][-1]
    num = lambda k: float(last[k])  # noqa: E731
    step_s = sum(num(k) for k in ("rollout_s", "reward_s", "learn_s", "gate_push_s", "sleep_s", "wake_s"))
    try:
        import torch

        device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"cpu-{platform.machine()}"
    except Exception:  # noqa: BLE001
        device = f"cpu-{platform.machine()}"
    import vllm

    result = {
        "study": "train-step", "device": device, "vllm": vllm.__version__,
        "date": datetime.date.today().isoformat(), "command": "python benchmarks/train_study.py " + " ".join(argv or sys.argv[1:]),
        "workload": {k: getattr(a, k) for k in ("model", "load_format", "prompts", "group", "input_len",
                                                 "max_new_tokens", "sink", "recent", "micro_batch_tokens", "learner_attention", "gpu_mem",
                                                 "sleep_level", "steps")},
        "stock": stock,
        "train": {"command": run["command"], "wall_s": run["wall_s"], "metrics": run["rows"]},
        "summary": {
            "gated_rollout_tok_s": num("rollout_tok_s"), "stock_generate_tok_s": stock["tok_s"],
            "gated_vs_stock": num("rollout_tok_s") / stock["tok_s"], "learner_s_per_step": num("learn_s"),
            "learner_peak_gib": num("learner_peak_gib"), "gate_push_s": num("gate_push_s"),
            "sleep_s": num("sleep_s"), "wake_s": num("wake_s"),
            "step_s": step_s, "recipe_steps": RECIPE_STEPS, "recipe_hours": step_s * RECIPE_STEPS / 3600,
        },
    }
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    with open(a.out, "w") as f:
        json.dump(result, f, indent=1)
    sm = result["summary"]
    print(f"{device}, vLLM {vllm.__version__}: gated rollouts {sm['gated_rollout_tok_s']:,.0f} tok/s vs stock "
          f"{sm['stock_generate_tok_s']:,.0f} ({sm['gated_vs_stock']:.2f}x); learner {sm['learner_s_per_step']:.1f} s/step "
          f"(peak {sm['learner_peak_gib']:.1f} GiB); gate push {sm['gate_push_s']:.3f} s; step {step_s:.0f} s -> "
          f"{RECIPE_STEPS} steps {sm['recipe_hours']:.1f} h")
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
