"""The planted-heads benchmark: does ``rlkv train`` find the KV heads a task needs, against known ground truth?

Stages (each cached where it is costly; ``--stage`` runs one):

1. fixture: the tiny passkey-recall model (``planted_task.py``), trained once and committed under
   benchmarks/fixtures/planted-recall/; the trainer's prompt file (512 prompts, seed 1) beside it.
2. ground truth: every (layer, KV head) made streaming alone (sink 4 + recent 8, the oracle's serve
   semantics: ``hf_reference`` with a full-head mask), the others full; its drop in greedy accuracy on 1,000
   held-out prompts (seed 2) against every head full. "Critical" = drop > ``CRITICAL_DROP`` (10 points):
   more than four standard errors of a paired accuracy difference on 1,000 prompts (at most 0.022), and a head
   whose loss alone costs more than the 5% the learned pattern may lose; AUCs at other thresholds are
   reported too.
3. training: ``rlkv train --config benchmarks/planted_heads.yaml`` twice, the correctness reward (the gold
   value) and the label-free agreement reward (the value the model gives with every gate 1), each timed.
4. analysis: ROC AUC of the learned gates against the labels; the learned pattern's sparsity (the share of
   gates below the largest gap in the sorted gates, ``natural_sparsity``); greedy accuracy of the global
   quantile selection at that sparsity (``patterns.select_full_heads``) against 5 random patterns with as
   many full heads (seeds 0-4), and the same for every count of full heads (the curves in the plot).

Writes benchmarks/results/planted-heads-<device>-vllm<version>-<date>.json and .png and prints a table.

    python benchmarks/planted_heads.py                      # everything (trains the fixture if missing)
    python benchmarks/planted_heads.py --skip-train         # re-analyse the runs already in --runs
    python benchmarks/planted_heads.py --smoke              # one training step each, no results file
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from typing import Any, Sequence

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)

import planted_task as task  # noqa: E402 - the sibling script

CONFIG = os.path.join(HERE, "planted_heads.yaml")
PROMPTS = os.path.join(HERE, "fixtures", "planted-prompts.jsonl")
RESULTS_DIR = os.path.join(HERE, "results")
DATE = "2026-12-03"
TRAIN_PROMPTS, TRAIN_SEED = 512, 1
EVAL_PROMPTS, EVAL_SEED = 1000, 2
CRITICAL_DROP = 0.10
THRESHOLDS = (0.02, 0.05, 0.10, 0.20, 0.50)
RANDOM_SEEDS = (0, 1, 2, 3, 4)
BUDGET_S = 20 * 60
REWARDS = ("correctness", "agreement")
TARGETS = {"auc": 0.9, "kept_fraction": 0.95, "random_loss_points": 20.0}


# ---------------------------------------------------------------- pure helpers (tested)


def roc_auc(scores: Sequence[float], labels: Sequence[bool]) -> float | None:
    """ROC AUC of ``scores`` for the positive ``labels``: P(score of a positive > score of a negative), ties
    counting one half (the Mann-Whitney statistic). None when one class is empty."""
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    y = np.asarray(labels, dtype=bool).reshape(-1)
    pos, neg = s[y], s[~y]
    if pos.size == 0 or neg.size == 0:
        return None
    diff = pos[:, None] - neg[None, :]
    return float(((diff > 0).sum() + 0.5 * (diff == 0).sum()) / diff.size)


def accuracy(predicted: Sequence[int], gold: Sequence[int]) -> float:
    """Share of exact matches."""
    p, g = np.asarray(predicted), np.asarray(gold)
    if p.shape != g.shape or p.size == 0:
        raise ValueError(f"accuracy: {p.shape} predictions for {g.shape} answers")
    return float((p == g).mean())


def natural_sparsity(gates: np.ndarray) -> float:
    """The share of heads the trainer closed: gates (clipped to [0, 1]) sorted, split at the largest gap
    between neighbours; the heads below it are the closed ones. 0 when every gate is equal."""
    g = np.sort(np.clip(np.asarray(gates, dtype=np.float64).reshape(-1), 0.0, 1.0))
    if g.size < 2 or g[-1] == g[0]:
        return 0.0
    cut = int(np.argmax(np.diff(g))) + 1  # heads [0, cut) are below the gap
    return cut / g.size


def random_masks(shape: tuple[int, int], n_full: int, seeds: Sequence[int] = RANDOM_SEEDS) -> list[np.ndarray]:
    """One bool mask per seed with ``n_full`` full heads drawn uniformly without replacement."""
    out = []
    for seed in seeds:
        flat = np.zeros(shape[0] * shape[1], dtype=bool)
        flat[np.random.default_rng(seed).choice(flat.size, size=n_full, replace=False)] = True
        out.append(flat.reshape(shape))
    return out


def head_name(layer: int, head: int) -> str:
    return f"L{layer}H{head}"


# ---------------------------------------------------------------- evaluation through the oracle


class Evaluator:
    """Greedy answers of the fixture under the oracle's serve semantics (a full-head mask) on fixed prompts."""

    def __init__(self, model_dir: str, examples: list[task.Example], sink: int, recent: int) -> None:
        import torch
        from transformers import AutoTokenizer

        from rlkv_vllm.core.hf_reference import load_reference_model

        self.torch = torch
        self.model = load_reference_model(model_dir, sink=sink, recent=recent)
        self.sink, self.recent = sink, recent
        self.tokenizer = tok = AutoTokenizer.from_pretrained(model_dir)
        self.ids, self.answers = task.encode_batch(tok, examples)
        cfg = self.model.config
        self.shape = (int(cfg.num_hidden_layers), int(cfg.num_key_value_heads))

    def predictions(self, full_mask: np.ndarray, batch: int = 500) -> np.ndarray:
        """Greedy answer token ids [N] with the heads of ``full_mask`` (bool [L, H_kv], True = full) full, the
        rest streaming."""
        from rlkv_vllm.core.hf_reference import install_oracle

        install_oracle(self.model, full_mask=np.asarray(full_mask, dtype=bool), sink=self.sink, recent=self.recent)
        preds = []
        with self.torch.no_grad():
            for s in range(0, self.ids.shape[0], batch):
                preds.append(self.model(input_ids=self.ids[s:s + batch]).logits[:, -1].argmax(-1))
        return self.torch.cat(preds).numpy()

    def accuracy(self, full_mask: np.ndarray, batch: int = 500) -> float:
        """Greedy accuracy with the heads of ``full_mask`` full, the rest streaming."""
        return accuracy(self.predictions(full_mask, batch), self.answers.numpy())


def ground_truth(ev: Evaluator) -> dict[str, Any]:
    """Accuracy with every head full, every head streaming, and each head streaming alone (its drop)."""
    full = np.ones(ev.shape, dtype=bool)
    dense = ev.accuracy(full)
    drops = np.zeros(ev.shape)
    for layer in range(ev.shape[0]):
        for head in range(ev.shape[1]):
            mask = full.copy()
            mask[layer, head] = False
            drops[layer, head] = dense - ev.accuracy(mask)
    return {"dense_accuracy": dense, "streaming_accuracy": ev.accuracy(~full), "drops": drops.tolist()}


def pattern_accuracy(ev: Evaluator, gates: np.ndarray, sparsity: float) -> dict[str, Any]:
    """The learned pattern at ``sparsity`` (global quantile) against random patterns with as many full heads."""
    from rlkv_vllm.core.patterns import select_full_heads

    mask = select_full_heads(gates, sparsity, "global")
    n_full = int(mask.sum())
    rand = [ev.accuracy(m) for m in random_masks(ev.shape, n_full)]
    return {"sparsity": sparsity, "full_heads": [head_name(*ij) for ij in zip(*np.nonzero(mask))],
            "n_full": n_full, "effective_sparsity": 1.0 - n_full / mask.size, "learned_accuracy": ev.accuracy(mask),
            "random_accuracies": rand, "random_accuracy_mean": float(np.mean(rand))}


CURVE_COUNTS = (0, 1, 2, 3, 4, 5, 6, 8, 10, 12, 14, 16)


def random_curve(ev: Evaluator, counts: Sequence[int] = CURVE_COUNTS) -> list[float]:
    """Mean accuracy of the 5 random patterns with k full heads, for each k (the same for every run)."""
    return [float(np.mean([ev.accuracy(m) for m in random_masks(ev.shape, k)])) for k in counts]


def accuracy_curve(ev: Evaluator, gates: np.ndarray, random_mean: list[float],
                   counts: Sequence[int] = CURVE_COUNTS) -> dict[str, list[Any]]:
    """For each count k of full heads: the k highest learned gates full (ties by index) vs the random mean."""
    order = np.argsort(-np.asarray(gates).reshape(-1), kind="stable")
    learned = []
    for k in counts:
        mask = np.zeros(ev.shape[0] * ev.shape[1], dtype=bool)
        mask[order[:k]] = True
        learned.append(ev.accuracy(mask.reshape(ev.shape)))
    return {"n_full": list(counts), "learned": learned, "random_mean": random_mean}


# ---------------------------------------------------------------- training runs


def train_cmd(reward: str, out: str, steps: int | None) -> list[str]:
    cmd = [sys.executable, "-m", "rlkv_vllm.cli", "train", "--config", CONFIG, "--out", out,
           "--set", f"reward.kind={reward}"]
    return cmd + (["--set", f"run.steps={steps}"] if steps is not None else [])


def load_avg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def run_training(reward: str, out: str, steps: int | None) -> dict[str, Any]:
    """``rlkv train`` in a subprocess, timed; its stderr goes to DIR/train.log."""
    os.makedirs(out, exist_ok=True)
    cmd = train_cmd(reward, out, steps)
    print(f"[planted] {shlex.join(cmd)}", flush=True)
    before, t0 = load_avg(), time.perf_counter()
    with open(os.path.join(out, "train.log"), "w") as log:
        r = subprocess.run(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    wall = time.perf_counter() - t0
    info = {"command": shlex.join(["python", *cmd[1:]]).replace(ROOT + "/", ""), "wall_s": round(wall, 1),
            "returncode": r.returncode, "loadavg_before": before, "loadavg_after": load_avg()}
    with open(os.path.join(out, "timing.json"), "w") as f:
        json.dump(info, f, indent=1)
    if r.returncode != 0:
        raise SystemExit(f"[planted] rlkv train ({reward}) failed with {r.returncode}; see {out}/train.log")
    return info


def read_run(out: str) -> dict[str, Any]:
    """The run's final gates, its timing and a digest of metrics.csv."""
    import csv

    from rlkv_vllm.core.patterns import HeadPattern

    pattern = HeadPattern.load(os.path.join(out, "pattern.json"))
    rows = list(csv.DictReader(open(os.path.join(out, "metrics.csv"))))
    timing = json.load(open(os.path.join(out, "timing.json")))
    cfg = pattern.metadata.get("training_config", {})
    return {"gates": pattern.gates, "timing": timing, "steps": len(rows),
            "reward_first": float(rows[0]["reward_mean"]) if rows else None,
            "reward_last10": float(np.mean([float(x["reward_mean"]) for x in rows[-10:]])) if rows else None,
            "logprob_diff_max": max((float(x["logprob_diff_max"]) for x in rows), default=None),
            "step_s_mean": float(np.mean([float(x["rollout_s"]) + float(x["reward_s"]) + float(x["learn_s"])
                                          for x in rows])) if rows else None,
            "settings": {k: cfg.get(k) for k in ("objective", "optim", "rollout", "run", "reward")}}


# ---------------------------------------------------------------- serving: the chat endpoint


SERVE_ARGS = ["--dtype", "float32", "--max-model-len", "128", "--max-num-seqs", "8",
              "--kv-cache-memory-bytes", str(64 << 20), "--enforce-eager"]
CHAT_PROMPTS = 32  # the first of the held-out prompts


def chat_answers(base_url: str, prompts: Sequence[str], max_tokens: int = 1) -> tuple[list[str], list[int]]:
    """One greedy chat completion per prompt (the user message is the prompt text): the answers' text and the
    prompt token counts the server reports."""
    import urllib.request

    answers, counts = [], []
    for prompt in prompts:
        body = {"model": "tiny", "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
                "temperature": 0}
        req = urllib.request.Request(base_url + "/v1/chat/completions", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=120) as r:
            doc = json.load(r)
        answers.append(doc["choices"][0]["message"]["content"].strip())
        counts.append(int(doc["usage"]["prompt_tokens"]))
    return answers, counts


def serve_check(examples: Sequence[task.Example], pattern: str | None, sparsity: float | None, sink: int,
                recent: int, log_path: str | None = None) -> dict[str, Any]:
    """``rlkv serve`` on the fixture, stock (``pattern`` None: no RLKV backend) or with RLKV at ``sparsity``
    (window sink + recent), and one chat request per example: answers, accuracy, prompt token counts."""
    from rlkv_vllm.server import start_server

    rlkv = None if pattern is None else {"heads": pattern, "sparsity": sparsity, "sink": sink, "recent": recent}
    t0 = time.perf_counter()
    with start_server(task.FIXTURE_DIR, rlkv=rlkv, extra_args=SERVE_ARGS, log_path=log_path,
                      env={"VLLM_ENABLE_V1_MULTIPROCESSING": "1"}) as srv:
        started = time.perf_counter() - t0
        answers, counts = chat_answers(srv.base_url, [ex.prompt for ex in examples])
        args = list(srv.args)
    gold = [ex.answer for ex in examples]
    return {"serve_args": args, "startup_s": round(started, 1), "answers": answers, "prompt_tokens": counts,
            "accuracy": float(np.mean([a == g for a, g in zip(answers, gold)]))}


def chat_check(ev: Evaluator, examples: Sequence[task.Example], pattern: str, sparsity: float) -> dict[str, Any]:
    """The fixture served stock and with the learned pattern at its sparsity, through the chat endpoint: each
    server's answers against the oracle's greedy answers with the same full heads (the same tokens in, the same
    semantics), and the prompt token counts against the training prompts' (BOS + words + ?)."""
    from rlkv_vllm.core.patterns import HeadPattern, select_full_heads

    tok = ev.tokenizer
    n = len(examples)
    expect_tokens = [len(tok(ex.prompt)["input_ids"]) for ex in examples]
    masks = {"stock": np.ones(ev.shape, dtype=bool),
             "rlkv": select_full_heads(HeadPattern.load(pattern).gates, sparsity, "global")}
    out: dict[str, Any] = {"prompts": n, "max_tokens": 1, "temperature": 0, "sparsity": sparsity,
                           "pattern": os.path.relpath(pattern, ROOT)}
    for name, mask in masks.items():
        r = serve_check(examples, None if name == "stock" else pattern, sparsity, ev.sink, ev.recent)
        oracle = [tok.convert_ids_to_tokens(int(i)) for i in ev.predictions(mask)[:n]]
        r["oracle_accuracy"] = float(np.mean([o == ex.answer for o, ex in zip(oracle, examples)]))
        r["matches_oracle"] = int(sum(a == o for a, o in zip(r["answers"], oracle)))
        r["prompt_tokens_as_training"] = r["prompt_tokens"] == expect_tokens
        r["full_heads"] = [head_name(*ij) for ij in zip(*np.nonzero(mask))]
        out[name] = r
    out["met"] = all(out[k]["matches_oracle"] == n and out[k]["prompt_tokens_as_training"] for k in masks)
    return out


# ---------------------------------------------------------------- report


def evaluate_run(ev: Evaluator, gt: dict[str, Any], run: dict[str, Any], random_mean: list[float]) -> dict[str, Any]:
    gates = np.asarray(run["gates"], dtype=np.float64)
    drops = np.asarray(gt["drops"])
    aucs = {f"{t:g}": roc_auc(gates.reshape(-1), (drops > t).reshape(-1)) for t in THRESHOLDS}
    s = natural_sparsity(gates)
    at = pattern_accuracy(ev, gates, s)
    dense = gt["dense_accuracy"]
    auc = aucs[f"{CRITICAL_DROP:g}"]
    checks = {
        "auc": auc is not None and auc >= TARGETS["auc"],
        "kept_fraction": at["learned_accuracy"] >= TARGETS["kept_fraction"] * dense,
        "random_loss_points": 100 * (dense - at["random_accuracy_mean"]) >= TARGETS["random_loss_points"],
        "budget": run["timing"]["wall_s"] <= BUDGET_S,
    }
    # measured minus target (negative: missed by that much); budget: seconds left of the 20 minutes
    margins = {"auc": None if auc is None else auc - TARGETS["auc"],
               "kept_fraction": at["learned_accuracy"] / dense - TARGETS["kept_fraction"] if dense else None,
               "random_loss_points": 100 * (dense - at["random_accuracy_mean"]) - TARGETS["random_loss_points"],
               "budget": BUDGET_S - run["timing"]["wall_s"]}
    return {"gates": gates.tolist(), "auc": auc, "auc_by_threshold": aucs, "at_learned_sparsity": at,
            "target_margins": margins,
            "kept_fraction": at["learned_accuracy"] / dense if dense else None,
            "random_loss_points": 100 * (dense - at["random_accuracy_mean"]),
            "curve": accuracy_curve(ev, gates, random_mean), "timing": run["timing"], "steps": run["steps"],
            "reward_first": run["reward_first"], "reward_last10": run["reward_last10"],
            "logprob_diff_max": run["logprob_diff_max"], "step_s_mean": run["step_s_mean"],
            "settings": run["settings"], "targets_met": checks}


def pattern_path(reward: str) -> str:
    return os.path.join(RESULTS_DIR, f"planted-heads-pattern-{reward}.json")


def export_pattern(out: str, reward: str, sparsity: float, results_name: str) -> str:
    """The run's DIR/pattern.json as benchmarks/results/planted-heads-pattern-<reward>.json, its metadata noting
    the learned sparsity to serve it at (``rlkv serve ... "sparsity": S``) and the results file."""
    from rlkv_vllm.core.patterns import HeadPattern

    pattern = HeadPattern.load(os.path.join(out, "pattern.json"))
    pattern.metadata["planted_heads"] = {"learned_sparsity": sparsity, "results": results_name,
                                         "fixture": os.path.relpath(task.FIXTURE_DIR, ROOT)}
    path = pattern_path(reward)
    pattern.path = None
    pattern.save(path)
    return path


def plot(doc: dict[str, Any], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    drops = np.asarray(doc["ground_truth"]["drops"]).reshape(-1)
    names = [head_name(l, h) for l in range(doc["fixture"]["layers"]) for h in range(doc["fixture"]["kv_heads"])]
    runs = doc["runs"]
    fig, axes = plt.subplots(1, 1 + len(runs), figsize=(5.2 * (1 + len(runs)), 4.4))
    ax = axes[0]
    for i, (reward, r) in enumerate(runs.items()):
        g = np.asarray(r["gates"]).reshape(-1)
        ax.scatter(drops, g, label=f"{reward} (AUC {r['auc']:.2f})", marker="os"[i % 2], alpha=0.75)
        for x, y, n in zip(drops, g, names):
            if x > CRITICAL_DROP:
                ax.annotate(n, (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.axvline(CRITICAL_DROP, color="grey", ls="--", lw=0.8)
    ax.set_xlabel("accuracy drop, this head streaming alone")
    ax.set_ylabel("learned gate")
    ax.set_title("ground truth vs learned gates")
    ax.legend(fontsize=8)
    dense = doc["ground_truth"]["dense_accuracy"]
    for ax, (reward, r) in zip(axes[1:], runs.items()):
        c = r["curve"]
        ax.plot(c["n_full"], c["learned"], "o-", label="learned gates, top k full")
        ax.plot(c["n_full"], c["random_mean"], "s--", label="random k full (mean of 5)")
        ax.axhline(dense, color="grey", lw=0.8, label=f"every head full ({dense:.3f})")
        at = r["at_learned_sparsity"]
        ax.axvline(at["n_full"], color="red", ls=":", lw=0.8, label=f"learned sparsity {at['effective_sparsity']:.3f}")
        ax.set_xlabel("full KV heads (of 16)")
        ax.set_ylabel("greedy accuracy")
        ax.set_title(f"reward: {reward}")
        ax.legend(fontsize=7, loc="lower right")
    fig.suptitle(f"planted heads, {doc['device']}, vLLM {doc['vllm']}, {doc['date']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def summary(doc: dict[str, Any]) -> str:
    gt = doc["ground_truth"]
    lines = [f"fixture {doc['fixture']['path']} ({doc['fixture']['bytes'] / 1e6:.2f} MB): dense accuracy "
             f"{gt['dense_accuracy']:.3f}, all streaming {gt['streaming_accuracy']:.3f}",
             "ablation drops (rows = layers, columns = KV heads):"]
    lines += ["  " + " ".join(f"{d:6.3f}" for d in row) for row in gt["drops"]]
    lines.append(f"critical (drop > {CRITICAL_DROP:g}): {', '.join(gt['critical']) or 'none'}")
    lines.append(f"{'reward':<12} {'AUC':>5} {'sparsity':>8} {'learned':>8} {'random':>8} {'kept':>6} "
                 f"{'rand loss':>9} {'wall s':>7}  met")
    for reward, r in doc["runs"].items():
        at = r["at_learned_sparsity"]
        met = ", ".join(k for k, v in r["targets_met"].items() if v) or "-"
        lines.append(f"{reward:<12} {r['auc']:5.3f} {at['effective_sparsity']:8.3f} {at['learned_accuracy']:8.3f} "
                     f"{at['random_accuracy_mean']:8.3f} {r['kept_fraction']:6.3f} {r['random_loss_points']:9.1f} "
                     f"{r['timing']['wall_s']:7.0f}  {met}")
    if "chat_check" in doc:
        c = doc["chat_check"]
        lines.append(f"chat endpoint, {c['prompts']} prompts: stock {c['stock']['accuracy']:.3f} "
                     f"({c['stock']['matches_oracle']} as the oracle), rlkv at sparsity {c['sparsity']:.3f} "
                     f"{c['rlkv']['accuracy']:.3f} ({c['rlkv']['matches_oracle']} as the oracle); "
                     f"token counts as training: {c['stock']['prompt_tokens_as_training']}, "
                     f"{c['rlkv']['prompt_tokens_as_training']}")
    return "\n".join(lines)


def fixture_info(path: str) -> dict[str, Any]:
    spec = json.load(open(os.path.join(path, "planted_spec.json")))
    cfg = json.load(open(os.path.join(path, "config.json")))
    size = sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path))
    return {"path": os.path.relpath(path, ROOT), "bytes": size, "layers": cfg["num_hidden_layers"],
            "kv_heads": cfg["num_key_value_heads"], "q_heads": cfg["num_attention_heads"], "head_dim": cfg["head_dim"],
            "stages": [{"train_spec": st["train_spec"], "init": st["init"], "train_s": st["train_s"],
                        "log_last": st["log"][-1]} for st in spec["stages"]],
            "commands": spec.get("commands", [])}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", default=os.path.join(ROOT, "runs", "planted-heads"),
                   help="folder for the training runs (default %(default)s)")
    p.add_argument("--skip-train", action="store_true", help="analyse the runs already in --runs")
    p.add_argument("--retrain-fixture", action="store_true", help="train the fixture again (else reuse it)")
    p.add_argument("--rewards", default=",".join(REWARDS), help="rewards to train with (default %(default)s)")
    p.add_argument("--steps", type=int, default=None, help="override run.steps of the config")
    p.add_argument("--smoke", action="store_true", help="one training step per reward, print, write nothing")
    p.add_argument("--out", default=None, help="results JSON path (default benchmarks/results/planted-heads-...)")
    p.add_argument("--skip-serve", action="store_true", help="no chat check through rlkv serve")
    a = p.parse_args()
    import torch

    torch.set_num_threads(1)  # two threads on a shared 2-core machine run far slower (OpenMP spinning)
    t_start = time.perf_counter()
    if a.retrain_fixture or not os.path.isfile(os.path.join(task.FIXTURE_DIR, "model.safetensors")):
        task.train_fixture(task.FIXTURE_DIR)
    if not os.path.isfile(PROMPTS):
        task.write_prompts(PROMPTS, TRAIN_PROMPTS, TRAIN_SEED)
    spec = task.TaskSpec()
    ev = Evaluator(task.FIXTURE_DIR, task.make_examples(EVAL_PROMPTS, EVAL_SEED, spec), spec.sink, spec.recent)
    t0 = time.perf_counter()
    gt = ground_truth(ev)
    drops = np.asarray(gt["drops"])
    gt["critical"] = [head_name(*ij) for ij in zip(*np.nonzero(drops > CRITICAL_DROP))]
    gt["seconds"] = round(time.perf_counter() - t0, 1)
    print(f"[planted] ground truth in {gt['seconds']} s: dense {gt['dense_accuracy']:.3f}, critical {gt['critical']}")
    runs: dict[str, Any] = {}
    rand_curve = random_curve(ev)
    for reward in a.rewards.split(","):
        out = os.path.join(a.runs, reward + ("-smoke" if a.smoke else ""))
        if not a.skip_train:
            run_training(reward, out, 1 if a.smoke else a.steps)
        runs[reward] = evaluate_run(ev, gt, read_run(out), rand_curve)
    import vllm

    doc = {"benchmark": "planted-heads", "device": f"cpu-{platform.machine()}", "vllm": vllm.__version__,
           "torch": torch.__version__, "date": DATE, "command": shlex.join(["python", *sys.argv]).replace(ROOT + "/", ""),
           "machine": {"cpus": os.cpu_count(), "loadavg_end": load_avg()},
           "fixture": fixture_info(task.FIXTURE_DIR), "task": {**vars(spec), "number_positions": [spec.query_range().start, spec.query_range().stop - 1],
                                                                "train_prompts": [TRAIN_PROMPTS, TRAIN_SEED],
                                                                "eval_prompts": [EVAL_PROMPTS, EVAL_SEED]},
           "critical_drop": CRITICAL_DROP, "targets": {**TARGETS, "budget_s": BUDGET_S},
           "ground_truth": gt, "runs": runs, "total_s": round(time.perf_counter() - t_start, 1)}
    stem = a.out or os.path.join(RESULTS_DIR, f"planted-heads-{doc['device']}-vllm{doc['vllm']}-{DATE}.json")
    if not a.smoke:
        for reward, r in runs.items():
            r["pattern_file"] = os.path.relpath(
                export_pattern(os.path.join(a.runs, reward), reward, r["at_learned_sparsity"]["sparsity"],
                               os.path.basename(stem)), ROOT)
    if not a.skip_serve and "correctness" in runs and not a.smoke:
        t0 = time.perf_counter()
        examples = task.make_examples(EVAL_PROMPTS, EVAL_SEED, spec)[:CHAT_PROMPTS]
        doc["chat_check"] = chat_check(ev, examples, pattern_path("correctness"),
                                       runs["correctness"]["at_learned_sparsity"]["sparsity"])
        doc["chat_check"]["seconds"] = round(time.perf_counter() - t0, 1)
    doc["total_s"] = round(time.perf_counter() - t_start, 1)
    print(summary(doc))
    if a.smoke:
        return
    with open(stem, "w") as f:
        json.dump(doc, f, indent=1)
    plot(doc, os.path.splitext(stem)[0] + ".png")
    print(f"[planted] wrote {stem} and its .png")


if __name__ == "__main__":
    main()
