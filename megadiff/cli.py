"""The ``megadiff`` command. Each sub-command lives in its own module and is imported lazily.

A sub-command module exposes ``add_arguments(parser)`` and ``run(args) -> int``.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("megadiff.training.cli", "train a model: megadiff train CONFIG.yaml [key=value ...]"),
    "demo": ("megadiff.demo.command", "train the tiny model on the built-in demo data"),
    "sweep": ("megadiff.study.sweep_cli", "sweep SPEC.yaml (run points) | sweep collect DIR"),
    "plan": ("megadiff.study.plan_cli", "a run's parameters, FLOPs, memory per rank, GPU-hours"),
    "fit": ("megadiff.study.fit_cli", "fit a law to a table of runs: fit scaling|mixing TABLE"),
    "rescale": ("megadiff.optim.rescale_cli", "print the physical recipe for a logical one (SDE)"),
    "preprocess": ("megadiff.data.preprocess", "raw text/image/audio -> MDS shards"),
    "data": ("megadiff.data.command", "check MDS streams: megadiff data verify PATH..."),
    "convert": ("megadiff.export.cli", "checkpoint <-> Hugging Face folder: convert to-hf|from-hf"),
    "generate": ("megadiff.generation.cli", "sample text/images/speech from a checkpoint"),
    "plot": ("megadiff.training.plot", "curves of a metrics key: plot RUN... --key K --out F.png"),
    "policy": ("megadiff.policy.cli", "learned unmasking policies: policy train|eval ..."),
}


def build_parser() -> argparse.ArgumentParser:
    from megadiff import __version__
    from megadiff.flags import HelpFormatter

    parser = argparse.ArgumentParser(
        prog="megadiff", description="Tri-modal masked discrete diffusion on megatron-core."
    )
    parser.add_argument("--version", action="version", version=f"megadiff {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_) in COMMANDS.items():
        p = sub.add_parser(name, help=help_, description=help_, formatter_class=HelpFormatter)
        p.set_defaults(_module=module)
        argv = sys.argv[1:]
        # only the chosen command's module is imported (keeps `megadiff --help` fast)
        if argv and argv[0] == name:
            importlib.import_module(module).add_arguments(p)
    return parser


# commands that train: stop signals are caught from the start (faults.catch_stop_signals_early)
TRAINING_COMMANDS = ("train", "demo", "policy train")


def write_exit_file(code: int) -> None:
    """Rank 0 of a training command writes its exit code to ``MEGADIFF_EXIT_FILE`` when set, for
    launchers that do not pass it on (torchrun reports any worker exit as its own failure)."""
    import os

    from megadiff.parallel.env import read_launch_env

    path = os.environ.get("MEGADIFF_EXIT_FILE")
    if not path or read_launch_env().rank != 0:
        return
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        f.write(f"{code}\n")
    os.replace(tmp, path)


def is_training_command(argv: list[str]) -> bool:
    return bool(argv) and (argv[0] in TRAINING_COMMANDS or " ".join(argv[:2]) in TRAINING_COMMANDS)


def main(argv: list[str] | None = None) -> int:
    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    if not is_training_command(sys.argv[1:]):
        return run_command()
    from megadiff.training.faults import catch_stop_signals_early, release_stop_signals

    catch_stop_signals_early()
    code = 1
    try:
        code = run_command()
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else int(e.code is not None)
        raise
    finally:
        release_stop_signals()
        write_exit_file(code)
    return code


def run_command() -> int:
    """Parse ``sys.argv`` and run the chosen command."""
    parser = build_parser()
    args, extra = parser.parse_known_args()
    if extra:  # key=value overrides given after an option (`demo --no-score train.steps=5`)
        if not hasattr(args, "overrides") or any(e.startswith("-") or "=" not in e for e in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = [*args.overrides, *extra]
    if not getattr(args, "command", None):
        parser.print_help()
        return 2
    module = importlib.import_module(args._module)
    return int(module.run(args) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
