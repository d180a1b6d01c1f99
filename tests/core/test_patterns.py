"""Head patterns: the published files load, formats round-trip, selections count right;
bad files (empty, garbage, NaN, metadata that contradicts the gates) are refused on one line."""

import json
import os
import warnings

import numpy as np
import pytest

from rlkv_vllm.core.patterns import (
    HeadPattern,
    layers_without_full_head,
    local_kv_heads,
    resolve_head_mask,
    same_model_id,
    select_full_heads,
    select_heads,
    split_layers,
    streaming_fraction,
)
from rlkv_vllm.core.settings import ModelShape, RLKVConfigError, RLKVSettings

SHARED = os.path.join(os.path.dirname(__file__), "..", "..", "..", "shared", "data")
PUBLISHED = {
    "DeepSeek-R1-Distill-Llama-8B": (32, 8),
    "DeepSeek-R1-Distill-Qwen-7B": (28, 4),
    "Qwen3-4B-Thinking-2507": (36, 8),
}


@pytest.mark.parametrize("source", ["rlkv", "duoattention"])
@pytest.mark.parametrize("model", sorted(PUBLISHED))
def test_published_patterns_load(source, model):
    path = os.path.join(SHARED, "head-patterns", source, f"{model}.tsv")
    if not os.path.exists(path):
        pytest.skip("../shared/data not present")
    p = HeadPattern.load(path)
    assert (p.num_layers, p.num_kv_heads) == PUBLISHED[model]
    assert np.isfinite(p.gates).all()


def test_published_qwen_has_zero_full_layers():
    """METHOD.md: the Qwen-7B pattern at s=0.5 has 4 of 28 layers with no full head."""
    path = os.path.join(SHARED, "head-patterns", "rlkv", "DeepSeek-R1-Distill-Qwen-7B.tsv")
    if not os.path.exists(path):
        pytest.skip("../shared/data not present")
    mask = select_full_heads(HeadPattern.load(path).gates, 0.5, "global")
    assert int((mask.sum(axis=1) == 0).sum()) == 4


@pytest.mark.parametrize("ext", [".json", ".safetensors", ".tsv"])
def test_round_trip(tmp_path, ext):
    g = np.random.default_rng(0).uniform(size=(5, 3)).astype(np.float32)
    meta = {"model_id": "m", "sink": 16, "recent": 64, "source": "test", "train": {"lr": 0.01}}
    path = str(tmp_path / f"p{ext}")
    HeadPattern(g, dict(meta)).save(path)
    back = HeadPattern.load(path)
    np.testing.assert_allclose(back.gates, g, rtol=0, atol=1e-7)
    if ext != ".tsv":
        assert back.metadata["model_id"] == "m" and back.metadata["train"] == {"lr": 0.01}


def test_unreadable_pattern(tmp_path):
    bad = tmp_path / "bad.tsv"
    bad.write_text("0.1 0.2\nnot numbers\n")
    with pytest.raises(RLKVConfigError, match="could not be read"):
        HeadPattern.load(str(bad))
    pickled = tmp_path / "p.pkl"
    pickled.write_bytes(b"\x80\x04")
    with pytest.raises(RLKVConfigError, match="unknown extension"):
        HeadPattern.load(str(pickled))


@pytest.mark.parametrize("s", [0.0, 0.2, 0.25, 0.4, 0.5, 0.6, 0.75, 0.8])
def test_global_quantile_matches_torch(s):
    import torch

    g = np.random.default_rng(1).uniform(-0.01, 1.0, size=(32, 8))
    mask = select_full_heads(g, s, "global")
    if s == 0.0:
        assert mask.all()
        return
    t = torch.quantile(torch.tensor(np.clip(g, 0, 1)).flatten(), s)
    assert (mask == (np.clip(g, 0, 1) >= t.item())).all()
    assert abs((1 - mask.mean()) - s) <= 1.0 / g.size + 1e-9


@pytest.mark.parametrize("s, full", [(0.5, 8), (0.6, 7), (0.625, 6), (0.7, 5), (0.75, 4), (0.9, 2)])
def test_global_selection_honours_the_sparsity_through_tied_gates(s, full):
    """A learned pattern clamps many gates to exactly 0: the paper's ``>= quantile`` would keep every tied
    head (at s=0.5 here all 16, sparsity 0). The quantile's own count is kept instead, the nonzero gates
    first and the tied ones by lowest index."""
    g = np.zeros((4, 4))
    g[0, 0], g[0, 2], g[1, 2], g[2, 1], g[3, 3], g[0, 3] = 0.64, 0.57, 0.69, 0.90, 0.83, 0.14
    mask = select_full_heads(g, s, "global")
    assert mask.sum() == full == 16 - int(np.ceil(s * 15 - 1e-9))
    order = np.argsort(-g.reshape(-1), kind="stable")  # ties by index
    assert set(np.flatnonzero(mask.reshape(-1))) == set(order[:full])
    ones = select_full_heads(np.ones((4, 4)), 0.5, "global")  # all tied
    assert ones.sum() == 8 and ones.reshape(-1)[:8].all()


def test_per_layer_topk():
    g = np.random.default_rng(2).uniform(size=(6, 8))
    mask = select_full_heads(g, 0.25, "per_layer")
    assert (mask.sum(axis=1) == 6).all()
    for layer in range(6):
        assert set(np.argsort(-g[layer])[:6]) == set(np.nonzero(mask[layer])[0])


def test_explicit_requires_binary():
    with pytest.raises(RLKVConfigError, match="0/1"):
        select_full_heads(np.array([[0.5, 1.0]]), 0.0, "explicit")
    assert select_full_heads(np.array([[0.0, 1.0]]), 0.0, "explicit").tolist() == [[False, True]]


def test_shape_mismatch_and_no_full_head(tmp_path):
    p = tmp_path / "p.tsv"
    p.write_text("0.1\t0.9\n0.5\t0.2\n")
    shape = ModelShape(num_layers=3, num_kv_heads=2, num_q_heads=4, head_size=32)
    with pytest.raises(RLKVConfigError, match="2 x 2 .* model has 3 x 2"):
        resolve_head_mask(RLKVSettings(heads=str(p)), shape)
    zero = tmp_path / "z.tsv"
    zero.write_text("0\t0\n0\t0\n")
    shape2 = ModelShape(num_layers=2, num_kv_heads=2, num_q_heads=4, head_size=32)
    with pytest.raises(RLKVConfigError, match="no full head"):
        resolve_head_mask(RLKVSettings(heads=str(zero), selection="explicit"), shape2)


def test_tp_split_and_padding():
    mask = np.array([[1, 1, 0, 0], [1, 0, 0, 0], [0, 0, 1, 1]], dtype=bool)
    assert local_kv_heads(4, 2, 1) == [2, 3]
    assert local_kv_heads(2, 4, 3) == [1]
    r0, r1 = split_layers(mask, 2, 0), split_layers(mask, 2, 1)
    assert [l.full for l in r0] == [(0, 1), (0,), ()]
    assert [l.full for l in r1] == [(), (), (0, 1)]
    # every rank reports the same paged head count per layer (the max)
    assert [l.paged_slots for l in r0] == [l.paged_slots for l in r1] == [2, 1, 2]


def refused(path) -> str:
    """The one-line error loading ``path`` gives, with no warning printed on the way."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(RLKVConfigError) as e:
            HeadPattern.load(str(path))
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"rlkv.heads = {str(path)!r} is not allowed: ")
    return msg


@pytest.mark.parametrize("content", ["", "\n\n", "  \n"])
def test_empty_file(tmp_path, content):
    p = tmp_path / "empty.tsv"
    p.write_text(content)
    assert "is empty" in refused(p)


@pytest.mark.parametrize("name,content", [
    ("garbage.tsv", "0.1 0.2\nnot numbers\n"),
    ("ragged.tsv", "0.1 0.2\n0.3\n"),
    ("garbage.json", "{not json"),
    ("other.json", json.dumps({"gates": [[0.5]]})),
    ("ragged.json", json.dumps({"format": "rlkv-pattern", "gates": [[0.5, 0.1], [0.2]]})),
    ("empty.json", json.dumps({"format": "rlkv-pattern", "gates": []})),
    ("garbage.safetensors", "\x80\x04 not a header"),
])
def test_garbage_file(tmp_path, name, content):
    p = tmp_path / name
    p.write_text(content)
    assert "could not be read as a head pattern" in refused(p)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("ext", [".tsv", ".json", ".safetensors"])
def test_non_finite_gates(tmp_path, bad, ext):
    g = np.full((2, 2), 0.5, dtype=np.float32)
    g[1, 0] = bad
    p = tmp_path / f"p{ext}"
    HeadPattern(g, {"model_id": "m"}).save(str(p))
    assert "holds NaN or inf" in refused(p)


@pytest.mark.parametrize("ext", [".json", ".safetensors"])
def test_metadata_shape_must_match_gates(tmp_path, ext):
    """The issue's case: metadata says 32 x 8, the gates are 4 x 4."""
    p = tmp_path / f"p{ext}"
    HeadPattern(np.full((4, 4), 0.5), {"model_id": "m", "num_layers": 32, "num_kv_heads": 8}).save(str(p))
    assert "metadata num_layers x num_kv_heads = 32 x 8 but its gates are 4 x 4" in refused(p)
    # serve checks it too: a 4 x 4 model would otherwise take the file
    shape = ModelShape(num_layers=4, num_kv_heads=4, num_q_heads=8, head_size=32)
    with pytest.raises(RLKVConfigError, match="32 x 8 but its gates are 4 x 4"):
        select_heads(RLKVSettings(heads=str(p)), shape)


@pytest.mark.parametrize("value", ["four", 4.5, True, None])
def test_metadata_shape_must_be_a_whole_number(tmp_path, value):
    p = tmp_path / "p.json"
    p.write_text(json.dumps({"format": "rlkv-pattern", "gates": [[0.5, 0.5]], "metadata": {"num_layers": value}}))
    assert f"has metadata num_layers = {value!r}: must be a whole number" in refused(p)


def test_agreeing_metadata_loads(tmp_path):
    p = tmp_path / "p.json"
    p.write_text(json.dumps({"format": "rlkv-pattern", "gates": [[0.5, 0.5]],
                             "metadata": {"num_layers": 1.0, "num_kv_heads": 2}}))
    assert HeadPattern.load(str(p)).path == str(p)


@pytest.mark.parametrize("a,b", [
    ("DeepSeek-R1-Distill-Llama-8B", "/models/deepseek-r1-distill-llama-8b/"),
    ("deepseek-ai/DeepSeek-R1-Distill-Llama-8B", "DeepSeek-R1-Distill-Llama-8B"),
    ("rlkv-tiny", "/home/u/.cache/rlkv-tiny"),
])
def test_same_model_id_is_lenient(a, b):
    assert same_model_id(a, b) and same_model_id(b, a)


def test_model_id_warning(tmp_path):
    shape = ModelShape(num_layers=2, num_kv_heads=2, num_q_heads=4, head_size=32, model_id="/models/Qwen3-4B/")
    other = tmp_path / "other.json"
    HeadPattern(np.full((2, 2), 0.5), {"model_id": "DeepSeek-R1-Distill-Llama-8B"}).save(str(other))
    heads = select_heads(RLKVSettings(heads=str(other)), shape)
    (warning,) = heads.warnings
    assert "\n" not in warning and "'DeepSeek-R1-Distill-Llama-8B'" in warning and "'/models/Qwen3-4B/'" in warning
    assert warning.startswith(f"rlkv.heads = {str(other)!r}")
    same = tmp_path / "same.json"
    HeadPattern(np.full((2, 2), 0.5), {"model_id": "qwen3-4b"}).save(str(same))
    assert select_heads(RLKVSettings(heads=str(same)), shape).warnings == ()
    # TSV files carry no model_id; and without a model there is nothing to compare
    tsv = tmp_path / "p.tsv"
    HeadPattern(np.full((2, 2), 0.5)).save(str(tsv))
    assert select_heads(RLKVSettings(heads=str(tsv)), shape).warnings == ()
    assert select_heads(RLKVSettings(heads=str(other))).warnings == ()


def test_select_heads_without_a_model_uses_the_files_grid(tmp_path):
    p = tmp_path / "p.tsv"
    p.write_text("0.1 0.2 0.3 0.4\n0.1 0.2 0.3 0.4\n0.5 0.6 0.7 0.8\n0.1 0.2 0.3 0.9\n")
    heads = select_heads(RLKVSettings(heads=str(p), sparsity=0.99))
    # the numbers: 0.99 keeps one head of 16, three of four layers have none
    assert heads.mask.sum() == 1 and heads.mask[3, 3]
    assert streaming_fraction(heads.mask) == 0.9375 and layers_without_full_head(heads.mask) == 3
    zeros = tmp_path / "zeros.tsv"
    zeros.write_text("0 0\n0 0\n")
    with pytest.raises(RLKVConfigError, match="no full head at all"):
        select_heads(RLKVSettings(heads=str(zeros), selection="explicit"))
