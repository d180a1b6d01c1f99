"""The planted-heads task and its tiny model: a recall that only a few KV heads can do.

Task (passkey recall, as DuoAttention's retrieval data): a prompt is ``words`` filler words (syllables) with
one number 0..63 among them, then ``?``; the answer is the number. Every token is one word:

    <s> ba ko mi 42 te pa ... no ?    ->  42

The number is never inside the streaming window of the answer position (not among the ``sink`` first tokens,
not among the ``recent`` last), so a head that keeps only sink + recent cannot read it: the model has to
fetch it through a head with a full cache.

Model. A 4-layer Llama (4 query = 4 KV heads, head_dim 32, fp32, ~0.6M parameters) trained from scratch
here, in a few minutes on CPU, through the oracle's attention (``rlkv_vllm.core.hf_reference``). The numbers
are split into as many contiguous ranges as there are PLANTED heads (0-20, 21-41, 42-63 for three); a batch
holds numbers of one range, and in it only that range's planted head has a full cache while every other head
streams (sink + recent). So each planted head alone fetches its own range, and none can stand in for another
(one full head that fetched every number would make the others redundant, and no single head critical).
Each other head is full in some batches (probability ``p_other_full``, all at once in ``p_all_full`` of the
batches), so the model also works with every head full, as a dense model does. Which heads turn out critical is then measured, not assumed (``planted_heads.py``
ablates every head alone).

Tokenizer: a word-level ``tokenizers`` model saved as tokenizer.json with a PreTrainedTokenizerFast config,
so transformers and vLLM load it offline; it prepends ``<s>``. Its chat template (``CHAT_TEMPLATE``) renders a
user message to ``<s>`` + the prompt text, so chat requests see the training tokens.

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
# 32 filler words: consonant-vowel syllables, no digits (the grader reads the last number of a completion)
FILLER = [c + v for c in "bdgkmnpt" for v in "aeio"]
VALUES = [str(i) for i in range(64)]
# The chat template (for the OpenAI chat endpoint: `rlkv eval`, the quick start): BOS, then the user messages'
# text as it is; no role tokens (the model never saw any) and no generation prompt (the model answers right
# after "?"). Rendered and tokenised with add_special_tokens=False (vLLM's chat default) it gives exactly the
# training ids, tokenizer(prompt)["input_ids"]; system and assistant messages are dropped.
CHAT_TEMPLATE = ("{{ bos_token }}{% for message in messages if message['role'] == 'user' %}"
                 "{{ ' ' if not loop.first }}{{ message['content'] }}{% endfor %}")


@dataclass(frozen=True)
class TaskSpec:
    """One prompt distribution.

    words: words per prompt (the number included); sink, recent: the streaming window the number must be
    outside of (the trainer's training window); layers: the model's depth, which bounds how far streaming
    heads can relay a token forward (each layer reaches ``recent - 1`` further back).
    """

    words: int = 48
    sink: int = 4
    recent: int = 8
    layers: int = 4

    @property
    def prompt_tokens(self) -> int:
        """<s>, the words and ``?``."""
        return self.words + 2

    def query_range(self) -> range:
        """Positions (1-based word index = token position, <s> being 0) the number may take: not a sink token,
        and further back than streaming heads can reach from the last position even by relaying it through
        every layer (``layers * (recent - 1)`` tokens); so with every head streaming it is out of reach."""
        last = self.prompt_tokens - 1
        return range(self.sink, last - self.layers * (self.recent - 1))


@dataclass(frozen=True)
class Example:
    prompt: str
    answer: str
    position: int  # token position of the number (<s> at 0)


def value_group(value: str, groups: int) -> int:
    """Which of ``groups`` contiguous ranges of VALUES a number falls in (0-20, 21-41, 42-63 for 3)."""
    return VALUES.index(value) * groups // len(VALUES)


def make_example(rng: random.Random, spec: TaskSpec, values: list[str] | None = None) -> Example:
    """One prompt; ``values``: the numbers to draw from (default all)."""
    words = rng.choices(FILLER, k=spec.words)
    pos = rng.choice(list(spec.query_range()))
    value = rng.choice(values or VALUES)
    words[pos - 1] = value
    return Example(" ".join(words) + f" {QUERY}", value, pos)


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
    return SPECIALS + [QUERY] + FILLER + VALUES


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
    fast.chat_template = CHAT_TEMPLATE
    os.makedirs(out_dir, exist_ok=True)
    fast.save_pretrained(out_dir)
    # transformers 5 saves the template as chat_template.jinja; keep it in tokenizer_config.json, which every
    # transformers and vLLM version reads (one file, as the committed fixture has it)
    jinja = os.path.join(out_dir, "chat_template.jinja")
    if os.path.exists(jinja):
        os.remove(jinja)
    cfg_path = os.path.join(out_dir, "tokenizer_config.json")
    cfg = json.load(open(cfg_path))
    cfg["chat_template"] = CHAT_TEMPLATE
    with open(cfg_path, "w") as f:
        json.dump(cfg, f, indent=2)
        f.write("\n")
    return fast


# ---------------------------------------------------------------- model


@dataclass(frozen=True)
class TrainSpec:
    """How the fixture is trained (every field is recorded in the fixture's planted_spec.json).

    planted: (layer, KV head) pairs; the g-th is the one full head of the batches with numbers of range g.
    p_all_full: share of batches in which every head is full (a dense model must work too).
    p_other_full: in the other batches, each non-planted head is full with this probability, so no
        non-planted head can be relied on for the long-range lookup but all learn to live with a full cache.
    p_planted_full: in the other batches, each planted head of another range is full with this probability,
        so the model also works with several planted heads full and the non-planted ones streaming (the
        learned pattern's configuration); 0 draws nothing (the stages trained before it existed).
    """

    layers: int = 4
    kv_heads: int = 4
    q_heads: int = 4
    head_dim: int = 32
    intermediate: int = 256
    planted: tuple[tuple[int, int], ...] = ((1, 2), (2, 1), (3, 3))
    p_all_full: float = 0.05
    p_other_full: float = 0.1
    p_planted_full: float = 0.0
    steps: int = 1200
    batch: int = 64
    min_words: int = 40  # each batch draws its length from [min_words, task.words]
    lr: float = 1e-3
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


def encode_batch(tok: Any, examples: list[Example]) -> tuple[Any, Any]:
    """input ids [B, T] (equal lengths: every prompt of a TaskSpec has the same token count) and answer ids [B]."""
    import torch

    ids = torch.tensor([tok(ex.prompt)["input_ids"] for ex in examples], dtype=torch.long)
    answers = torch.tensor([tok.convert_tokens_to_ids(ex.answer) for ex in examples], dtype=torch.long)
    return ids, answers


def mask_schedule(spec: TrainSpec, rng: random.Random) -> Iterator[tuple[int, list[list[float]]]]:
    """Per batch, the number range g and the 0/1 gate of every (layer, KV head): range g's planted head 1,
    the other planted heads full with probability p_planted_full, the rest with probability p_other_full (all
    full in p_all_full)."""
    planted = list(spec.planted)

    def full(l: int, h: int) -> bool:
        if (l, h) in planted:  # another range's planted head: no draw at p_planted_full 0, as before it existed
            return spec.p_planted_full > 0 and rng.random() < spec.p_planted_full
        return rng.random() < spec.p_other_full

    while True:
        g = rng.randrange(len(planted))
        all_full = rng.random() < spec.p_all_full
        yield g, [[1.0 if (l, h) == planted[g] or all_full or full(l, h) else 0.0
                   for h in range(spec.kv_heads)] for l in range(spec.layers)]


def train_fixture(out_dir: str = FIXTURE_DIR, spec: TrainSpec = TrainSpec(), log_every: int = 250,
                  init: str | None = None, command: str | None = None) -> dict[str, Any]:
    """Train the model on the task with the planted masks and write the fixture folder; returns the log.

    init: a fixture folder to continue from (a later stage: its weights, a fresh optimiser and schedule);
    the stages so far are kept in planted_spec.json, and ``command`` (the stage's command line) is appended
    to its "commands".
    """
    import torch
    from transformers import LlamaForCausalLM

    from rlkv_vllm.core.hf_reference import install_oracle

    torch.manual_seed(spec.seed)
    rng = random.Random(spec.seed)
    record: dict[str, Any] = {"stages": [], "commands": []}
    if init is not None:
        model = LlamaForCausalLM.from_pretrained(init, dtype=torch.float32)
        record = {"commands": [], **json.load(open(os.path.join(init, "planted_spec.json")))}
    else:
        model = LlamaForCausalLM(model_config(spec)).float()
    stages = record["stages"]
    tok = build_tokenizer(out_dir)
    gates = torch.ones(spec.layers, spec.kv_heads)
    install_oracle(model, alpha=gates, sink=spec.task.sink, recent=spec.task.recent)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=spec.lr, weight_decay=spec.weight_decay, betas=(0.9, 0.98))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / spec.warmup) * max(0.05, 1.0 - s / spec.steps))
    masks = mask_schedule(spec, rng)
    log, t0 = [], time.perf_counter()
    for step in range(1, spec.steps + 1):
        group, mask = next(masks)
        gates.copy_(torch.tensor(mask))
        values = [v for v in VALUES if value_group(v, len(spec.planted)) == group]
        length = TaskSpec(rng.randint(spec.min_words, spec.task.words), spec.task.sink, spec.task.recent)
        ids, answers = encode_batch(tok, [make_example(rng, length, values) for _ in range(spec.batch)])
        logits = model(input_ids=ids).logits[:, -1]
        loss = torch.nn.functional.cross_entropy(logits, answers)
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
    stages.append({"train_spec": asdict(spec), "init": None if init is None else os.path.basename(init.rstrip("/")),
                   "log": log, "train_s": round(time.perf_counter() - t0, 1)})
    if command is not None:
        record["commands"].append(command)
    with open(os.path.join(out_dir, "planted_spec.json"), "w") as f:
        json.dump(record, f, indent=1)
    return {"log": log}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=FIXTURE_DIR, help="fixture folder (default %(default)s)")
    p.add_argument("--steps", type=int, default=TrainSpec.steps, help="training steps (default %(default)s)")
    p.add_argument("--seed", type=int, default=TrainSpec.seed, help="seed (default %(default)s)")
    p.add_argument("--lr", type=float, default=TrainSpec.lr, help="peak learning rate (default %(default)s)")
    p.add_argument("--p-all-full", type=float, default=TrainSpec.p_all_full, help="(default %(default)s)")
    p.add_argument("--p-other-full", type=float, default=TrainSpec.p_other_full, help="(default %(default)s)")
    p.add_argument("--p-planted-full", type=float, default=TrainSpec.p_planted_full, help="(default %(default)s)")
    p.add_argument("--init", default=None, help="continue from this fixture folder (a later stage)")
    a = p.parse_args()
    import shlex
    import sys

    import torch

    torch.set_num_threads(1)  # two threads on a shared 2-core machine run ~20x slower (OpenMP spinning)
    train_fixture(a.out, TrainSpec(steps=a.steps, seed=a.seed, lr=a.lr, p_all_full=a.p_all_full,
                                       p_other_full=a.p_other_full, p_planted_full=a.p_planted_full), init=a.init,
                  command=shlex.join(["python", os.path.relpath(os.path.abspath(__file__), os.path.dirname(HERE)),
                                      *sys.argv[1:]]))


if __name__ == "__main__":
    main()
