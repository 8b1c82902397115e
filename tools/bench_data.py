"""Loader throughput (tokens/s on one core) for packed text and for a tri-modal mixture.

    python tools/bench_data.py [--seq-length 2048] [--micro-batch 8] [--seconds 5]

Writes synthetic MDS streams (random ids, log-normal document lengths) to a temp directory
with streaming's ``MDSWriter``, then times ``MixtureLoader`` in this process (one core, no
workers), which reads every sample through streaming's ``StreamingDataset`` (``dataset[id]``).
Imports megadiff from this checkout.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megadiff.data.loader import MixtureLoader, StreamSpec  # noqa: E402
from megadiff.data.names import MODALITIES  # noqa: E402
from megadiff.data.preprocess import Record, write_shards  # noqa: E402
from megadiff.data.tokenizers.text import TextTokenizer  # noqa: E402


class _IdsTok(TextTokenizer):
    """Stands in for a tokenizer of ``n_vocab`` ids: records carry pre-tokenized ids."""

    def __init__(self, n_vocab: int):
        self._n, self.spec = n_vocab, f"bench-{n_vocab}"

    @property
    def n_vocab(self) -> int:
        return self._n


def make_streams(root: str, n_docs: int, n_pairs: int, vocab: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    tok = _IdsTok(vocab)
    lens = np.clip(rng.lognormal(5.5, 1.0, n_docs).astype(int), 1, 8192)  # median ~245 tokens
    paths = {k: os.path.join(root, k) for k in MODALITIES}
    write_shards(
        "text",
        [Record(f"d{i}", text=rng.integers(0, vocab, n)) for i, n in enumerate(lens)],
        paths["text"],
        tok,
    )

    def cap():
        return rng.integers(0, vocab, rng.integers(5, 20))

    write_shards(
        "image",
        [Record(f"i{i}", text=cap(), item=rng.integers(0, 1024, (16, 16))) for i in range(n_pairs)],
        paths["image"],
        tok,
        {"codebook_size": 1024, "grid": [16, 16]},
    )
    write_shards(
        "audio",
        [
            Record(f"a{i}", text=cap(), item=rng.integers(0, 1024, (rng.integers(50, 150), 4)))
            for i in range(n_pairs)
        ],
        paths["audio"],
        tok,
        {"codebook_size": 1024, "num_codebooks": 4},
    )
    return paths


def bench(loader: MixtureLoader, seconds: float) -> dict[str, float]:
    """Tokens/s over ``seconds`` of wall time: all positions, non-PAD positions only, and all
    positions per second of this process's CPU time (less sensitive to a busy machine)."""
    next(loader)  # open shards
    n = real = 0
    c0 = time.process_time()
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        b = next(loader)
        n += b["tokens"].numel()
        real += int((b["tokens"] != loader.vocab.pad_id).sum())
    dt, cpu = time.perf_counter() - t0, time.process_time() - c0
    return {
        "tokens_per_s": round(n / dt),
        "non_pad_tokens_per_s": round(real / dt),
        "tokens_per_cpu_s": round(n / cpu),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seq-length", type=int, default=2048, help="packed text: row length")
    ap.add_argument("--micro-batch", type=int, default=8, help="rows per batch")
    ap.add_argument("--seconds", type=float, default=5.0, help="timed seconds per loader")
    ap.add_argument("--mix-seq-length", type=int, default=1024, help="rows of the mixture")
    ap.add_argument("--docs", type=int, default=50000, help="synthetic text documents")
    ap.add_argument("--pairs", type=int, default=5000, help="synthetic image and audio pairs, each")
    ap.add_argument("--vocab", type=int, default=100277, help="text vocab (uint32 ids if > 65536)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as root:
        t0 = time.time()
        paths = make_streams(root, args.docs, args.pairs, args.vocab)
        print(f"wrote streams in {time.time() - t0:.1f}s")
        L, B = args.seq_length, args.micro_batch
        res = {}
        with MixtureLoader([StreamSpec("text", paths["text"])], L, B, seed=1) as text:
            res["packed_text"] = bench(text, args.seconds)
        mix_l = args.mix_seq_length
        mix = [
            StreamSpec("text", paths["text"], 2),
            StreamSpec("image", paths["image"], 1),
            StreamSpec("audio", paths["audio"], 1),
        ]
        with MixtureLoader(mix, mix_l, B, seed=1) as ld:
            res[f"mixture_L{mix_l}"] = bench(ld, args.seconds)
    info = {
        "seq_length": L,
        "micro_batch": B,
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "load_avg_1m": round(os.getloadavg()[0], 2),
        "results": res,
    }
    print(json.dumps(info))


if __name__ == "__main__":
    main()
