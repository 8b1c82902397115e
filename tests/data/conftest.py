import numpy as np
import pytest

from megadiff.data.image_tokenizer import PatchVQ
from megadiff.data.synth import shape_dataset
from megadiff.data.text_tokenizer import train_bpe

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
