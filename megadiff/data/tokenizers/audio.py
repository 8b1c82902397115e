"""Audio tokenizers: the codec interface, a built-in spectral residual VQ trainable on CPU in
seconds, WAV I/O, and a spectral distance to measure reconstructions.

Built-in codec (:class:`SpectralRVQ`): log-magnitude STFT frames (Hann window ``n_fft``, hop
``hop``) quantised by ``num_codebooks`` residual k-means stages; decoding inverts the magnitudes
with Griffin-Lim. Codes are ``[frames, num_codebooks]``; the vocabulary flattens them per frame
(see :mod:`megadiff.data.vocab`). ``sample_rate / hop`` frames per second.
"""

from __future__ import annotations

import json
import wave
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from megadiff.data.tokenizers.image import _load_npz
from megadiff.data.tokenizers.vq import kmeans, nearest


class AudioTokenizer(Protocol):
    sample_rate: int
    codebook_size: int
    num_codebooks: int

    @property
    def frame_rate(self) -> float: ...

    def encode(self, wav: np.ndarray) -> np.ndarray: ...  # float wave -> [frames, K]

    def decode(self, codes: np.ndarray) -> np.ndarray: ...  # [frames, K] -> float wave


# ----------------------------------------------------------------------------- signal utils


def stft(x: np.ndarray, n_fft: int, hop: int) -> np.ndarray:
    """Complex STFT ``[1 + len(x)//hop, n_fft//2+1]``, frames centred on ``k*hop`` (zero padded)."""
    x = np.asarray(x, np.float64)
    n = 1 + len(x) // hop
    pad = n_fft // 2
    x = np.pad(x, (pad, pad + n_fft))
    idx = np.arange(n)[:, None] * hop + np.arange(n_fft)[None, :]
    return np.fft.rfft(x[idx] * np.hanning(n_fft + 1)[:-1], axis=1)


def istft(spec: np.ndarray, n_fft: int, hop: int, length: int) -> np.ndarray:
    win = np.hanning(n_fft + 1)[:-1]
    frames = np.fft.irfft(spec, n=n_fft, axis=1) * win
    n = len(spec)
    out = np.zeros(n * hop + n_fft)
    norm = np.zeros_like(out)
    for i in range(n):
        out[i * hop : i * hop + n_fft] += frames[i]
        norm[i * hop : i * hop + n_fft] += win**2
    out /= np.maximum(norm, 1e-8)
    pad = n_fft // 2
    return out[pad : pad + length]


def griffin_lim(
    mag: np.ndarray, n_fft: int, hop: int, length: int, iters: int = 32, seed: int = 0
) -> np.ndarray:
    rng = np.random.default_rng(seed)
    phase = np.exp(2j * np.pi * rng.random(mag.shape))
    x = istft(mag * phase, n_fft, hop, length)
    for _ in range(iters):
        s = stft(x, n_fft, hop)[: len(mag)]
        x = istft(mag * np.exp(1j * np.angle(s)), n_fft, hop, length)
    return x


def log_spectral_distance(a: np.ndarray, b: np.ndarray, n_fft: int = 512, hop: int = 128) -> float:
    """Mean over frames of the RMS difference (dB) of the two magnitude spectra (LSD)."""
    n = min(len(a), len(b))
    sa, sb = np.abs(stft(a[:n], n_fft, hop)), np.abs(stft(b[:n], n_fft, hop))
    floor = 1e-4 * max(sa.max(), 1e-8)  # ignore differences far below the signal's peak
    da = 20 * np.log10(np.maximum(sa, floor))
    db = 20 * np.log10(np.maximum(sb, floor))
    return float(np.mean(np.sqrt(np.mean((da - db) ** 2, axis=1))))


def resample(x: np.ndarray, sr_in: int, sr_out: int) -> np.ndarray:
    """Linear-interpolation resampling (adequate for the built-in codec; use a real codec's own
    front end for production audio)."""
    if sr_in == sr_out:
        return np.asarray(x, np.float32)
    n = round(len(x) * sr_out / sr_in)
    t = np.arange(n) * (sr_in / sr_out)
    return np.interp(t, np.arange(len(x)), x).astype(np.float32)


def read_wav(path: str | Path) -> tuple[np.ndarray, int]:
    """16-bit PCM WAV -> (float32 mono wave in [-1, 1], sample rate). Stdlib only."""
    with wave.open(str(path), "rb") as w:
        if w.getsampwidth() != 2:
            raise ValueError(f"'{path}': only 16-bit PCM WAV is supported")
        sr, ch = w.getframerate(), w.getnchannels()
        x = np.frombuffer(w.readframes(w.getnframes()), "<i2").astype(np.float32) / 32768.0
    return x.reshape(-1, ch).mean(1), sr


def write_wav(path: str | Path, x: np.ndarray, sr: int) -> None:
    pcm = (np.clip(np.asarray(x), -1, 1) * 32767).astype("<i2")
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(sr)
        w.writeframes(pcm.tobytes())


# ----------------------------------------------------------------------------- the codec


@dataclass
class SpectralRVQ:
    """Log-magnitude STFT + residual VQ.

    ``sample_rate / hop`` frames per second, ``num_codebooks`` tokens per frame.
    """

    sample_rate: int = 16000
    n_fft: int = 512
    hop: int = 320
    codebook_size: int = 256
    num_codebooks: int = 2
    gl_iters: int = 32
    codebook: np.ndarray | None = None  # float32 [num_codebooks, codebook_size, n_fft//2+1]

    @property
    def frame_rate(self) -> float:
        return self.sample_rate / self.hop

    @property
    def tokens_per_second(self) -> float:
        return self.frame_rate * self.num_codebooks

    def features(self, wav: np.ndarray) -> np.ndarray:
        return np.log(np.abs(stft(wav, self.n_fft, self.hop)) + 1e-4).astype(np.float32)

    def fit(self, wavs: list[np.ndarray], iters: int = 15, seed: int = 0) -> SpectralRVQ:
        x = np.concatenate([self.features(w) for w in wavs])
        books = []
        for k in range(self.num_codebooks):
            cb = kmeans(x, self.codebook_size, iters, seed + k)
            books.append(cb)
            x = x - cb[nearest(x, cb)]
        self.codebook = np.stack(books)
        return self

    def _cb(self) -> np.ndarray:
        if self.codebook is None:
            raise RuntimeError("SpectralRVQ is not trained: call fit() or load()")
        return self.codebook

    def encode(self, wav: np.ndarray) -> np.ndarray:
        x = self.features(wav)
        codes = np.empty((len(x), self.num_codebooks), np.int64)
        for k, cb in enumerate(self._cb()):
            codes[:, k] = nearest(x, cb)
            x = x - cb[codes[:, k]]
        return codes

    def decode(self, codes: np.ndarray) -> np.ndarray:
        codes = np.asarray(codes, np.int64).reshape(-1, self.num_codebooks)
        cb = self._cb()
        logmag = sum(cb[k][codes[:, k]] for k in range(self.num_codebooks))
        mag = np.maximum(np.exp(logmag.astype(np.float64)) - 1e-4, 0.0)
        length = max((len(codes) - 1) * self.hop, 1)
        return griffin_lim(mag, self.n_fft, self.hop, length, self.gl_iters).astype(np.float32)

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        meta = {
            "kind": "spectral_rvq",
            "sample_rate": self.sample_rate,
            "n_fft": self.n_fft,
            "hop": self.hop,
            "codebook_size": self.codebook_size,
            "num_codebooks": self.num_codebooks,
            "gl_iters": self.gl_iters,
        }
        with open(path, "wb") as f:
            np.savez(f, codebook=self._cb(), meta=np.array(json.dumps(meta)))
        return path

    @classmethod
    def load(cls, path: str | Path) -> SpectralRVQ:
        keys = ("sample_rate", "n_fft", "hop", "codebook_size", "num_codebooks", "gl_iters")
        return _load_npz(cls, path, "spectral_rvq", keys)
