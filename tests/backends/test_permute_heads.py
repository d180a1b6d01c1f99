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


def _reload_from_disk(worker) -> None:  # type: ignore[no-untyped-def]
    """In the worker: the runner's in-place reload from the checkpoint (vLLM 0.32: layerwise)."""
    worker.model_runner.reload_weights()


def _load_weights_directly(worker) -> None:  # type: ignore[no-untyped-def]
    """In the worker: model.load_weights with the checkpoint's tensors, as RL weight syncs do."""
    import glob
    import os

    from safetensors.torch import load_file

    model = worker.model_runner.get_model()
    path = worker.vllm_config.model_config.model
    weights = {}
    for f in sorted(glob.glob(os.path.join(path, "*.safetensors"))):
        weights.update(load_file(f))
    model.load_weights(iter(weights.items()))


def _reload_kernel_format(worker) -> None:  # type: ignore[no-untyped-def]
    """In the worker: a kernel-format reload of the engine's own tensors (its reordered layout)."""
    import torch

    model = worker.model_runner.get_model()
    own = [(n, p.detach().clone()) for n, p in model.named_parameters()]
    with torch.no_grad():  # vLLM copies kernel-format tensors into the parameters as they are
        worker.model_runner.reload_weights(weights_iterator=iter(own), is_checkpoint_format=False)


def test_in_place_weight_reloads_keep_the_heads_reordered_or_are_refused(tiny_model, tmp_path):
    """Weights loaded in place after start-up arrive in the model's head order. Where the layers'
    projection weights are still plain (CUDA, unquantized) the runner's reload_weights (checkpoint
    format) and a direct model.load_weights put the reordered layers back in the model's order
    first and reorder them after. vLLM's CPU platform packs and frees them at load: there both
    are refused in one line, before anything moved. A kernel-format reload is copied as given.
    The greedy tokens stay as they were throughout (they would change if the reordered layers
    took model-order weights)."""
    import torch

    from rlkv_vllm import compat

    pattern = write_pattern(str(tmp_path / "p.json"), random_gates(4, 4, seed=11))
    rlkv = {"heads": pattern, "selection": "explicit", "full_heads": FULL, "sink": SINK, "recent": RECENT}
    prompts = mixed_prompts(4, seed=3, max_len=48)
    with engine(tiny_model, rlkv) as llm:
        assert llm.collective_rpc(_permuted_layers)[0] == [(0, True, 1), (1, True, 0), (2, True, 4), (3, True, 2)]
        before = greedy(llm, prompts, 24)
        for load in (_reload_from_disk, _load_weights_directly, _reload_kernel_format):
            if torch.cuda.is_available() or load is _reload_kernel_format:
                llm.collective_rpc(load)
            else:
                with pytest.raises(Exception, match=r"RLKV cannot load weights in place here: rlkv.permute_heads "
                                                    r"reordered the heads of model\.layers\.0\.self_attn .*"
                                                    r"rlkv.permute_heads = false") as err:
                    llm.collective_rpc(load)
                assert "\n" not in str(err.value).strip()
            got = greedy(llm, prompts, 24)
            for i, (a, b) in enumerate(zip(got, before)):
                assert first_mismatch(a, b) is None, f"{load.__name__}: prompt {i} differs at {first_mismatch(a, b)}"
    # the V2 runner's reload is guarded too (its engines run in a child process: tests/runner_process.py)
    v2 = compat.v2_model_runner_cls()
    if v2 is not None and getattr(v2, "reload_weights", None) is not None:
        assert getattr(v2.reload_weights, "_rlkv_wrapped", False)
