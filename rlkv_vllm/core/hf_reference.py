"""A plain transformers forward whose attention is the oracle's semantics.

Used to check the vLLM backend end to end (same weights, greedy tokens must match)
and by the trainer's learner (gated mode with alpha as a trainable parameter). Every
layer runs ``batched.gated_attention`` on the whole padded batch in one pass; the 2-D
``attention_mask`` (1 = real token, either padding side) reaches it through a mask
function registered for this attention implementation, so positions, the causal mask
and the Lambda window are counted among each row's real tokens. Give ``position_ids``
consistent with the mask (``attention_mask.cumsum(-1) - 1``, as ``generate`` does) so
RoPE sees the same positions.

``install_oracle(..., attention="fused")`` selects the same semantics through
``fused.fused_gated_attention`` (FlexAttention; no [Tq, Tk] tensor), registered as its own
implementation (``FUSED_ATTN_NAME``): its mask function builds the batch's ``PaddingMasks``
once per forward, so every layer reuses the same BlockMasks.
"""

from __future__ import annotations

from typing import Any

import torch

from .batched import gated_attention
from .fused import PaddingMasks, fused_attention_bhtd

ATTN_NAME = "rlkv_oracle"
FUSED_ATTN_NAME = "rlkv_fused"
ATTENTIONS = {"batched": ATTN_NAME, "fused": FUSED_ATTN_NAME}


def _oracle_attention_fn(module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                         attention_mask: torch.Tensor | None, scaling: float | None = None,
                         dropout: float = 0.0, **kwargs: Any) -> tuple[torch.Tensor, None]:
    """transformers attention interface: query [B, Hq, Tq, D], key/value [B, Hk, Tk, D];
    attention_mask: bool [B, Tk] key padding (see ``_key_padding_mask``) or None.
    Returns [B, Tq, Hq, D], what the interface expects."""
    if attention_mask is not None and attention_mask.dim() != 2:
        raise ValueError(f"the {ATTN_NAME} attention takes a 2-D [batch, keys] padding mask, got a "
                         f"{attention_mask.dim()}-D mask")
    d = query.shape[-1]
    spec = getattr(module, "rlkv_spec", None) or {}
    out = gated_attention(
        query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2),
        scale=scaling if scaling is not None else d**-0.5,
        sink=spec.get("sink", 16), recent=spec.get("recent", 64),
        alpha=None if spec.get("alpha") is None else spec["alpha"][spec["layer"]], full_heads=spec.get("full"),
        attention_mask=attention_mask, compute_dtype=spec.get("compute_dtype"),
    )
    return out, None


def _key_padding_mask(batch_size: int, q_length: int, kv_length: int, q_offset: Any = 0, kv_offset: int = 0,
                      mask_function: Any = None, attention_mask: torch.Tensor | None = None,
                      **kwargs: Any) -> torch.Tensor | None:
    """transformers mask interface: hand the 2-D padding mask through as bool [B, kv_length]
    (None without padding); the attention builds its causal and Lambda masks itself."""
    if attention_mask is None:
        return None
    mask = attention_mask[:, kv_offset: kv_offset + kv_length].to(torch.bool)
    if mask.shape[-1] != kv_length:
        raise ValueError(f"attention_mask covers {mask.shape[-1]} keys, the cache holds {kv_length}")
    return None if bool(mask.all()) else mask


def _fused_attention_fn(module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                        attention_mask: PaddingMasks | torch.Tensor | None, scaling: float | None = None,
                        dropout: float = 0.0, **kwargs: Any) -> tuple[torch.Tensor, None]:
    """transformers attention interface of the fused path: query [B, Hq, Tq, D], key/value
    [B, Hk, Tk, D]; attention_mask: the forward's ``PaddingMasks`` (see ``_fused_padding_masks``),
    a bool [B, Tk] padding mask or None. Returns [B, Tq, Hq, D]."""
    if isinstance(attention_mask, torch.Tensor) and attention_mask.dim() != 2:
        raise ValueError(f"the {FUSED_ATTN_NAME} attention takes a 2-D [batch, keys] padding mask, got a "
                         f"{attention_mask.dim()}-D mask")
    d = query.shape[-1]
    spec = getattr(module, "rlkv_spec", None) or {}
    masks = PaddingMasks.of(attention_mask, key.shape[0], key.shape[2], key.device)
    out = fused_attention_bhtd(
        query, key, value, masks,
        scale=scaling if scaling is not None else d**-0.5,
        sink=spec.get("sink", 16), recent=spec.get("recent", 64),
        alpha=None if spec.get("alpha") is None else spec["alpha"][spec["layer"]], full_heads=spec.get("full"),
        compute_dtype=spec.get("compute_dtype"),
    )
    return out.transpose(1, 2), None


def _fused_padding_masks(batch_size: int, q_length: int, kv_length: int, q_offset: Any = 0, kv_offset: int = 0,
                         mask_function: Any = None, attention_mask: torch.Tensor | None = None,
                         device: Any = None, **kwargs: Any) -> PaddingMasks:
    """transformers mask interface of the fused path, called once per forward: the batch's
    ``PaddingMasks`` (every layer shares it and the BlockMasks it builds)."""
    mask = None
    if attention_mask is not None:
        mask = attention_mask[:, kv_offset: kv_offset + kv_length].to(torch.bool)
        if mask.shape[-1] != kv_length:
            raise ValueError(f"attention_mask covers {mask.shape[-1]} keys, the cache holds {kv_length}")
        device = mask.device
    return PaddingMasks(mask, batch_size, kv_length, torch.device(device if device is not None else "cpu"))


def _register() -> None:
    from transformers import AttentionInterface, AttentionMaskInterface

    AttentionInterface.register(ATTN_NAME, _oracle_attention_fn)
    AttentionMaskInterface.register(ATTN_NAME, _key_padding_mask)
    AttentionInterface.register(FUSED_ATTN_NAME, _fused_attention_fn)
    AttentionMaskInterface.register(FUSED_ATTN_NAME, _fused_padding_masks)


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
    compute_dtype: torch.dtype | None = None,
    attention: str = "batched",
) -> Any:
    """Make ``model`` attend through the oracle's semantics.

    full_mask: bool [L, H_kv] (True = full) for serve semantics; alpha: [L, H_kv]
    tensor for gated semantics (may be a Parameter: gradients flow into it).
    Neither: every head full. compute_dtype: "batched": default float32 (float64 for a
    float64 model); the engine tests that compare greedy tokens exactly ask for float64;
    "fused": the kernels' dtype, default the model's (see ``fused_gated_attention``).
    attention: "batched" (``batched.gated_attention``, the reference) or "fused"
    (``fused.fused_gated_attention``: FlexAttention, memory linear in the sequence length).
    """
    if attention not in ATTENTIONS:
        raise ValueError(f"attention must be one of {', '.join(ATTENTIONS)}, got {attention!r}")
    _register()
    model.config._attn_implementation = ATTENTIONS[attention]
    for layer, mod in enumerate(attention_modules(model)):
        spec: dict[str, Any] = {"sink": sink, "recent": recent, "compute_dtype": compute_dtype}
        if alpha is not None:
            # the whole [L, H_kv] tensor, indexed at each forward: a Parameter updated in place
            # (optimiser step, clamp) is read afresh and its gradient flows every time
            spec["alpha"], spec["layer"] = alpha, layer
        elif full_mask is not None:
            spec["full"] = torch.as_tensor(full_mask[layer], dtype=torch.bool)
        mod.rlkv_spec = spec
    return model


def load_reference_model(path: str, **oracle_kwargs: Any) -> Any:
    """Load a local HF causal LM in float32 with the oracle attention installed."""
    from transformers import AutoModelForCausalLM

    _register()
    name = ATTENTIONS.get(oracle_kwargs.get("attention", "batched"), ATTN_NAME)
    model = AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.float32, attn_implementation=name)
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
