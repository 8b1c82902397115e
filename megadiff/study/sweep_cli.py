"""``megadiff sweep``: run a design-space sweep, or collect its results.

    megadiff sweep SPEC.yaml --dry              # list the points: parameters, tokens, FLOPs
    megadiff sweep SPEC.yaml --local 2          # run them here, 2 at a time (resumable)
    megadiff sweep SPEC.yaml --slurm [OPTION ...]  # one Slurm job array, one task per point
    megadiff sweep collect DIR [--out FILE.csv]   # DIR/results.csv + results.jsonl

SPEC format: :mod:`megadiff.study.sweep` and docs/studies.md. Every point is validated before
anything runs; a bad SPEC exits 2 naming the point and key.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from megadiff.flags import AT_LEAST_1, number
from megadiff.study.sweep import Spec, SweepError, exit_code, load_spec, write_sweep


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("spec", metavar="SPEC.yaml|collect", help="the sweep spec, or 'collect'")
    p.add_argument("dir", nargs="?", metavar="DIR", help="collect: the sweep folder")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--dry", action="store_true", help="list the points and their costs")
    mode.add_argument(
        "--local",
        type=number(int, AT_LEAST_1),
        metavar="N",
        help="run the points here, N at a time (finished points are skipped)",
    )
    mode.add_argument(
        "--slurm",
        nargs=argparse.REMAINDER,
        metavar="OPTION",
        help="submit one Slurm job array (one task per unfinished point); extra sbatch options",
    )
    p.add_argument("--out", metavar="FILE.csv", help="collect: the CSV (default DIR/results.csv)")


def run(args: argparse.Namespace) -> int:
    try:
        if args.spec == "collect":
            return run_collect(args)
        if args.dir is not None:
            raise SweepError(f"unexpected argument '{args.dir}' (DIR is for `sweep collect`)")
        spec = load_spec(args.spec)
        if args.dry:
            print_points(spec)
            return 0
        if args.local is None and args.slurm is None:
            raise SweepError("choose how to run the points: --dry, --local N or --slurm")
        if args.local is not None and spec.world_size != 1:
            raise SweepError(
                f"sweep spec '{args.spec}': world_size {spec.world_size} needs --slurm "
                "(--local runs one process per point)"
            )
        write_sweep(spec)
        from megadiff.study.sweep_run import run_local, submit_slurm

        print(f"sweep {spec.dir}: {len(spec.points)} points")
        if args.local is not None:
            return run_local(spec, args.local)
        return submit_slurm(spec, args.slurm)
    except SweepError as e:
        print(f"megadiff sweep: error: {e}", file=sys.stderr)
        return 2


def print_points(spec: Spec) -> None:
    """One line per point: name, status, parameters, tokens, FLOPs."""
    print(f"sweep {spec.dir}: {len(spec.points)} points (world size {spec.world_size})")
    print(f"{'point':<40} {'status':>9} {'params':>10} {'total':>10} {'tokens':>10} {'FLOPs':>9}")
    for p in spec.points:
        code = exit_code(p.directory(spec.dir))
        status = "-" if code is None else ("done" if code == 0 else f"exit {code}")
        print(
            f"{p.name:<40} {status:>9} {p.params:>10,} {p.params_total:>10,} "
            f"{p.tokens:>10.3g} {p.flops:>9.3g}"
        )
    print(f"total: {sum(p.flops for p in spec.points):.3g} FLOPs")


def run_collect(args: argparse.Namespace) -> int:
    from megadiff.study.collect import collect, write_tables

    if args.dir is None:
        raise SweepError("usage: megadiff sweep collect DIR [--out FILE.csv]")
    rows, missing = collect(args.dir)
    for name in missing:
        print(f"  {name}: no held-out evaluation yet (not run, or eval.every=0): left out")
    if not rows:
        raise SweepError(f"sweep '{args.dir}': no point has a held-out evaluation to collect")
    csv_path = Path(args.out) if args.out else Path(args.dir) / "results.csv"
    if csv_path.suffix != ".csv":
        raise SweepError(f"--out '{csv_path}' must end in .csv (the JSONL goes beside it)")
    jsonl_path = csv_path.with_suffix(".jsonl")
    write_tables(rows, csv_path, jsonl_path)
    print(f"wrote {len(rows)} rows to {csv_path} and {jsonl_path}")
    return 0
