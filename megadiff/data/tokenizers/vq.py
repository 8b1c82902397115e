"""Small numpy k-means used by the built-in image and audio tokenizers (CPU, seconds)."""

from __future__ import annotations

import numpy as np


def nearest(x: np.ndarray, codebook: np.ndarray, chunk: int = 16384) -> np.ndarray:
    """Index of the nearest codebook row (squared L2) for each row of ``x``."""
    c2 = (codebook * codebook).sum(1)
    out = np.empty(len(x), np.int64)
    for i in range(0, len(x), chunk):
        xb = x[i : i + chunk]
        out[i : i + chunk] = np.argmin(c2[None, :] - 2.0 * (xb @ codebook.T), axis=1)
    return out


def kmeans(x: np.ndarray, k: int, iters: int = 20, seed: int = 0) -> np.ndarray:
    """Lloyd's k-means with k-means++-style seeding on a subsample; returns float32 [k, d]."""
    x = np.ascontiguousarray(x, np.float32)
    rng = np.random.default_rng(seed)
    if len(x) < k:
        raise ValueError(f"k-means needs at least k={k} training vectors, got {len(x)}")
    sub = x[rng.choice(len(x), min(len(x), 20 * k), replace=False)]
    cb = [sub[rng.integers(len(sub))]]
    d2 = ((sub - cb[0]) ** 2).sum(1)
    for _ in range(1, k):
        j = rng.choice(len(sub), p=d2 / d2.sum()) if d2.sum() > 0 else rng.integers(len(sub))
        cb.append(sub[j])
        d2 = np.minimum(d2, ((sub - sub[j]) ** 2).sum(1))
    codebook = np.stack(cb).astype(np.float32)
    for _ in range(iters):
        a = nearest(x, codebook)
        counts = np.bincount(a, minlength=k)
        order = np.argsort(a, kind="stable")
        live = counts > 0
        starts = np.concatenate([[0], np.cumsum(counts)[:-1]])[live]
        sums = np.add.reduceat(x[order], starts, axis=0)
        codebook[live] = sums / counts[live, None]
        dead = np.flatnonzero(~live)
        if len(dead):  # re-seed empty clusters on random training vectors
            codebook[dead] = x[rng.choice(len(x), len(dead), replace=False)]
    return codebook
