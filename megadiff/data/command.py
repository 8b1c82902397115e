"""``megadiff data verify PATH...``: check MDS streams end to end, content hashes included.

A PATH is a stream directory (written by ``megadiff preprocess``; its held-out ``val/`` split is
checked too) or a directory of streams (e.g. the demo data). Exit 0 when every stream is
intact, 2 naming each bad stream and shard.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from megadiff.data.checks import verify_stream
from megadiff.data.mds import INDEX, VAL_DIR


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    v = sub.add_parser(
        "verify",
        help="check streams: index, manifest, shard sizes and content hashes",
        description="Check MDS streams: index.json, manifest.json, columns, shard sizes and "
        "content hashes. Exit 0 when all are intact, 2 otherwise.",
    )
    v.add_argument("paths", nargs="+", metavar="PATH", help="stream directory or a parent of some")
    v.add_argument("--no-progress", action="store_true", help="no progress bar")


def stream_dirs(path: Path) -> list[Path]:
    """``path`` itself when it is a stream, else the streams directly under it; each followed
    by its held-out ``val/`` split when it has one."""
    if (path / INDEX).is_file() or not path.is_dir():
        found = [path]
    else:
        found = sorted(d for d in path.iterdir() if (d / INDEX).is_file()) or [path]
    return [s for d in found for s in (d, d / VAL_DIR) if s == d or (s / INDEX).is_file()]


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    streams = [d for p in args.paths for d in stream_dirs(Path(p))]
    bad = 0
    for root in streams:
        with tqdm(
            desc=f"verify {root}", unit="shard", disable=args.no_progress, file=sys.stderr
        ) as bar:
            problems = verify_stream(root, bar)
            shards = bar.n
        if problems:
            bad += 1
            for line in problems:
                print(f"BAD {root}: {line}")
        else:
            print(f"ok  {root} ({shards} shard(s))")
    print(f"{len(streams) - bad} of {len(streams)} stream(s) intact")
    return 2 if bad else 0
