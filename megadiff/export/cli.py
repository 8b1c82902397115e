"""``megadiff convert to-hf|from-hf``: megadiff checkpoints <-> Hugging Face folders.

Exit codes: 0 done, 1 the ``--verify`` logits check failed, 2 bad input/output (the message
names the path). Nothing is left at ``--out`` unless the conversion succeeded.
"""

from __future__ import annotations

import argparse
import os
import re
import sys

from megadiff.export.parity import DEFAULT_TOL
from megadiff.flags import POSITIVE, number

SIZE = re.compile(r"(\d+)([KMGT]i?B)?", re.IGNORECASE)


def _shard_size(text: str) -> str | int:
    """``--shard-size``: bytes, or a positive size with a unit (500MB, 5GB, 2GiB)."""
    m = SIZE.fullmatch(text.strip())
    if m is None or int(m.group(1)) == 0:
        raise argparse.ArgumentTypeError(
            f"must be a positive size such as 500MB, 5GB or a number of bytes, got {text!r}"
        )
    return text.strip() if m.group(2) else int(m.group(1))


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="direction", metavar="DIRECTION", required=True)
    to = sub.add_parser("to-hf", help="megadiff checkpoint -> Hugging Face folder")
    to.add_argument("--ckpt", required=True, help="checkpoint dir (or a run's, newest valid)")
    to.add_argument("--out", required=True, help="Hugging Face folder to create")
    to.add_argument(
        "--shard-size",
        type=_shard_size,
        default="5GB",
        help="largest safetensors file, e.g. 500MB, 5GB or bytes (default 5GB)",
    )
    fr = sub.add_parser("from-hf", help="Hugging Face folder -> megadiff checkpoint")
    fr.add_argument("--hf", required=True, help="folder written by 'megadiff convert to-hf'")
    fr.add_argument("--out", required=True, help="checkpoint directory to create")
    fr.add_argument(
        "overrides",
        nargs="*",
        help="config overrides, e.g. parallel.tensor_parallel=2 parallel.pipeline_parallel=2",
    )
    for s in (to, fr):
        s.add_argument("--overwrite", action="store_true", help="replace an existing --out")
        s.add_argument(
            "--verify",
            action="store_true",
            help="compare source and converted logits on random inputs; fail above --tolerance",
        )
        s.add_argument(
            "--tolerance",
            type=number(float, POSITIVE),
            default=DEFAULT_TOL,
            help=f"max |logit diff| / max(1, max |logit|) for --verify (default {DEFAULT_TOL:g})",
        )


def run(args: argparse.Namespace) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is ever downloaded
    from megadiff.checkpoint_files import CheckpointError
    from megadiff.config import ConfigError
    from megadiff.export.errors import ConvertError, ParityError

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        print(
            "megadiff convert: error: run it as one process (not under torchrun/srun); "
            "from-hf starts the processes a parallel.* layout needs itself",
            file=sys.stderr,
        )
        return 2
    try:
        import safetensors  # noqa: F401
        import transformers  # noqa: F401
    except ImportError as e:
        print(
            f"megadiff convert: error: needs transformers and safetensors ({e}); install them "
            "with `bash tools/install.sh --hf` (or pip install -e '.[hf]')",
            file=sys.stderr,
        )
        return 2
    try:
        if args.direction == "to-hf":
            from megadiff.export.to_hf import to_hf

            r = to_hf(
                args.ckpt, args.out, args.overwrite, args.verify, args.shard_size, args.tolerance
            )
            done = f"exported step {r.step} to {r.out}"
        else:
            from megadiff.export.from_hf import from_hf

            r = from_hf(
                args.hf, args.out, args.overrides, args.overwrite, args.verify, args.tolerance
            )
            layout = "x".join(f"{k.upper()}{r.layout[k]}" for k in ("tp", "pp", "dp"))
            done = f"wrote checkpoint {r.out} (saved at {layout}; loads at any layout)"
    except ParityError as e:
        print(f"megadiff convert: error: {e}", file=sys.stderr)
        return 1
    except (ConvertError, CheckpointError, ConfigError) as e:
        print(f"megadiff convert: error: {e}", file=sys.stderr)
        return 2
    if r.parity is not None:
        print(f"megadiff convert: {r.parity.describe()}")
    print(f"megadiff convert: {done}")
    return 0
