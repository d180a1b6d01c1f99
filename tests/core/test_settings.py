"""Settings validation: each bad value is refused with a line naming field, value and rule."""

import pytest

from rlkv_vllm.core.settings import RLKVConfigError, parse_settings


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
    ],
)
def test_bad_values(pattern, raw, field, hint):
    with pytest.raises(RLKVConfigError) as e:
        parse_settings({"heads": pattern, **raw})
    msg = str(e.value)
    assert f"rlkv.{field}" in msg and hint in msg and "\n" not in msg


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
