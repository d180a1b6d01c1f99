"""core.model_memory: weights from a config alone (the published shapes' known parameter counts), the budget."""

from __future__ import annotations

import json
import os

import pytest

from rlkv_vllm.core.model_memory import dense_decoder_params, predict_kv_budget

SHAPES = os.path.join(os.path.dirname(__file__), "..", "..", "..", "shared", "data", "model-shapes")
# the parameter counts their Hugging Face model cards state (safetensors metadata)
KNOWN = {
    "DeepSeek-R1-Distill-Llama-8B": 8_030_261_248,   # Llama: untied head, no biases
    "DeepSeek-R1-Distill-Qwen-7B": 7_615_616_512,    # Qwen2: q/k/v biases
    "DeepSeek-R1-Distill-Qwen-32B": 32_763_876_352,
    "Qwen3-4B-Thinking-2507": 4_022_468_096,         # Qwen3: tied embeddings, q/k norms
}


@pytest.mark.skipif(not os.path.isdir(SHAPES), reason="../shared/data/model-shapes is not beside the checkout")
@pytest.mark.parametrize("name", sorted(KNOWN))
def test_counts_the_published_shapes_exactly(name: str) -> None:
    config = json.load(open(os.path.join(SHAPES, name, "config.json")))
    assert dense_decoder_params(config) == KNOWN[name]


@pytest.mark.skipif(not os.path.isdir(SHAPES), reason="../shared/data/model-shapes is not beside the checkout")
@pytest.mark.parametrize("name", sorted(KNOWN))
def test_counts_the_config_as_vllm_hands_it(name: str) -> None:
    """vLLM passes ``hf_text_config.to_dict()``: transformers adds keys the file lacks (Qwen2/Qwen3 get
    ``layer_types``, all "full_attention"), and those must not read as a hybrid model."""
    transformers = pytest.importorskip("transformers")
    config = transformers.AutoConfig.from_pretrained(os.path.join(SHAPES, name)).get_text_config().to_dict()
    assert dense_decoder_params(config) == KNOWN[name]


def test_not_a_dense_decoder_is_not_guessed() -> None:
    base = {"vocab_size": 1000, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
            "num_attention_heads": 4}
    assert dense_decoder_params(base) is not None
    assert dense_decoder_params({**base, "num_local_experts": 8}) is None  # Mixtral-style experts
    assert dense_decoder_params({**base, "n_routed_experts": 64}) is None
    assert dense_decoder_params({k: v for k, v in base.items() if k != "intermediate_size"}) is None
    assert dense_decoder_params({**base, "layer_types": ["full_attention", "full_attention"]}) is not None
    assert dense_decoder_params({**base, "layer_types": ["linear_attention", "full_attention"]}) is None


def test_predicted_budget() -> None:
    assert predict_kv_budget(100 << 30, 0.9, 60 << 30) == int((100 << 30) * 0.9) - (60 << 30)
    assert predict_kv_budget(100 << 30, 0.5, 60 << 30) is None  # the weights do not fit the share
