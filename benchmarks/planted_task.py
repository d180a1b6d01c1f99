"""The planted-heads task and its tiny model: associative recall that only a few KV heads can solve.

Task. A prompt is a list of ``pairs`` key -> value pairs (keys: distinct syllable words, values: distinct
numbers 0..63, all single tokens), then ``?`` and one of the keys; the answer is that key's value:

    <s> ba 17 ko 3 mi 42 ... ? ko    ->  3

The queried pair is never inside the streaming window of the answer position (not among the ``sink``
first tokens, not among the ``recent`` last), so a head that keeps only sink + recent cannot read it: the
model must retrieve it through a head with a full cache.

Model. A 4-layer Llama (4 query = 4 KV heads, head_dim 32, fp32, ~0.6M parameters) trained from scratch
here, in a few minutes on CPU, through the oracle's attention (``rlkv_vllm.core.hf_reference``): in most
batches only the PLANTED heads have a full cache and every other head streams (sink + recent), so the
long-range lookup has to go through the planted heads; the other heads are full in some batches (each with
probability ``p_other_full``, and all at once in ``p_all_full`` of the batches), so the model also works
with every head full, as a dense model does. Which heads turn out critical is then measured, not assumed
(``planted_heads.py`` ablates every head alone).

Tokenizer: a word-level ``tokenizers`` model saved as tokenizer.json with a PreTrainedTokenizerFast config,
so transformers and vLLM load it offline; it prepends ``<s>``.

    python benchmarks/planted_task.py            # writes benchmarks/fixtures/planted-recall/
"""

from __future__ import annotations

import argparse
import json
import os
import random
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Iterator

HERE = os.path.dirname(os.path.abspath(__file__))
FIXTURE_DIR = os.path.join(HERE, "fixtures", "planted-recall")
SPECIALS = ["<s>", "</s>", "<pad>", "<unk>"]
QUERY = "?"
# 32 keys: consonant-vowel syllables, no digits (the grader reads the last number of a completion)
KEYS = [c + v for c in "bdgkmnpt" for v in "aeio"]
VALUES = [str(i) for i in range(64)]


@dataclass(frozen=True)
class TaskSpec:
    """One prompt distribution.

    pairs: key -> value pairs per prompt; sink, recent: the streaming window the queried pair must be
    outside of (the trainer's training window).
    """

    pairs: int = 20
    sink: int = 4
    recent: int = 8

    @property
    def prompt_tokens(self) -> int:
        """<s>, 2 tokens per pair, ``?`` and the key."""
        return 2 * self.pairs + 3

    def query_range(self) -> range:
        """1-based pair indices whose value lies outside sink + recent of the last prompt position.

        Pair i has its key at position 2i - 1 and its value at 2i; the last position is 2 * pairs + 2, whose
        streaming window is positions < sink and > last - recent.
        """
        last = self.prompt_tokens - 1
        ok = [i for i in range(1, self.pairs + 1) if 2 * i >= self.sink and 2 * i <= last - self.recent]
        return range(ok[0], ok[-1] + 1)


@dataclass(frozen=True)
class Example:
    prompt: str
    answer: str
    query_pair: int  # 1-based index of the queried pair


def make_example(rng: random.Random, spec: TaskSpec) -> Example:
    keys = rng.sample(KEYS, spec.pairs)
    values = rng.sample(VALUES, spec.pairs)
    q = rng.choice(list(spec.query_range()))
    body = " ".join(f"{k} {v}" for k, v in zip(keys, values))
    return Example(f"{body} {QUERY} {keys[q - 1]}", values[q - 1], q)


def make_examples(n: int, seed: int, spec: TaskSpec = TaskSpec()) -> list[Example]:
    """``n`` examples, the same for the same (n, seed, spec) in every process and Python version."""
    rng = random.Random(seed)
    return [make_example(rng, spec) for _ in range(n)]


def write_prompts(path: str, n: int, seed: int, spec: TaskSpec = TaskSpec()) -> str:
    """The trainer's prompt file: JSONL with id, prompt, answer and kind gsm8k (the grader's number match)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        for i, ex in enumerate(make_examples(n, seed, spec)):
            f.write(json.dumps({"id": f"recall-{seed}-{i}", "prompt": ex.prompt, "answer": ex.answer,
                                "kind": "gsm8k"}) + "\n")
    return path


# ---------------------------------------------------------------- tokenizer


def vocabulary() -> list[str]:
    return SPECIALS + [QUERY] + KEYS + VALUES


def build_tokenizer(out_dir: str) -> Any:
    """Word-level tokenizer (whitespace split, ``<s>`` prepended); writes tokenizer.json and its config."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(vocabulary())}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", vocab["<s>"])])
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>", model_max_length=1 << 20, clean_up_tokenization_spaces=False)
    os.makedirs(out_dir, exist_ok=True)
    fast.save_pretrained(out_dir)
    return fast


# ---------------------------------------------------------------- model


@dataclass(frozen=True)
class TrainSpec:
    """How the fixture is trained (every field is recorded in the fixture's planted_spec.json).

    planted: (layer, KV head) pairs that keep a full cache in every training batch.
    p_all_full: share of batches in which every head is full (a dense model must work too).
    p_other_full: in the other batches, each non-planted head is full with this probability, so no
        non-planted head can be relied on for the long-range lookup but all learn to live with a full cache.
    """

    layers: int = 4
    kv_heads: int = 4
    q_heads: int = 4
    head_dim: int = 32
    intermediate: int = 256
    planted: tuple[tuple[int, int], ...] = ((1, 2), (2, 1), (3, 3))
    p_all_full: float = 0.2
    p_other_full: float = 0.15
    steps: int = 3000
    batch: int = 64
    queries: int = 4
    min_pairs: int = 8  # each batch draws its pair count from [min_pairs, task.pairs]: short lists learn faster
    lr: float = 3e-3
    warmup: int = 100
    weight_decay: float = 0.01
    seed: int = 0
    task: TaskSpec = field(default_factory=TaskSpec)


def model_config(spec: TrainSpec) -> Any:
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=len(vocabulary()), hidden_size=spec.q_heads * spec.head_dim, intermediate_size=spec.intermediate,
        num_hidden_layers=spec.layers, num_attention_heads=spec.q_heads, num_key_value_heads=spec.kv_heads,
        head_dim=spec.head_dim, max_position_embeddings=256, rms_norm_eps=1e-5, rope_theta=10000.0,
        hidden_act="silu", tie_word_embeddings=False, bos_token_id=0, eos_token_id=1, pad_token_id=2,
        initializer_range=0.02, torch_dtype="float32")


def make_training_sequence(rng: random.Random, spec: TaskSpec, queries: int) -> tuple[list[str], list[int]]:
    """One training sequence: an example's prompt and answer, then ``queries - 1`` more ``? key value``
    lookups of other pairs outside the window; returns the words and the indices of the answer words.

    The first lookup is exactly a task prompt; the others only add supervision (more answers per forward).
    Every lookup's pair stays outside its own streaming window: it lies at least as far back as the first's.
    """
    keys = rng.sample(KEYS, spec.pairs)
    values = rng.sample(VALUES, spec.pairs)
    picks = rng.sample(list(spec.query_range()), queries)
    words = [w for kv in zip(keys, values) for w in kv]
    targets = []
    for q in picks:
        words += [QUERY, keys[q - 1], values[q - 1]]
        targets.append(len(words))  # position of the value once <s> is prepended
    return words, targets


def encode_batch(tok: Any, examples: list[Example]) -> tuple[Any, Any]:
    """input ids [B, T] (equal lengths: every prompt of a TaskSpec has the same token count) and answer ids [B]."""
    import torch

    ids = torch.tensor([tok(ex.prompt)["input_ids"] for ex in examples], dtype=torch.long)
    answers = torch.tensor([tok.convert_tokens_to_ids(ex.answer) for ex in examples], dtype=torch.long)
    return ids, answers


def mask_schedule(spec: TrainSpec, rng: random.Random) -> Iterator[list[list[float]]]:
    """Per batch, the 0/1 gate of every (layer, KV head): planted heads 1, the rest as TrainSpec says."""
    planted = set(spec.planted)
    while True:
        all_full = rng.random() < spec.p_all_full
        yield [[1.0 if (l, h) in planted or all_full or rng.random() < spec.p_other_full else 0.0
                for h in range(spec.kv_heads)] for l in range(spec.layers)]


def train_fixture(out_dir: str = FIXTURE_DIR, spec: TrainSpec = TrainSpec(), log_every: int = 250) -> dict[str, Any]:
    """Train the model on the task with the planted masks and write the fixture folder; returns the log."""
    import torch
    from transformers import LlamaForCausalLM

    from rlkv_vllm.core.hf_reference import install_oracle

    torch.manual_seed(spec.seed)
    rng = random.Random(spec.seed)
    tok = build_tokenizer(out_dir)
    model = LlamaForCausalLM(model_config(spec)).float()
    gates = torch.ones(spec.layers, spec.kv_heads)
    install_oracle(model, alpha=gates, sink=spec.task.sink, recent=spec.task.recent)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=spec.lr, weight_decay=spec.weight_decay, betas=(0.9, 0.98))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / spec.warmup) * max(0.05, 1.0 - s / spec.steps))
    masks = mask_schedule(spec, rng)
    log, t0 = [], time.perf_counter()
    for step in range(1, spec.steps + 1):
        gates.copy_(torch.tensor(next(masks)))
        length = TaskSpec(rng.randint(spec.min_pairs, spec.task.pairs), spec.task.sink, spec.task.recent)
        seqs = [make_training_sequence(rng, length, spec.queries) for _ in range(spec.batch)]
        ids = torch.tensor([tok(" ".join(words))["input_ids"] for words, _ in seqs], dtype=torch.long)
        at = torch.tensor([targets for _, targets in seqs], dtype=torch.long)  # [B, queries]
        answers = ids.gather(1, at)
        logits = model(input_ids=ids).logits.gather(
            1, (at - 1)[..., None].expand(-1, -1, len(vocabulary())))  # the position before each answer predicts it
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), answers.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % log_every == 0 or step == spec.steps:
            acc = float((logits.argmax(-1) == answers).float().mean())
            log.append({"step": step, "loss": float(loss.detach()), "batch_acc": acc, "s": time.perf_counter() - t0})
            print(f"step {step}: loss {float(loss.detach()):.4f} acc {acc:.3f} ({time.perf_counter() - t0:.0f} s)", flush=True)
    model.eval()
    model.config._attn_implementation = "sdpa"  # the saved config names a stock attention
    model.save_pretrained(out_dir, safe_serialization=True)
    with open(os.path.join(out_dir, "generation_config.json"), "w") as f:
        json.dump({"bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 2}, f)
    with open(os.path.join(out_dir, "planted_spec.json"), "w") as f:
        json.dump({"train_spec": asdict(spec), "log": log, "train_s": time.perf_counter() - t0}, f, indent=1)
    return {"log": log}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=FIXTURE_DIR, help="fixture folder (default %(default)s)")
    p.add_argument("--steps", type=int, default=TrainSpec.steps, help="training steps (default %(default)s)")
    p.add_argument("--seed", type=int, default=TrainSpec.seed, help="seed (default %(default)s)")
    a = p.parse_args()
    import torch

    torch.set_num_threads(1)  # two threads on a shared 2-core machine run ~20x slower (OpenMP spinning)
    train_fixture(a.out, TrainSpec(steps=a.steps, seed=a.seed))


if __name__ == "__main__":
    main()
