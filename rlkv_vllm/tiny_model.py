"""Build tiny Llama-shaped models locally: random weights plus a locally trained tokenizer.

No model hub is needed. Used by the quick start, the tests and CPU benchmarks.
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import asdict, dataclass

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} </s> {% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


@dataclass(frozen=True)
class TinyModelSpec:
    """Shape of a tiny model. head_dim must be one vLLM's CPU kernel supports (32, 64, ...)."""

    num_layers: int = 4
    num_q_heads: int = 8
    num_kv_heads: int = 4
    head_dim: int = 32
    intermediate_size: int = 512
    vocab_size: int = 512
    max_position_embeddings: int = 4096
    init_std: float = 0.08
    # a larger output projection widens top-1/top-2 logit gaps, so greedy tokens
    # are robust to float rounding differences between kernels
    lm_head_std: float = 0.5
    seed: int = 0

    @property
    def hidden_size(self) -> int:
        return self.num_q_heads * self.head_dim


def _corpus(n_lines: int = 4000, seed: int = 0) -> list[str]:
    """Deterministic reasoning-flavoured English, enough to train a small BPE."""
    rng = random.Random(seed)
    names = ["Ada", "Bob", "Cleo", "Dan", "Eve", "Finn", "Gia", "Hal"]
    things = ["apples", "books", "coins", "cards", "stones", "tokens", "shells", "pens"]
    verbs = ["has", "buys", "finds", "gives away", "loses", "sells"]
    lines = []
    for _ in range(n_lines):
        a, b = rng.randint(1, 99), rng.randint(1, 99)
        n, t, v = rng.choice(names), rng.choice(things), rng.choice(verbs)
        kind = rng.randrange(4)
        if kind == 0:
            lines.append(f"Question: {n} {v} {a} {t} and then {b} more. How many? Answer: {a + b}.")
        elif kind == 1:
            lines.append(f"Let us think step by step. {a} times {b} is {a * b}, so the answer is {a * b}.")
        elif kind == 2:
            lines.append(f"First, {n} counts the {t}. Next, subtract {min(a, b)} from {max(a, b)}.")
        else:
            lines.append(f"Therefore the result is {a - b}. We check: {b} plus {a - b} equals {a}.")
    return lines


def train_tokenizer(out_dir: str, vocab_size: int, seed: int = 0) -> int:
    """Train a byte-level BPE on the embedded corpus; write tokenizer files. Returns vocab size."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    special = ["<s>", "</s>", "<pad>", "<unk>", "<|user|>", "<|assistant|>", "<|system|>"]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(seed=seed), trainer=trainer)
    tok.save(os.path.join(out_dir, "tokenizer.json"))
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
        json.dump(
            {
                "tokenizer_class": "PreTrainedTokenizerFast",
                "bos_token": "<s>",
                "eos_token": "</s>",
                "pad_token": "<pad>",
                "unk_token": "<unk>",
                "model_max_length": 1 << 20,
                "add_bos_token": False,
                "clean_up_tokenization_spaces": False,
                "chat_template": CHAT_TEMPLATE,
            },
            f,
            indent=1,
        )
    with open(os.path.join(out_dir, "special_tokens_map.json"), "w") as f:
        json.dump({"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"}, f)
    return tok.get_vocab_size()


def build_tiny_model(out_dir: str, spec: TinyModelSpec = TinyModelSpec(), *, overwrite: bool = False) -> str:
    """Write a LlamaForCausalLM with random weights (fp32) and a trained tokenizer.

    Deterministic for a given spec. Returns out_dir. Skips work if a model with the
    same spec is already there.
    """
    stamp = os.path.join(out_dir, "rlkv_tiny_spec.json")
    if not overwrite and os.path.isfile(stamp):
        with open(stamp) as f:
            if json.load(f) == asdict(spec):
                return out_dir
    os.makedirs(out_dir, exist_ok=True)

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    vocab = train_tokenizer(out_dir, spec.vocab_size, spec.seed)
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_q_heads,
        num_key_value_heads=spec.num_kv_heads,
        head_dim=spec.head_dim,
        max_position_embeddings=spec.max_position_embeddings,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        hidden_act="silu",
        tie_word_embeddings=False,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=2,
        initializer_range=spec.init_std,
        torch_dtype="float32",
    )
    torch.manual_seed(spec.seed)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.normal_(0.0, spec.lm_head_std if name.startswith("lm_head") else spec.init_std)
    model = model.to(torch.float32)
    model.save_pretrained(out_dir, safe_serialization=True)
    with open(os.path.join(out_dir, "generation_config.json"), "w") as f:
        json.dump({"bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 2}, f)
    with open(stamp, "w") as f:
        json.dump(asdict(spec), f)
    return out_dir


def random_pattern(spec: TinyModelSpec, seed: int = 0):
    """A reproducible gate pattern for a tiny model (values in [0, 1])."""
    import numpy as np

    from .core.patterns import HeadPattern

    rng = np.random.default_rng(seed)
    gates = rng.uniform(0.0, 1.0, size=(spec.num_layers, spec.num_kv_heads)).astype(np.float32)
    return HeadPattern(
        gates,
        {
            "model_id": "rlkv-tiny",
            "sink": 16,
            "recent": 64,
            "source": f"random uniform, seed {seed}",
        },
    )


def main() -> None:
    import argparse

    p = argparse.ArgumentParser(description="Build a tiny local model for RLKV tests and demos.")
    p.add_argument("out_dir", help="directory to write the model into (kept if it already holds this spec)")
    p.add_argument("--layers", type=int, default=TinyModelSpec.num_layers,
                   help="decoder layers (default %(default)s)")
    p.add_argument("--q-heads", type=int, default=TinyModelSpec.num_q_heads,
                   help="query heads per layer, a multiple of --kv-heads (default %(default)s)")
    p.add_argument("--kv-heads", type=int, default=TinyModelSpec.num_kv_heads,
                   help="KV heads per layer (default %(default)s)")
    p.add_argument("--head-dim", type=int, default=TinyModelSpec.head_dim,
                   help="head size; one vLLM's CPU kernel supports, e.g. 32 or 64 (default %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights (default %(default)s)")
    a = p.parse_args()
    spec = TinyModelSpec(
        num_layers=a.layers, num_q_heads=a.q_heads, num_kv_heads=a.kv_heads, head_dim=a.head_dim, seed=a.seed
    )
    print(build_tiny_model(a.out_dir, spec))


if __name__ == "__main__":
    main()
