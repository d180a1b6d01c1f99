"""A plain transformers forward whose attention is the oracle (``reference.py``).

Used to check the vLLM backend end to end (same weights, greedy tokens must match)
and by the trainer's learner (gated mode with alpha as a trainable parameter).
"""

from __future__ import annotations

from typing import Any

import torch

from .reference import oracle_attention

ATTN_NAME = "rlkv_oracle"


def _oracle_attention_fn(module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                         attention_mask: Any, scaling: float | None = None, dropout: float = 0.0,
                         **kwargs: Any) -> tuple[torch.Tensor, None]:
    """transformers attention interface: query [B, Hq, Tq, D], key/value [B, Hk, Tk, D]."""
    b, hq, tq, d = query.shape
    scale = scaling if scaling is not None else d**-0.5
    spec = getattr(module, "rlkv_spec", None) or {}
    outs = []
    for i in range(b):
        outs.append(
            oracle_attention(
                query[i].transpose(0, 1),
                key[i].transpose(0, 1),
                value[i].transpose(0, 1),
                scale=scale,
                full_heads=spec.get("full"),
                alpha=spec.get("alpha"),
                sink=spec.get("sink", 16),
                recent=spec.get("recent", 64),
                compute_dtype=spec.get("compute_dtype", torch.float64),
            )
        )
    return torch.stack(outs, 0), None


def _register() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(ATTN_NAME, _oracle_attention_fn)


def attention_modules(model: Any) -> list[Any]:
    """The decoder's self-attention modules, in layer order."""
    return [layer.self_attn for layer in model.model.layers]


def install_oracle(
    model: Any,
    *,
    full_mask: Any = None,
    alpha: Any = None,
    sink: int = 16,
    recent: int = 64,
    compute_dtype: torch.dtype = torch.float64,
) -> Any:
    """Make ``model`` attend through the oracle.

    full_mask: bool [L, H_kv] (True = full) for serve semantics; alpha: [L, H_kv]
    tensor for gated semantics (may be a Parameter: gradients flow into it).
    Neither: every head full.
    """
    _register()
    model.config._attn_implementation = ATTN_NAME
    for layer, mod in enumerate(attention_modules(model)):
        spec: dict[str, Any] = {"sink": sink, "recent": recent, "compute_dtype": compute_dtype}
        if alpha is not None:
            spec["alpha"] = alpha[layer]
        elif full_mask is not None:
            spec["full"] = torch.as_tensor(full_mask[layer], dtype=torch.bool)
        mod.rlkv_spec = spec
    return model


def load_reference_model(path: str, **oracle_kwargs: Any) -> Any:
    """Load a local HF causal LM in float32 with the oracle attention installed."""
    from transformers import AutoModelForCausalLM

    _register()
    model = AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.float32, attn_implementation=ATTN_NAME)
    model.eval()
    return install_oracle(model, **oracle_kwargs)


@torch.no_grad()
def greedy_generate(model: Any, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    """Greedy decoding with the KV cache of transformers; returns the new token ids."""
    ids = torch.tensor([prompt_ids], dtype=torch.long)
    out = model(input_ids=ids, use_cache=True)
    past = out.past_key_values
    tokens: list[int] = []
    nxt = int(out.logits[0, -1].argmax())
    for _ in range(max_new_tokens):
        tokens.append(nxt)
        if len(tokens) == max_new_tokens:
            break
        out = model(input_ids=torch.tensor([[nxt]]), past_key_values=past, use_cache=True)
        past = out.past_key_values
        nxt = int(out.logits[0, -1].argmax())
    return tokens


@torch.no_grad()
def logit_margins(model: Any, prompt_ids: list[int], tokens: list[int]) -> torch.Tensor:
    """Top-1 minus top-2 logit at each generated step (how robust greedy choices are)."""
    ids = torch.tensor([prompt_ids + tokens[:-1]], dtype=torch.long)
    logits = model(input_ids=ids).logits[0, len(prompt_ids) - 1 :]
    top2 = logits.topk(2, dim=-1).values
    return top2[:, 0] - top2[:, 1]
