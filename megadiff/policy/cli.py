"""``megadiff policy ...``: train (and evaluate) learned unmasking policies."""

from __future__ import annotations

import argparse
import sys


def add_policy_commands(subparsers) -> None:
    """Register the ``megadiff policy`` sub-commands."""
    train = subparsers.add_parser(
        "train",
        help="GRPO-train an unmasking policy: megadiff policy train CONFIG.yaml [key=value ...]",
        description="GRPO-train an unmasking policy over a frozen dLLM (the config's policy "
        "section; see docs/config.md).",
    )
    train.add_argument("config", nargs="?", help="YAML config (see examples/policy_lookup.yaml)")
    train.add_argument("overrides", nargs="*", help="dotted overrides, e.g. policy.steps=10")
    train.add_argument(
        "--print-config", action="store_true", help="print the resolved config and exit"
    )
    train.set_defaults(_policy_run=run_train)


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="policy_command", metavar="SUBCOMMAND")
    add_policy_commands(sub)


def run(args: argparse.Namespace) -> int:
    if not getattr(args, "_policy_run", None):
        print("megadiff policy: error: give a sub-command (train)", file=sys.stderr)
        return 2
    return int(args._policy_run(args) or 0)


def run_train(args: argparse.Namespace) -> int:
    from megadiff.config import ConfigError, dump_config, load_config
    from megadiff.parallel.env import read_launch_env
    from megadiff.training.cli import split_config_arg

    path, overrides = split_config_arg(args)
    launch = read_launch_env()
    try:
        cfg = load_config(path, overrides)
    except (ConfigError, ValueError) as e:
        print(f"megadiff policy train: error: {e}", file=sys.stderr)
        return 2
    if args.print_config:
        if launch.rank == 0:
            print(dump_config(cfg), end="")
        return 0
    from megadiff.policy.train import run as train

    return train(cfg, launch)
