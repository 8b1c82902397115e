"""Image tokenizers: the interface, a built-in patch k-means VQ trainable on CPU in seconds, and
metadata for codes precomputed by any external tokenizer.

Images are uint8 arrays ``[N, H, W, 3]``; codes are int arrays ``[N, h, w]`` with values in
``[0, codebook_size)``, flattened row-major into the token stream.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from megadiff.data.tokenizers.text import TokenizerError
from megadiff.data.tokenizers.vq import kmeans, nearest


class ImageTokenizer(Protocol):
    codebook_size: int
    image_size: int  # input/output images are image_size x image_size RGB

    @property
    def grid(self) -> tuple[int, int]: ...  # (h, w) codes per image

    def encode(self, images: np.ndarray) -> np.ndarray: ...

    def decode(self, codes: np.ndarray) -> np.ndarray: ...


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """Peak signal-to-noise ratio (dB) of uint8 images."""
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else float(10 * np.log10(255.0**2 / mse))


@dataclass
class PatchVQ:
    """Non-overlapping ``patch x patch`` RGB patches, each replaced by its nearest k-means centroid.

    ``image_size=32, patch=4`` gives an 8x8 grid = 64 tokens per image.
    """

    image_size: int = 32
    patch: int = 4
    codebook_size: int = 256
    codebook: np.ndarray | None = None  # float32 [codebook_size, patch*patch*3], values 0..1

    @property
    def grid(self) -> tuple[int, int]:
        g = self.image_size // self.patch
        return (g, g)

    @property
    def tokens_per_item(self) -> int:
        return self.grid[0] * self.grid[1]

    def _patches(self, images: np.ndarray) -> np.ndarray:
        images = np.asarray(images)
        if images.ndim == 3:
            images = images[None]
        n, h, w, c = images.shape
        if (h, w, c) != (self.image_size, self.image_size, 3):
            raise ValueError(
                f"images must be [N, {self.image_size}, {self.image_size}, 3], got {images.shape}"
            )
        g, p = self.grid[0], self.patch
        x = images.reshape(n, g, p, g, p, 3).transpose(0, 1, 3, 2, 4, 5)
        return x.reshape(n * g * g, p * p * 3).astype(np.float32) / 255.0

    def fit(self, images: np.ndarray, iters: int = 15, seed: int = 0) -> PatchVQ:
        if self.image_size % self.patch:
            raise ValueError(f"image_size {self.image_size} is not a multiple of {self.patch}")
        self.codebook = kmeans(self._patches(images), self.codebook_size, iters, seed)
        return self

    def _cb(self) -> np.ndarray:
        if self.codebook is None:
            raise RuntimeError("PatchVQ is not trained: call fit() or load()")
        return self.codebook

    def encode(self, images: np.ndarray) -> np.ndarray:
        n = 1 if np.asarray(images).ndim == 3 else len(images)
        codes = nearest(self._patches(images), self._cb())
        return codes.reshape(n, *self.grid).astype(np.int64)

    def decode(self, codes: np.ndarray) -> np.ndarray:
        codes = np.asarray(codes, np.int64).reshape(-1, *self.grid)
        n, (g, _), p = len(codes), self.grid, self.patch
        x = self._cb()[codes].reshape(n, g, g, p, p, 3).transpose(0, 1, 3, 2, 4, 5)
        x = x.reshape(n, self.image_size, self.image_size, 3)
        return np.clip(np.rint(x * 255.0), 0, 255).astype(np.uint8)

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        meta = {
            "kind": "patch_vq",
            "image_size": self.image_size,
            "patch": self.patch,
            "codebook_size": self.codebook_size,
        }
        with open(path, "wb") as f:  # np.savez would append .npz to a differently named path
            np.savez(f, codebook=self._cb(), meta=np.array(json.dumps(meta)))
        return path

    @classmethod
    def load(cls, path: str | Path) -> PatchVQ:
        return _load_npz(cls, path, "patch_vq", ("image_size", "patch", "codebook_size"))


def _load_npz(cls, path, kind: str, keys: tuple[str, ...]):
    path = Path(path)
    if not path.is_file():
        raise TokenizerError(
            f"{kind} tokenizer file '{path}' does not exist (train one with "
            "`megadiff preprocess ... --train-tokenizer` or megadiff.demo.data.build_demo_data)"
        )
    try:
        with np.load(path, allow_pickle=False) as z:
            meta = json.loads(str(z["meta"]))
            codebook = np.array(z["codebook"], np.float32)
    except Exception as e:  # noqa: BLE001 - zip/json/key errors all mean a corrupt file
        raise TokenizerError(f"{kind} tokenizer file '{path}' is corrupt: {e}") from None
    if meta.get("kind") != kind:
        raise TokenizerError(f"'{path}' holds a {meta.get('kind')!r} tokenizer, not {kind}")
    tok = cls(**{k: meta[k] for k in keys})
    if codebook.shape[-2] != tok.codebook_size and codebook.shape[0] != tok.codebook_size:
        raise TokenizerError(f"{kind} tokenizer file '{path}': codebook shape {codebook.shape}")
    tok.codebook = codebook
    return tok


@dataclass
class CodesMeta:
    """Metadata of codes made by an external tokenizer (read from a small JSON file).

    ``{"codebook_size": 8192, "grid": [16, 16], "tokenizer": "my-vqgan"}`` for images;
    ``{"codebook_size": 1024, "num_codebooks": 8, "frame_rate": 75, "tokenizer": "encodec"}``
    for audio (codes ``[frames, num_codebooks]``).
    """

    codebook_size: int
    num_codebooks: int = 1
    grid: tuple[int, int] | None = None
    frame_rate: float | None = None
    tokenizer: str = "external"

    @classmethod
    def from_json(cls, path: str | Path) -> CodesMeta:
        path = Path(path)
        if not path.is_file():
            raise TokenizerError(f"codes metadata file '{path}' does not exist")
        try:
            d = json.loads(path.read_text())
            meta = cls(
                codebook_size=int(d["codebook_size"]),
                num_codebooks=int(d.get("num_codebooks", 1)),
                grid=tuple(d["grid"]) if d.get("grid") else None,
                frame_rate=d.get("frame_rate"),
                tokenizer=str(d.get("tokenizer", "external")),
            )
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
            raise TokenizerError(f"codes metadata file '{path}' is invalid: {e!r}") from None
        if meta.codebook_size < 1 or meta.num_codebooks < 1:
            raise TokenizerError(f"codes metadata file '{path}': sizes must be positive")
        return meta
