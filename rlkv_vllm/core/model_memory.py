"""What a model's weights take, from its config alone, to predict the KV budget before vLLM profiles.

With ``--gpu-memory-utilization`` vLLM sizes the KV cache after the model is loaded and profiled, but RLKV's
ring is allocated during model loading, so an "auto" ring cannot wait for that number. The prediction here,
``utilization x device memory - weights per rank``, is what vLLM will give the KV cache plus the ring, less
the activation peak, CUDA graphs and non-torch memory it does not know (a few GiB on an H200): it overestimates
a little, so the ring gets slightly more slots than the budget holds, never fewer (fewer would make requests
wait for a slot while blocks are free).

vLLM-free: the config is the model's ``config.json`` as a dict.
"""

from __future__ import annotations

from typing import Any

# config keys that make a model something else than a dense decoder: experts, hybrid or multimodal layers
_NOT_DENSE = ("num_experts", "num_local_experts", "n_routed_experts", "moe_intermediate_size",
              "vision_config", "text_config", "linear_attn_config")
# per-layer kinds a dense decoder may list: transformers' Qwen2/Qwen3 configs carry ``layer_types`` (all
# "full_attention" unless sliding windows are on), so the key alone does not mean a hybrid
_DENSE_LAYER_TYPES = {"full_attention", "sliding_attention"}


def dense_decoder_params(config: dict[str, Any]) -> int | None:
    """Parameters of a dense Llama-style decoder (Llama, Qwen2, Qwen3, Mistral): embeddings, attention
    (q/k/v/o, the biases Qwen2 has, Qwen3's q/k norms), the gated MLP, the norms and an untied LM head.
    None for a config this does not describe (experts, hybrids, a missing size): the caller falls back.

    >>> dense_decoder_params({"model_type": "llama", "vocab_size": 128256, "hidden_size": 4096,
    ...     "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
    ...     "num_key_value_heads": 8, "tie_word_embeddings": False})
    8030261248
    """
    if any(config.get(k) for k in _NOT_DENSE):
        return None
    if not set(config.get("layer_types") or ()) <= _DENSE_LAYER_TYPES:
        return None  # hybrid layers (linear attention, mamba, ...)
    try:
        v, h, inter = int(config["vocab_size"]), int(config["hidden_size"]), int(config["intermediate_size"])
        layers, hq = int(config["num_hidden_layers"]), int(config["num_attention_heads"])
    except (KeyError, TypeError, ValueError):
        return None
    hkv = int(config.get("num_key_value_heads") or hq)
    d = int(config.get("head_dim") or h // hq)
    kind = str(config.get("model_type", ""))
    attn = h * hq * d + 2 * h * hkv * d + hq * d * h
    if config.get("attention_bias") or kind == "qwen2":  # Qwen2 has q/k/v biases without saying so
        attn += hq * d + 2 * hkv * d
    if kind == "qwen3":
        attn += 2 * d  # per-head RMSNorm of q and k
    mlp = 3 * h * inter + (2 * inter + h if config.get("mlp_bias") else 0)
    per_layer = attn + mlp + 2 * h  # input and post-attention norms
    embed = v * h * (1 if config.get("tie_word_embeddings") else 2)
    return embed + layers * per_layer + h  # + the final norm


def predict_kv_budget(device_bytes: int, utilization: float, weight_bytes_per_rank: int) -> int | None:
    """Bytes vLLM will leave for the KV cache and the ring at ``utilization``, before its activation peak;
    None when the weights alone exceed the share (vLLM will refuse the start itself)."""
    budget = int(device_bytes * utilization) - int(weight_bytes_per_rank)
    return budget if budget > 0 else None
