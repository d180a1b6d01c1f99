"""Settings validation: each bad value is refused with a line naming field, value and rule;
the key table (CLI help, README) covers every key; model shapes read from config.json."""

import json
import os

import pytest

from rlkv_vllm.core.settings import (
    RLKVConfigError,
    RLKVSettings,
    model_shape_from_config,
    parse_settings,
    settings_table,
)

ROOT = os.path.join(os.path.dirname(__file__), "..", "..")
SHAPES = os.path.join(ROOT, "..", "shared", "data", "model-shapes")


@pytest.fixture
def pattern(tmp_path):
    p = tmp_path / "p.tsv"
    p.write_text("0.1\t0.9\n0.5\t0.2\n")
    return str(p)


def test_defaults(pattern):
    s = parse_settings({"heads": pattern})
    assert (s.sparsity, s.sink, s.recent, s.selection, s.mode) == (0.5, 16, 64, "global", "serve")
    assert s.window == 80


def test_relative_path_resolved(tmp_path, pattern):
    s = parse_settings({"heads": "p.tsv"}, base_dir=str(tmp_path))
    assert s.heads == pattern


@pytest.mark.parametrize(
    "raw,field,hint",
    [
        ({"sparsity": 1.0}, "sparsity", "[0, 1)"),
        ({"sparsity": -0.1}, "sparsity", "[0, 1)"),
        ({"sparsity": "lots"}, "sparsity", "[0, 1)"),
        ({"sparsity": float("nan")}, "sparsity", "[0, 1)"),
        ({"sink": 0}, "sink", "positive integer"),
        ({"recent": -4}, "recent", "positive integer"),
        ({"recent": 2.5}, "recent", "positive integer"),
        ({"selection": "top"}, "selection", "global, per_layer, explicit"),
        ({"mode": "fast"}, "mode", "serve, gated"),
        ({"kernel": "cuda"}, "kernel", "auto, triton, torch"),
        ({"full_kernel": "fa4"}, "full_kernel", "auto, flash_attn, triton"),
        ({"decode_kernel": "cutlass"}, "decode_kernel", "auto, triton, cuda"),
        ({"decode_kernel": "cuda", "kernel": "torch"}, "decode_kernel", "not 'torch'"),
        ({"colour": 1}, "colour", "allowed keys"),
        ({"full_heads": [[0, 1]]}, "full_heads", "explicit"),
        ({"ring_slots": 0}, "ring_slots", '"auto" or a positive integer (at most max_num_seqs)'),
        ({"ring_slots": "many"}, "ring_slots", '"auto" or a positive integer (at most max_num_seqs)'),
        ({"slot_tokens": -1}, "slot_tokens", '"auto" or a positive integer (at most max_model_len)'),
        ({"slot_tokens": 1.5}, "slot_tokens", '"auto" or a positive integer (at most max_model_len)'),
        ({"permute_heads": "yes"}, "permute_heads", 'must be "auto", true or false'),
        ({"permute_heads": 1}, "permute_heads", 'must be "auto", true or false'),
    ],
)
def test_bad_values(pattern, raw, field, hint):
    with pytest.raises(RLKVConfigError) as e:
        parse_settings({"heads": pattern, **raw})
    msg = str(e.value)
    assert f"rlkv.{field}" in msg and hint in msg and "\n" not in msg


def test_ring_slots_and_slot_tokens(pattern):
    assert (parse_settings({"heads": pattern}).ring_slots, parse_settings({"heads": pattern}).slot_tokens) == \
        ("auto", "auto")
    s = parse_settings({"heads": pattern, "ring_slots": "12", "slot_tokens": 512.0})
    assert (s.ring_slots, s.slot_tokens) == (12, 512)
    assert parse_settings(s.to_dict()) == s  # written back to the workers as it is


def test_permute_heads(pattern):
    assert parse_settings({"heads": pattern}).permute_heads == "auto"
    for value in (True, False, "auto"):
        s = parse_settings({"heads": pattern, "permute_heads": value})
        assert s.permute_heads == value and parse_settings(s.to_dict()) == s


def test_missing_pattern_file(tmp_path):
    with pytest.raises(RLKVConfigError, match=r"rlkv.heads = .*no such file"):
        parse_settings({"heads": str(tmp_path / "nope.tsv")})


def test_heads_required():
    with pytest.raises(RLKVConfigError, match="rlkv.heads = None"):
        parse_settings({"sparsity": 0.5})


def test_explicit_full_heads():
    s = parse_settings({"selection": "explicit", "full_heads": ["0:1", [2, 0]]})
    assert s.full_heads == ((0, 1), (2, 0))
    with pytest.raises(RLKVConfigError, match="full_heads"):
        parse_settings({"selection": "explicit", "full_heads": ["a:b"]})


def test_not_a_dict():
    with pytest.raises(RLKVConfigError, match="additional_config.rlkv"):
        parse_settings([1, 2])


def test_settings_table_covers_every_key():
    table = settings_table()
    assert [k for k, _, _ in table] == list(RLKVSettings.__dataclass_fields__)
    defaults = {k: d for k, d, _ in table}
    assert defaults == {"heads": "required", "sparsity": "0.5", "sink": "16", "recent": "64", "selection": "global",
                        "mode": "serve", "full_heads": "none", "kernel": "auto", "full_kernel": "auto",
                        "decode_kernel": "auto", "ring_slots": "auto", "slot_tokens": "auto",
                        "permute_heads": "auto"}
    assert all(meaning and "\n" not in meaning for _, _, meaning in table)


def settings_markdown() -> str:
    """The README's settings table, as settings_table() says it."""
    rows = ["| key | default | meaning |", "|---|---|---|"]
    for key, default, meaning in settings_table():
        shown = default if default in ("required", "none") else f"`{default}`"
        rows.append(f"| `{key}` | {shown} | {meaning} |")
    return "\n".join(rows)


def test_readme_settings_table_is_the_code_table():
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        readme = f.read()
    assert settings_markdown() in readme, "README's settings table differs from core.settings.settings_table():\n" + \
        settings_markdown()


@pytest.mark.parametrize("model,expected", [
    ("DeepSeek-R1-Distill-Llama-8B", (32, 8, 32, 128)),
    ("DeepSeek-R1-Distill-Qwen-7B", (28, 4, 28, 128)),
    ("Qwen3-4B-Thinking-2507", (36, 8, 32, 128)),  # head_dim given, not hidden / heads (80)
])
def test_model_shape_from_published_configs(model, expected):
    d = os.path.join(SHAPES, model)
    if not os.path.isdir(d):
        pytest.skip("../shared/data not present")
    for path in (d, d + "/", os.path.join(d, "config.json")):
        shape = model_shape_from_config(path)
        assert (shape.num_layers, shape.num_kv_heads, shape.num_q_heads, shape.head_size) == expected
        assert shape.model_id == os.path.abspath(d)


def test_model_shape_text_config_and_defaults(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(
        {"architectures": ["X"], "text_config": {"num_hidden_layers": 3, "num_attention_heads": 4, "hidden_size": 256}}
    ))
    shape = model_shape_from_config(str(tmp_path))
    # no num_key_value_heads: multi-head attention, one KV head per query head
    assert (shape.num_layers, shape.num_kv_heads, shape.num_q_heads, shape.head_size) == (3, 4, 4, 64)


@pytest.mark.parametrize("content,hint", [
    (None, "no such config.json"),
    ("{not json", "could not be read"),
    ("[1, 2]", "not a JSON object"),
    (json.dumps({"hidden_size": 64}), "names no num_hidden_layers"),
    (json.dumps({"num_hidden_layers": "four", "num_attention_heads": 4}), "num_hidden_layers = 'four'"),
])
def test_model_shape_errors(tmp_path, content, hint):
    if content is not None:
        (tmp_path / "config.json").write_text(content)
    with pytest.raises(RLKVConfigError) as e:
        model_shape_from_config(str(tmp_path))
    msg = str(e.value)
    assert msg.startswith(f"model = {str(tmp_path)!r} is not allowed: ") and hint in msg and "\n" not in msg
