"""``megadiff train CONFIG.yaml [key=value ...]`` — one process, torchrun or srun."""

from __future__ import annotations

import argparse
import sys

from megadiff.config import ConfigError, dump_config, load_config
from megadiff.flags import AT_LEAST_1, number
from megadiff.parallel.env import read_launch_env
from megadiff.plan import Plan, resolve


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", nargs="?", help="YAML config (see examples/); omit for defaults")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.steps=10")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="check the layout in one process (fake process group, model on the meta device)",
    )
    p.add_argument(
        "--world-size",
        type=number(int, AT_LEAST_1),
        help="--dry-run: the ranks to lay out (default: the launch's)",
    )


def split_config_arg(args: argparse.Namespace) -> tuple[str | None, list[str]]:
    """Allow ``megadiff train key=value`` with no config file."""
    if (
        args.config is not None
        and "=" in args.config
        and not args.config.endswith((".yaml", ".yml"))
    ):
        return None, [args.config, *args.overrides]
    return args.config, list(args.overrides)


def load_plan(args: argparse.Namespace):
    """Parse + resolve against the launch's world size, before any process group exists."""
    path, overrides = split_config_arg(args)
    launch = read_launch_env()
    cfg = load_config(path, overrides)
    return resolve(cfg, launch.world_size), launch


def run(args: argparse.Namespace) -> int:
    if args.dry_run:
        return run_dry(args)
    if args.world_size is not None:
        print("megadiff train: error: --world-size is for --dry-run", file=sys.stderr)
        return 2
    try:
        plan, launch = load_plan(args)
    except (ConfigError, ValueError) as e:
        print(f"megadiff train: error: {e}", file=sys.stderr)
        return 2
    if args.print_config:
        if launch.rank == 0:
            print(dump_config(plan.cfg), end="")
        return 0
    try:
        return checked_train(plan, launch)
    except train_refusals() as e:
        print(f"megadiff train: error: {e}", file=sys.stderr)
        return 2


def train_refusals() -> tuple[type[Exception], ...]:
    """What :func:`checked_train` raises for a run it refuses (the commands exit 2)."""
    from megadiff.checkpoint_files import CheckpointError
    from megadiff.data.checks import DATA_ERRORS
    from megadiff.training.run_lock import RunDirLocked

    return (CheckpointError, ConfigError, RunDirLocked, *DATA_ERRORS)


def checked_train(plan: Plan, launch) -> int:
    """Check the machine, hold the run's directories, check the checkpoint directory and the
    data (all before any process group or model exists), then :func:`train`."""
    from megadiff.checkpoint_files import preflight
    from megadiff.data.checks import preflight_data
    from megadiff.machine import check_machine
    from megadiff.training.run_lock import hold_run_dirs

    check_machine(plan.cfg)
    with hold_run_dirs(plan.cfg, launch):
        preflight(plan.cfg)
        preflight_data(plan.cfg)
        return train(plan)


def run_dry(args: argparse.Namespace) -> int:
    """``--dry-run``: the layout at ``--world-size`` ranks; the data need not be present when
    ``model.vocab_size`` is given."""
    from megadiff.training.dry_run import dry_run

    path, overrides = split_config_arg(args)
    try:
        cfg = load_config(path, overrides)
        world = args.world_size or read_launch_env().world_size
        plan = resolve(cfg, world, read_data=False)
    except (ConfigError, ValueError) as e:
        print(f"megadiff train: error: {e}", file=sys.stderr)
        return 2
    return dry_run(plan, world)


def train(plan: Plan) -> int:
    """Train a resolved plan with its engine; returns the exit code (0, 3 or 75)."""
    from megadiff.parallel.state import destroy_distributed
    from megadiff.training.trainer import Trainer

    trainer = None
    try:
        trainer = Trainer(plan)
        trainer.fit()
        return trainer.exit_code
    finally:
        if trainer is not None:
            trainer.close()
        destroy_distributed()
