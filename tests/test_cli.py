"""The ``rlkv`` command: help and version, serve's pass-through (and its settings help),
and ``rlkv pattern`` checking a pattern exactly as a server start does."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from typing import Any, Callable

import numpy as np
import pytest
import torch

from rlkv_vllm import __version__, cli
from rlkv_vllm.core.patterns import select_heads
from rlkv_vllm.core.plan import build_plan
from rlkv_vllm.core.settings import RLKVConfigError, model_shape_from_config, parse_settings, settings_table
from tests.engine_utils import write_pattern

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# the 4 x 4 pattern: sparsity 0.99 keeps one head, in layer 3
FOUR_BY_FOUR = [[0.1, 0.2, 0.3, 0.4], [0.1, 0.2, 0.3, 0.4], [0.5, 0.6, 0.7, 0.8], [0.1, 0.2, 0.3, 0.9]]


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def model_dir(tmp_path) -> str:
    """A local model of the tiny model's shape (4 layers, 8 query / 4 KV heads): its config alone."""
    d = tmp_path / "rlkv-tiny"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"num_hidden_layers": 4, "num_attention_heads": 8,
                                               "num_key_value_heads": 4, "hidden_size": 256}))
    return str(d)


def write(tmp_path, name: str, gates: Any, **meta: Any) -> str:
    """A pattern file; JSON and safetensors say model_id "rlkv-tiny" (model_dir's name) unless told."""
    return write_pattern(str(tmp_path / name), gates, **meta)


# ------------------------------------------------------------------ help and version
def test_help_lists_every_command_with_a_line(capsys):
    code, out, _ = run(capsys, "--help")
    assert code == 0 and out.startswith("usage: rlkv")
    for name in ("serve", "demo", "tiny-model", "pattern", "bench", "train", "eval", "vllm"):
        assert f"\n    {name}" in out, name
    assert "--version" in out and "``" not in out  # argparse help, not the module docstring
    assert run(capsys)[:2] == (0, out)  # no command: the same help


def test_unknown_command_is_one_line(capsys):
    code, out, err = run(capsys, "frobnicate")
    assert code == 2 and not out
    assert err.count("\n") == 1 and "invalid choice: 'frobnicate'" in err and "'pattern'" in err


def test_version(capsys):
    code, out, _ = run(capsys, "--version")
    assert code == 0
    assert out.splitlines() == [f"rlkv-vllm {__version__}", f"vLLM {cli.vllm_version()}"]


def test_version_without_vllm(monkeypatch, capsys):
    import importlib.util

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "vllm" else real_find_spec(name, *a))
    code, out, err = run(capsys, "--version")
    assert code == 0 and out.splitlines()[1] == "vLLM not installed" and not err


def test_version_with_a_broken_vllm(monkeypatch):
    """Found but without distribution metadata, and failing to import: no traceback, no version."""
    import builtins
    import importlib.metadata as md

    def no_dist(name: str) -> str:
        raise md.PackageNotFoundError(name)

    real_import = builtins.__import__

    def broken_import(name: str, *a: Any, **kw: Any) -> Any:
        if name == "vllm":
            raise RuntimeError("broken vLLM build")
        return real_import(name, *a, **kw)

    monkeypatch.setattr(md, "version", no_dist)
    monkeypatch.setattr(builtins, "__import__", broken_import)
    assert cli.vllm_version() is None
    assert cli.version_text().endswith("vLLM not installed")


def _parser_of(monkeypatch, entry: Callable[[], Any]) -> argparse.ArgumentParser:
    """The parser a command's main() builds, caught at parse_args."""
    caught: list[argparse.ArgumentParser] = []

    class Caught(Exception):
        pass

    def catch(self: argparse.ArgumentParser, *a: Any, **kw: Any) -> Any:
        caught.append(self)
        raise Caught

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", catch)
    with pytest.raises(Caught):
        entry()
    monkeypatch.undo()
    return caught[0]


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(sub.choices)


def test_every_option_has_help(monkeypatch):
    from rlkv_vllm import demo, tiny_model

    parsers = {"rlkv": cli.build_parser(), "rlkv pattern": _subparsers(cli.build_parser())["pattern"],
               "rlkv demo": _parser_of(monkeypatch, lambda: demo.main([])),
               "rlkv tiny-model": _parser_of(monkeypatch, tiny_model.main)}
    for name, parser in parsers.items():
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                assert all(c.help for c in action._choices_actions), name
            else:
                assert action.help, f"{name}: {action.option_strings or action.dest} has no help"


# ------------------------------------------------------------------ serve and vllm: vLLM's CLI
@pytest.fixture
def fake_vllm(monkeypatch) -> list[list[str]]:
    """Stands in for vLLM's CLI: records its argv; --help prints and exits as argparse does."""
    calls: list[list[str]] = []

    def vllm_cli(argv: list[str]) -> int:
        calls.append(list(argv))
        if any(a in ("-h", "--help") or a.startswith("--help=") for a in argv):
            print("usage: vllm serve [model_tag] [options]")
            raise SystemExit(0)
        return 0

    monkeypatch.setattr(cli, "_vllm_cli", vllm_cli)
    return calls


def test_serve_passes_every_argument_to_vllm(fake_vllm, capsys):
    args = ["MODEL", "--attention-backend", "rlkv", "--additional-config", '{"rlkv": {"heads": "p.tsv"}}',
            "--version", "--port", "8001", "-tp", "2", "--sparsity", "x"]
    assert run(capsys, "serve", *args)[0] == 0
    assert run(capsys, "vllm", "bench", "serve", "--help-not")[0] == 0
    assert fake_vllm == [["serve", *args], ["bench", "serve", "--help-not"]]


@pytest.mark.parametrize("flag", ["--help", "-h", "--help=CacheConfig"])
def test_serve_help_adds_the_rlkv_settings(fake_vllm, capsys, flag):
    code, out, _ = run(capsys, "serve", flag)
    assert code == 0 and fake_vllm == [["serve", flag]]
    settings = out[out.index("RLKV settings"):]
    assert "--additional-config '{\"rlkv\":" in settings
    for key, default, meaning in settings_table():
        line = next(l for l in settings.splitlines() if l.split()[:1] == [key])
        assert line.split()[1] == default and meaning.split()[0] in line
    assert out.index("usage: vllm serve") < out.index("RLKV settings")


@pytest.mark.slow
def test_serve_help_real_vllm():
    """The real vLLM help, then the rlkv keys, from the command a user runs (~20 s: vLLM's import)."""
    pytest.importorskip("vllm")
    r = subprocess.run([sys.executable, "-m", "rlkv_vllm.cli", "serve", "--help"], capture_output=True, text=True,
                       timeout=300, cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT})
    assert r.returncode == 0, r.stderr[-2000:]
    assert "usage: vllm serve" in r.stdout and "Traceback" not in r.stdout + r.stderr
    assert r.stdout.index("usage: vllm serve") < r.stdout.index("RLKV settings")
    assert all(f"  {key} " in r.stdout for key, _, _ in settings_table())


# ------------------------------------------------------------------ pattern: serve's checks
def serve_error(raw: dict[str, Any], model: str | None) -> str:
    """The error a server start gives for these settings: the front-end's build_plan (without a
    model, the checks that need none)."""
    with pytest.raises(RLKVConfigError) as e:
        settings = parse_settings(raw)
        if model is None:
            select_heads(settings)
        else:
            build_plan(settings, model_shape_from_config(model), max_num_seqs=4, dtype=torch.float32)
    return str(e.value)


def bad_patterns(tmp_path) -> dict[str, str]:
    files = {"empty": tmp_path / "empty.tsv", "garbage": tmp_path / "garbage.tsv", "nan": tmp_path / "nan.tsv",
             "garbage_json": tmp_path / "garbage.json"}
    files["empty"].write_text("")
    files["garbage"].write_text("0.1 0.2\nnot numbers\n")
    files["nan"].write_text("nan 0.5\n0.5 0.5\n")
    files["garbage_json"].write_text("{not json")
    out = {k: str(v) for k, v in files.items()}
    # the case: metadata 32 x 8, gates 4 x 4
    out["metadata"] = write(tmp_path, "meta.json", np.full((4, 4), 0.5), num_layers=32, num_kv_heads=8)
    return out


@pytest.mark.parametrize("case,hint", [("empty", "is empty"), ("garbage", "could not be read"),
                                       ("nan", "NaN or inf"), ("garbage_json", "could not be read"),
                                       ("metadata", "32 x 8 but its gates are 4 x 4")])
@pytest.mark.parametrize("with_model", [False, True])
def test_pattern_refuses_bad_files_as_serve_does(tmp_path, capsys, model_dir, case, hint, with_model):
    path = bad_patterns(tmp_path)[case]
    model = model_dir if with_model else None
    code, out, err = run(capsys, "pattern", path, *(["--model", model] if model else []))
    expected = serve_error({"heads": path, "sparsity": 0.5, "selection": "global"}, model)
    assert code == 2 and not out and hint in expected
    assert err == f"rlkv: error: {expected}\n"


@pytest.mark.parametrize("args,field", [(["--sparsity", "1"], "sparsity"), (["--sparsity", "-0.5"], "sparsity"),
                                        (["--sparsity", "half"], "sparsity"), (["--sparsity", "NaN"], "sparsity"),
                                        (["--selection", "topk"], "selection")])
def test_pattern_settings_checked_as_serve_does(tmp_path, capsys, args, field):
    path = write(tmp_path, "p.json", FOUR_BY_FOUR)
    code, out, err = run(capsys, "pattern", path, *args)
    value = json.loads(args[1]) if args[1] not in ("half", "topk") else args[1]
    with pytest.raises(RLKVConfigError) as e:
        parse_settings({"heads": path, field: value})
    assert code == 2 and not out and err == f"rlkv: error: {e.value}\n"
    assert err.startswith(f"rlkv: error: rlkv.{field} = ")


def test_pattern_shape_against_a_model(tmp_path, capsys, model_dir):
    three = write(tmp_path, "three.tsv", np.full((3, 4), 0.5))
    assert run(capsys, "pattern", three)[0] == 0  # consistent on its own
    code, out, err = run(capsys, "pattern", three, "--model", os.path.join(model_dir, "config.json"))
    assert code == 2 and not out
    assert err == f"rlkv: error: {serve_error({'heads': three}, model_dir)}\n"
    assert "3 x 4 (layers x KV heads) but the model has 4 x 4" in err
    code, _, err = run(capsys, "pattern", three, "--model", str(tmp_path / "nope"))
    assert code == 2 and err.startswith("rlkv: error: model = ") and "no such config.json" in err


def test_pattern_no_full_head_is_serves_error(tmp_path, capsys):
    zeros = write(tmp_path, "zeros.tsv", np.zeros((2, 2)))
    code, _, err = run(capsys, "pattern", zeros, "--selection", "explicit")
    assert code == 2 and err.startswith("rlkv: error: rlkv.heads = ") and "no full head at all" in err


def test_pattern_requested_vs_effective_sparsity(tmp_path, capsys, model_dir):
    """The issue: 0.99 becomes 0.9375 with 3 of 4 layers left without a full head; say so."""
    path = write(tmp_path, "p.json", FOUR_BY_FOUR)
    code, out, err = run(capsys, "pattern", path, "--sparsity", "0.99", "--model", model_dir)
    assert code == 0 and not err
    assert "sparsity: requested 0.99, effective 0.9375 (15 of 16 KV heads streaming, 1 full" in out
    assert "effective differs from requested" in out
    assert "layers with no full head: 3 of 4" in out and "  layer   3  ...F  full=1" in out
    # ties at the quantile are kept only up to the quantile's own count: 0.5 over this tied pattern
    # streams 8 heads of 16, as over distinct gates
    code, out, _ = run(capsys, "pattern", path, "--sparsity", "0.5")
    assert code == 0 and "requested 0.5, effective 0.5 " in out and "differs" not in out
    distinct = write(tmp_path, "distinct.json", np.arange(16).reshape(4, 4) / 16)
    code, out, _ = run(capsys, "pattern", distinct, "--sparsity", "0.5")
    assert code == 0 and "requested 0.5, effective 0.5 " in out and "differs" not in out


def test_pattern_warns_of_another_model(tmp_path, capsys, model_dir):
    other = write(tmp_path, "other.json", FOUR_BY_FOUR, model_id="DeepSeek-R1-Distill-Llama-8B")
    code, out, err = run(capsys, "pattern", other, "--model", model_dir)
    plan = build_plan(parse_settings({"heads": other}), model_shape_from_config(model_dir), max_num_seqs=4,
                      dtype=torch.float32)
    assert code == 0 and out and plan.warnings
    assert err == f"rlkv: warning: {plan.warnings[0]}\n"
    assert run(capsys, "pattern", other)[2] == ""  # no model, nothing to compare
    tsv = write(tmp_path, "p.tsv", FOUR_BY_FOUR)  # TSV: no model_id
    assert run(capsys, "pattern", tsv, "--model", model_dir)[2] == ""


@pytest.mark.parametrize("content", ["", "nan 0.5\n"])
def test_pattern_process_exits_2_without_traceback(tmp_path, content):
    p = tmp_path / "p.tsv"
    p.write_text(content)
    r = subprocess.run([sys.executable, "-m", "rlkv_vllm.cli", "pattern", str(p)], capture_output=True, text=True,
                       timeout=120, cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT})
    assert r.returncode == 2 and not r.stdout
    assert r.stderr.startswith("rlkv: error: rlkv.heads = ") and r.stderr.count("\n") == 1, r.stderr
