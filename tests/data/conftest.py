import os
import subprocess
import sys

import numpy as np
import pytest

from megadiff.data.tokenizers.image import PatchVQ
from megadiff.data.tokenizers.text import train_bpe
from megadiff.demo.synth import shape_dataset

WORDS = [
    "the",
    "a",
    "red",
    "blue",
    "green",
    "circle",
    "square",
    "triangle",
    "on",
    "left",
    "right",
    "top",
    "of",
    "and",
    "is",
    "to",
]


def corpus(n=300, seed=0):
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, rng.integers(3, 40))) + "." for _ in range(n)]


@pytest.fixture(scope="session")
def text_tok(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    return train_bpe(corpus(), 300, d / "bpe.tiktoken")


@pytest.fixture(scope="session")
def image_tok(tmp_path_factory):
    imgs, _ = shape_dataset(200, seed=3)
    p = tmp_path_factory.mktemp("itok") / "img.vq"
    PatchVQ(codebook_size=32).fit(imgs, iters=4).save(p)
    return p


def make_text_stream(out, docs, tok):
    from megadiff.data.preprocess import Record, write_shards

    recs = [Record(f"doc{i}", text=d) for i, d in enumerate(docs)]
    write_shards("text", recs, out, tok, shard_size=1 << 12)
    return str(out)


def make_pair_stream(out, kind, n, tok, codebook=16, frames=(3, 9), k=2, seed=0):
    """Pairs with caption 'clip i' and random codes; returns (path, {caption: codes})."""
    from megadiff.data.preprocess import Record, write_shards

    rng = np.random.default_rng(seed)
    recs, truth = [], {}
    for i in range(n):
        if kind == "image":
            c = rng.integers(0, codebook, (4, 4))
        else:
            c = rng.integers(0, codebook, (int(rng.integers(*frames)), k))
        truth[f"clip {i}"] = c
        recs.append(Record(f"pair{i}", text=f"clip {i}", item=c))
    modal = {
        "codebook_size": codebook,
        "num_codebooks": 1 if kind == "image" else k,
        "grid": [4, 4] if kind == "image" else None,
    }
    write_shards(kind, recs, out, tok, modal, shard_size=1 << 11)
    return str(out), truth


ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def megadiff_cli(*argv) -> subprocess.CompletedProcess:
    """Run the real ``python -m megadiff`` command of this checkout."""
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "megadiff", *map(str, argv)]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
