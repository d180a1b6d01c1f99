#!/usr/bin/env python3
"""A dummy-weight model folder of a published shape, and a head pattern for it resampled from another model's.

  python3 scripts/gpu/shape_model.py ../shared/data/model-shapes/DeepSeek-R1-Distill-Qwen-32B/config.json \
      /tmp/qwen32b --pattern-from ../shared/data/head-patterns/rlkv/DeepSeek-R1-Distill-Qwen-7B.tsv \
      --pattern-out /tmp/qwen32b/rlkv-resampled.tsv

The folder holds the config, a generation config and a synthetic WordLevel tokenizer covering the whole
vocabulary (ids 0..V-1, so random prompt ids pass vLLM's vocabulary check); vLLM's ``load_format='dummy'``
supplies random weights. For throughput only the head counts per layer at a sparsity matter, not which heads
they are (issue 12), so a model without a published pattern borrows the layer profile of one that has one:
layer ``l`` of ``L`` takes source layer ``round(l * (L_src - 1) / (L - 1))``, head ``h`` takes source head
``h mod H_src``, and a seeded jitter of 1e-3 breaks the ties that tiling makes. Its metadata says so.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np


def write_model(config_path: str, out: str) -> dict:
    """The model folder for ``load_format='dummy'``; returns the config."""
    cfg = json.load(open(config_path))
    os.makedirs(out, exist_ok=True)
    vocab_size = int(cfg["vocab_size"])
    # ids 0..3 are the special tokens of the synthetic tokenizer, whatever the model's own were
    cfg.update(bos_token_id=0, eos_token_id=1, pad_token_id=2)
    json.dump(cfg, open(os.path.join(out, "config.json"), "w"), indent=1)
    json.dump({"bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 2},
              open(os.path.join(out, "generation_config.json"), "w"))
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {"<s>": 0, "</s>": 1, "<pad>": 2, "<unk>": 3}
    vocab.update({f"t{i}": i for i in range(4, vocab_size)})
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")
    tok.save(os.path.join(out, "tokenizer.json"))
    special = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"}
    json.dump({"tokenizer_class": "PreTrainedTokenizerFast", **special,
               "model_max_length": int(cfg.get("max_position_embeddings", 131072)),
               "add_bos_token": False, "clean_up_tokenization_spaces": False},
              open(os.path.join(out, "tokenizer_config.json"), "w"))
    json.dump(special, open(os.path.join(out, "special_tokens_map.json"), "w"))
    return cfg


def resample_gates(src: np.ndarray, num_layers: int, num_kv_heads: int, seed: int = 0) -> np.ndarray:
    """``src`` [L_src, H_src] onto [num_layers, num_kv_heads]: layer depth scaled, heads tiled, jittered."""
    l_src, h_src = src.shape
    rows = [round(l * (l_src - 1) / max(num_layers - 1, 1)) for l in range(num_layers)]
    cols = [h % h_src for h in range(num_kv_heads)]
    jitter = np.random.default_rng(seed).uniform(-1e-3, 1e-3, size=(num_layers, num_kv_heads))
    return (src[np.ix_(rows, cols)] + jitter).astype(np.float32)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("config", help="a model-shapes config.json")
    p.add_argument("out", help="the model folder to write")
    p.add_argument("--pattern-from", help="a published pattern (TSV, L x H_kv gates) to resample")
    p.add_argument("--pattern-out", help="where to write the resampled pattern (TSV)")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    if bool(a.pattern_from) != bool(a.pattern_out):
        print("shape_model: give both --pattern-from and --pattern-out, or neither", file=sys.stderr)
        return 2
    cfg = write_model(a.config, a.out)
    print("wrote", a.out)
    if a.pattern_from:
        src = np.loadtxt(a.pattern_from, ndmin=2)
        layers, heads = int(cfg["num_hidden_layers"]), int(cfg["num_key_value_heads"])
        gates = resample_gates(src, layers, heads, a.seed)
        header = (f"resampled from {os.path.basename(a.pattern_from)} ({src.shape[0]} x {src.shape[1]}) onto "
                  f"{layers} x {heads} (layer depth scaled, heads tiled, seeded jitter 1e-3, seed {a.seed}): "
                  "a throughput stand-in, not a trained pattern")
        np.savetxt(a.pattern_out, gates, delimiter="\t", fmt="%.6f", header=header)
        print("wrote", a.pattern_out, f"({layers} x {heads})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
