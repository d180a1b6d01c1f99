"""rlkv.permute_heads on the CPU engine: each layer's heads reordered once at weight load,
full heads first, with a pattern whose full heads are not a prefix (layer 0: its last KV
head; layer 1: none; layer 2: all; layer 3: heads 1 and 3). Off and the default (auto: on,
no sleep mode) give the same greedy tokens as the oracle, and the same prompt logprobs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rlkv_vllm.core.hf_reference import greedy_generate, load_reference_model
from tests.engine_utils import engine, first_mismatch, greedy, mixed_prompts, random_gates, write_pattern

pytestmark = pytest.mark.slow

SINK, RECENT, GEN = 4, 8, 40
FULL = ["0:3", "2:0", "2:1", "2:2", "2:3", "3:1", "3:3"]


def _permuted_layers(worker) -> list[tuple[int, bool, int]]:  # type: ignore[no-untyped-def]
    """In the worker: (layer, permuted, n_full) of every RLKV attention impl."""
    out = []
    for module in worker.model_runner.model.modules():
        impl = getattr(module, "impl", None)
        if getattr(impl, "rlkv_runtime", None) is not None and getattr(impl, "_rlkv_layer", None) is not None:
            out.append((impl._rlkv_layer, bool(impl._split.contiguous), impl._split.n_full))
    return sorted(out)


def _prompt_logprobs(llm, prompts):  # type: ignore[no-untyped-def]
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    sp = SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=0.0)
    outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], sp, use_tqdm=False)
    return [np.array([d[p[i + 1]].logprob for i, d in enumerate(o.prompt_logprobs[1:])]) for o, p in zip(outs, prompts)]


def test_permuted_heads_match_unpermuted_and_oracle(tiny_model, tmp_path):
    pattern = write_pattern(str(tmp_path / "p.json"), random_gates(4, 4, seed=11))
    base = {"heads": pattern, "selection": "explicit", "full_heads": FULL, "sink": SINK, "recent": RECENT}
    mask = np.zeros((4, 4), dtype=bool)
    for item in FULL:
        layer, head = map(int, item.split(":"))
        mask[layer, head] = True
    prompts = mixed_prompts(6, seed=2, max_len=60)
    ref = load_reference_model(tiny_model, compute_dtype=torch.float64, full_mask=mask, sink=SINK, recent=RECENT)
    expected = [greedy_generate(ref, p, GEN) for p in prompts]

    runs, logprobs, layers = {}, {}, {}
    for on in (False, "auto"):
        with engine(tiny_model, {**base} if on == "auto" else {**base, "permute_heads": on}, max_num_batched_tokens=32,
                    enable_chunked_prefill=True) as llm:
            runs[on] = greedy(llm, prompts, GEN)
            logprobs[on] = _prompt_logprobs(llm, prompts)
            layers[on] = llm.collective_rpc(_permuted_layers)[0]
    assert layers[False] == [(0, False, 1), (1, False, 0), (2, False, 4), (3, False, 2)]
    assert layers["auto"] == [(0, True, 1), (1, True, 0), (2, True, 4), (3, True, 2)]
    for on, outs in runs.items():
        for i, (got, want) in enumerate(zip(outs, expected)):
            assert first_mismatch(got, want) is None, f"permute_heads={on}: prompt {i} differs at {first_mismatch(got, want)}"
    for a, b in zip(logprobs[False], logprobs["auto"]):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-4)


def test_auto_is_off_with_sleep_mode_and_in_gated_mode():
    """rlkv.permute_heads auto: on in serve mode, off with sleep mode (a level-2 wake reloads the
    weights in the model's order) and in gated mode; true / false are obeyed in serve mode."""
    from types import SimpleNamespace

    from rlkv_vllm.runtime import RLKVRuntime

    def runtime(value, serve=True, sleep=False):  # type: ignore[no-untyped-def]
        rt = object.__new__(RLKVRuntime)
        rt.settings = SimpleNamespace(permute_heads=value)
        rt.plan = SimpleNamespace(serve=serve)
        rt.vllm_config = SimpleNamespace(model_config=SimpleNamespace(enable_sleep_mode=sleep))
        return rt

    assert runtime("auto").permute_heads is True
    assert runtime("auto", sleep=True).permute_heads is False
    assert runtime("auto", serve=False).permute_heads is False
    assert runtime(True, sleep=True).permute_heads is True
    assert runtime(False).permute_heads is False
    assert runtime(True, serve=False).permute_heads is False
