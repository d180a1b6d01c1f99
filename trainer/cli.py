"""``rlkv train``: parse the command line into a validated run request.

    rlkv train --config FILE.yaml [--set key=value ...] [--address ADDR] [--resume] --out DIR [--dry-run]

Everything wrong with the arguments or the config is one line, ``rlkv train: error: ...``, and
exit status 2; ``--dry-run`` prints the resolved config as YAML and exits 0.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass, replace
from typing import NoReturn, Sequence

from .config import (
    TrainConfig, TrainConfigError, check_paths, config_to_dict, config_to_yaml, load_config, parse_config,
)

PROG = "rlkv train"


class _UsageError(Exception):
    """A bad command line (argparse's message, one line)."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # type: ignore[override]
        raise _UsageError(message)


@dataclass(frozen=True)
class TrainArgs:
    """A validated ``rlkv train`` request.

    config: the resolved config (``--address`` already in ``config.ray.address``).
    config_path: the YAML it came from. out_dir: absolute output folder (None only with dry_run).
    address: the --address given, or None. resume: continue from out_dir's last checkpoint.
    """

    config: TrainConfig
    config_path: str
    out_dir: str | None
    address: str | None
    resume: bool
    dry_run: bool


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog=PROG, description="Learn RLKV's per-(layer, KV head) gates with RL, rolling out with vLLM "
                                       "in gated mode (Ray). Shipped configs: trainer/configs/.")
    p.add_argument("--config", required=True, metavar="FILE.yaml", help="the run's YAML config")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, nested with dots, the value read as YAML "
                        "(e.g. --set objective.clip=0.3 --set rollout.sampling.top_k=20); repeatable")
    p.add_argument("--address", default=None, help="a Ray cluster to join (overrides ray.address; default: local Ray)")
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --out")
    p.add_argument("--out", default=None, metavar="DIR", help="output folder: checkpoints, logs, the pattern file")
    p.add_argument("--dry-run", action="store_true",
                   help="validate and print the resolved config as YAML, then exit (model and data paths are not "
                        "checked, so the recipes' placeholders pass)")
    return p


def parse_train_args(argv: Sequence[str]) -> TrainArgs:
    """Parse and validate; raises TrainConfigError or _UsageError with a one-line message."""
    a = build_parser().parse_args(list(argv))
    if a.out is None and not a.dry_run:
        raise _UsageError("the following arguments are required: --out")
    config = load_config(a.config, a.overrides)
    if a.address is not None:
        # re-validated as a whole: the address changes which resource checks apply
        ray = replace(config.ray, address=a.address)
        config = parse_config(config_to_dict(replace(config, ray=ray)))
    if not a.dry_run:
        check_paths(config)
    out_dir = os.path.abspath(os.path.expanduser(a.out)) if a.out is not None else None
    return TrainArgs(config=config, config_path=os.path.abspath(a.config), out_dir=out_dir,
                     address=a.address, resume=a.resume, dry_run=a.dry_run)


def run(args: TrainArgs) -> int:
    """Run the training; a failure the user can act on is one line (status 2 for bad input, 1 for a
    failed run), never a traceback from a worker."""
    from .actors import WorkerError
    from .data import DataError
    from .rewards import RewardError
    from .rollout import GateSyncError
    from .run import Run

    try:
        Run(args.config, args.out_dir, resume=args.resume).run()
    except (TrainConfigError, DataError, RewardError) as e:
        print(f"{PROG}: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    except (WorkerError, GateSyncError) as e:
        print(f"{PROG}: failed: {' '.join(str(e).split())}", file=sys.stderr)
        return 1
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``rlkv train`` entry point; returns the exit status."""
    argv = sys.argv[1:] if argv is None else argv
    try:
        args = parse_train_args(argv)
    except SystemExit as e:  # --help
        return int(e.code or 0)
    except (TrainConfigError, _UsageError) as e:
        print(f"{PROG}: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    if args.dry_run:
        head = [f"# {PROG} --dry-run: {args.config_path} is valid",
                f"# out: {args.out_dir}  resume: {str(args.resume).lower()}"]
        print("\n".join(head) + "\n" + config_to_yaml(args.config), end="")
        return 0
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
