"""``rlkv train`` argument parsing: the resolved config on --dry-run, one-line errors with status 2."""

from __future__ import annotations

import os

import pytest
import yaml

from rlkv_trainer.cli import main, parse_train_args
from rlkv_trainer.config import CONFIG_DIR, config_to_dict, load_config

TINY = os.path.join(CONFIG_DIR, "tiny.yaml")


def test_parse_train_args(tmp_path):
    a = parse_train_args(["--config", TINY, "--set", "objective.clip=0.3", "--resume", "--out", str(tmp_path / "run"),
                          "--address", "ray://head:10001"])
    assert a.config.objective.clip == 0.3
    assert a.config.ray.address == "ray://head:10001" and a.address == "ray://head:10001"
    assert a.out_dir == str(tmp_path / "run") and a.resume and not a.dry_run
    assert a.config_path == TINY


def test_relative_out_is_made_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert parse_train_args(["--config", TINY, "--out", "runs/x"]).out_dir == str(tmp_path / "runs" / "x")


def test_dry_run_prints_the_resolved_config(capsys):
    assert main(["--config", TINY, "--set", "rollout.sampling.top_k=20", "--dry-run"]) == 0
    out = capsys.readouterr().out
    printed = yaml.safe_load(out)
    assert printed == config_to_dict(load_config(TINY, ["rollout.sampling.top_k=20"]))
    assert printed["rollout"]["sampling"]["top_k"] == 20


@pytest.mark.parametrize("argv, message", [
    (["--config", TINY, "--set", "objective.clip=-1", "--out", "x"],
     "train.objective.clip = -1 is not allowed: must be a number > 0"),
    (["--config", TINY], "the following arguments are required: --out"),
    (["--out", "x"], "the following arguments are required: --config"),
    (["--config", TINY, "--dry-run", "--set", "nokey"], "--set 'nokey' is not allowed: must be key=value"),
    (["--config", TINY, "--dry-run", "--address", ""], "train.ray.address = '' is not allowed"),
    (["--config", TINY, "--dry-run", "--frobnicate"], "unrecognized arguments: --frobnicate"),
])
def test_errors_are_one_line_with_status_2(capsys, argv, message):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("rlkv train: error: ")
    assert message in err


def test_help_exits_0(capsys):
    assert main(["--help"]) == 0
    assert "--config" in capsys.readouterr().out


def test_a_placeholder_model_path_is_refused_without_dry_run(capsys, tmp_path):
    llama = os.path.join(CONFIG_DIR, "deepseek-r1-distill-llama-8b.yaml")
    assert main(["--config", llama, "--out", str(tmp_path)]) == 2
    assert "train.model.path = '/path/to/DeepSeek-R1-Distill-Llama-8B' is not allowed" in capsys.readouterr().err
    assert main(["--config", llama, "--dry-run"]) == 0
