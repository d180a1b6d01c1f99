"""The images: hadolint passes every Dockerfile (no registry is reachable here, so they are linted, not
built), the build context keeps out what the images do not need, and the serving entrypoint builds the
`vllm serve` command with --attention-backend for the installed vLLM."""

from __future__ import annotations

import glob
import json
import os
import re
import subprocess
import sys

import pytest

from tests.deploy.tools import DEPLOY, ENTRYPOINT, ROOT, load_entrypoint, run, tool

DOCKERFILES = sorted(glob.glob(os.path.join(DEPLOY, "docker", "*.Dockerfile")))


def test_the_three_images_exist():
    assert [os.path.basename(p) for p in DOCKERFILES] == ["serve-cpu.Dockerfile", "serve.Dockerfile",
                                                          "train.Dockerfile"]


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=os.path.basename)
def test_hadolint(dockerfile):
    r = run([tool("hadolint"), "--no-color", dockerfile])
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=os.path.basename)
def test_pinned_base_non_root_user_no_secrets(dockerfile):
    text = open(dockerfile).read()
    for ref in re.findall(r"^FROM\s+(\S+)", text, re.M):
        image = re.sub(r"\$\{(\w+)\}", lambda m: re.search(rf"ARG {m.group(1)}=(\S+)", text).group(1), ref)
        assert re.search(r":v?\d+\.\d+\.\d+", image), f"{image}: pin the base image to a release"
    users = re.findall(r"^USER\s+(\S+)", text, re.M)
    assert users and users[-1].split(":")[0].isdigit() and users[-1] != "0", "runs as a numeric non-root user"
    assert not re.search(r"(?i)^(ARG|ENV)\s+\S*(PASSWORD|SECRET|API_KEY|HF_TOKEN)", text, re.M)


def test_serving_images_check_health_and_use_the_entrypoint():
    for name in ("serve.Dockerfile", "serve-cpu.Dockerfile"):
        text = open(os.path.join(DEPLOY, "docker", name)).read()
        assert "HEALTHCHECK" in text and "/health" in text, name
        assert 'ENTRYPOINT ["python3", "/usr/local/bin/rlkv-entrypoint"]' in text, name


def test_dockerignore_keeps_the_context_to_what_the_images_copy():
    lines = [l.strip() for l in open(os.path.join(ROOT, ".dockerignore")) if l.strip() and not l.startswith("#")]
    assert lines[0] == "*", "an allowlist: nothing enters the context unless named"
    allowed = {l[1:].rstrip("/") for l in lines if l.startswith("!")}
    copied = set()
    for path in DOCKERFILES:
        copied |= {src.rstrip("/") for src in re.findall(r"^COPY\s+(\S+)\s", open(path).read(), re.M)}
    for src in copied:
        assert any(src == a or src.startswith(a + "/") for a in allowed), f"COPY {src} is outside the context"
    # what the bind-mounted pip install reads
    assert {"setup.py", "MANIFEST.in", "README.md", "rlkv_vllm", "trainer", "csrc"} <= allowed


def _command(env: dict[str, str], *argv: str) -> list[str]:
    return load_entrypoint().command(list(argv), env)


def _pattern(tmp_path) -> str:
    path = tmp_path / "pattern.json"
    path.write_text("{}")  # the entrypoint checks it exists; RLKV's startup check reads it
    return str(path)


def test_entrypoint_picks_the_backend_of_this_vllm(tmp_path):
    from rlkv_vllm.compat import backend_flag, vllm_version

    cmd = _command({"RLKV_HEADS": _pattern(tmp_path)}, "MODEL", "--max-model-len", "4096")
    assert cmd[:3] == ["vllm", "serve", "MODEL"] and cmd[3:5] == ["--max-model-len", "4096"]
    backend = cmd[cmd.index("--attention-backend") + 1]
    assert backend == backend_flag() == ("rlkv" if vllm_version() >= (0, 32, 0) else "CUSTOM")
    config = json.loads(cmd[cmd.index("--additional-config") + 1])
    assert config == {"rlkv": {"heads": _pattern(tmp_path), "sparsity": 0.5}}


def test_entrypoint_on_vllm_before_0_32_says_custom(tmp_path, monkeypatch):
    from rlkv_vllm import compat

    monkeypatch.setattr(compat, "can_register_backend_names", lambda: False)
    cmd = _command({"RLKV_HEADS": _pattern(tmp_path)}, "MODEL")
    assert cmd[cmd.index("--attention-backend") + 1] == "CUSTOM"


def test_entrypoint_settings_from_the_environment(tmp_path):
    pattern = _pattern(tmp_path)
    cmd = _command({"RLKV_HEADS": pattern, "RLKV_SPARSITY": "0.75", "RLKV_SERVE": "rlkv serve"}, "M")
    assert cmd[:2] == ["rlkv", "serve"]
    assert json.loads(cmd[-1]) == {"rlkv": {"heads": pattern, "sparsity": 0.75}}
    whole = {"heads": pattern, "sparsity": 0.6, "recent": 128}
    cmd = _command({"RLKV_CONFIG": json.dumps(whole), "RLKV_SPARSITY": "0.1"}, "M")
    assert json.loads(cmd[-1]) == {"rlkv": whole}


def _main(env: dict[str, str], *argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, ENTRYPOINT, *argv], capture_output=True, text=True, timeout=120,
                          env={**os.environ, **env}, cwd=ROOT)


def test_entrypoint_errors_are_one_line(tmp_path):
    cases = [
        ({"RLKV_HEADS": str(tmp_path / "missing.json")}, ["M"], "no head pattern at"),
        ({"RLKV_CONFIG": "{not json"}, ["M"], "RLKV_CONFIG is not JSON"),
        ({"RLKV_CONFIG": "[1]"}, ["M"], "RLKV_CONFIG must be a JSON object"),
        ({"RLKV_HEADS": _pattern(tmp_path)}, ["M", "--attention-backend=FLASH_ATTN"], "is set by the entrypoint"),
    ]
    for env, argv, message in cases:
        r = _main(env, *argv)
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith("rlkv-serve: error: "), r.stderr
        assert message in lines[0], lines[0]


def test_entrypoint_dry_run_prints_the_command(tmp_path):
    r = _main({"RLKV_HEADS": _pattern(tmp_path), "RLKV_DRY_RUN": "1"}, "M")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)[:3] == ["vllm", "serve", "M"]
