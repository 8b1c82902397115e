"""Offline generators for the built-in demo data: captioned shape images (the shape world of
:mod:`megadiff.demo.shapes`), spoken phrases (espeak-ng through the ``espeakng-loader``
package, or a small formant synthesizer when it is unavailable), English text shipped with
Python, in-context lookup groups and arithmetic lines."""

from __future__ import annotations

import ctypes
import functools
from collections.abc import Sequence

import numpy as np

from megadiff.demo.shapes import BACKGROUND, COLORS, POSITIONS, SHAPES, caption, position_centres


def draw_shape(shape: str, color: str, position: str, size: int = 32) -> np.ndarray:
    """A ``size x size`` RGB uint8 image of one filled shape; the caption fully determines it."""
    img = np.empty((size, size, 3), np.uint8)
    img[:] = BACKGROUND
    cy, cx = position_centres(size)[position]
    r = size * 0.2
    yy, xx = np.mgrid[0:size, 0:size] + 0.5
    if shape == "circle":
        m = (xx - cx) ** 2 + (yy - cy) ** 2 <= r * r
    elif shape == "square":
        m = (np.abs(xx - cx) <= r * 0.85) & (np.abs(yy - cy) <= r * 0.85)
    elif shape == "triangle":
        m = (yy <= cy + r * 0.8) & (yy >= cy - r) & (np.abs(xx - cx) <= (yy - (cy - r)) * 0.6)
    else:
        raise ValueError(f"unknown shape {shape!r}")
    img[m] = COLORS[color]
    return img


def shape_dataset(n: int, seed: int = 0, size: int = 32) -> tuple[np.ndarray, list[str]]:
    rng = np.random.default_rng(seed)
    imgs, caps = [], []
    for _ in range(n):
        s, col, pos = (
            SHAPES[rng.integers(len(SHAPES))],
            list(COLORS)[rng.integers(len(COLORS))],
            POSITIONS[rng.integers(len(POSITIONS))],
        )
        imgs.append(draw_shape(s, col, pos, size))
        caps.append(caption(col, s, pos))
    return np.stack(imgs), caps


# ----------------------------------------------------------------------------- speech


@functools.cache
def _espeak_library() -> tuple[ctypes.CDLL, int]:
    """espeak-ng's library, initialised once per process (re-initialising it is not safe)."""
    import espeakng_loader as el

    lib = ctypes.cdll.LoadLibrary(el.get_library_path())
    sample_rate = lib.espeak_Initialize(2, 0, el.get_data_path().encode(), 0)  # synchronous
    if sample_rate <= 0:
        raise RuntimeError("espeak-ng failed to initialise")
    return lib, sample_rate


_CALLBACK = ctypes.CFUNCTYPE(
    ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p
)


class Espeak:
    """espeak-ng via ctypes from the ``espeakng-loader`` wheel (no system install needed).

    The library and its synth callback are process-global: every instance shares the one
    initialised library and registers its own callback and voice for each synthesis.
    """

    def __init__(self, voice: str = "en"):
        self.lib, self.sample_rate = _espeak_library()
        self.voice = voice.encode()
        self._chunks: list[np.ndarray] = []

        def cb(wav, n, _events):
            if n > 0:
                self._chunks.append(np.ctypeslib.as_array(wav, shape=(n,)).copy())
            return 0

        self._cb = _CALLBACK(cb)  # keep a reference
        if self.lib.espeak_SetVoiceByName(self.voice) != 0:
            raise RuntimeError(f"espeak-ng has no voice {voice!r}")

    def say(self, text: str) -> np.ndarray:
        self._chunks.clear()
        self.lib.espeak_SetSynthCallback(self._cb)
        self.lib.espeak_SetVoiceByName(self.voice)
        b = text.encode()
        self.lib.espeak_Synth(b, len(b) + 1, 0, 0, 0, 0, None, None)
        self.lib.espeak_Synchronize()
        x = np.concatenate(self._chunks) if self._chunks else np.zeros(1, np.int16)
        return x.astype(np.float32) / 32768.0


def formant_say(text: str, sample_rate: int = 16000) -> np.ndarray:
    """Fallback 'speech': one vowel-like formant chord per letter (deterministic, not words)."""
    out = []
    t = np.arange(int(0.06 * sample_rate)) / sample_rate
    for ch in text.lower():
        if ch == " ":
            out.append(np.zeros(len(t) // 2))
            continue
        k = ord(ch) % 26
        f0, f1, f2 = 110 + 3 * k, 300 + 40 * k, 900 + 70 * (25 - k)
        env = np.sin(np.pi * t / t[-1])
        sig = sum(a * np.sin(2 * np.pi * f * t) for a, f in ((0.5, f0), (0.3, f1), (0.2, f2)))
        out.append(0.4 * env * sig)
    return np.concatenate(out or [np.zeros(1)]).astype(np.float32)


@functools.cache
def speech_backend() -> str:
    try:
        Espeak()
        return "espeak-ng"
    except Exception:  # noqa: BLE001 - any failure -> fallback synthesizer
        return "formant"


# ----------------------------------------------------------------------------- text


def english_text() -> list[str]:
    """Paragraphs of English prose from the Python reference docs shipped with CPython
    (``pydoc_data.topics``, PSF license): real, offline, ~450 KB."""
    from pydoc_data.topics import topics

    paras = []
    for body in topics.values():
        for p in body.split("\n\n"):
            p = " ".join(p.split())
            if len(p) > 80 and sum(c.isalpha() for c in p) > 0.7 * len(p):
                paras.append(p)
    return paras


def lookup_groups(
    words: Sequence[str], n: int, seed: int = 0, pairs: int = 2, digits: int = 6
) -> list[str]:
    """``n`` in-context lookup groups: ``pairs`` definitions ``key=code`` (distinct keys from
    ``words``, fresh random ``digits``-digit codes), then a question ``key?code`` that asks one
    of them back, one per line::

        able=611644
        ack=768175
        ack?768175

    The demo's second verifiable text task: the answer is in the prompt (nothing to memorise),
    but the model has to match the asked key to its definition.
    """
    pool = sorted(set(words))
    if len(pool) < pairs:
        raise ValueError(f"lookup groups of {pairs} keys from only {len(pool)} words")
    rng = np.random.default_rng(seed + 11)
    out = []
    for _ in range(n):
        keys = [pool[i] for i in rng.choice(len(pool), pairs, replace=False).tolist()]
        codes = ["".join(str(d) for d in rng.integers(0, 10, digits)) for _ in keys]
        q = int(rng.integers(pairs))
        lines = [f"{k}={c}" for k, c in zip(keys, codes)] + [f"{keys[q]}?{codes[q]}"]
        out.append("\n".join(lines))
    return out


# <eot> after each demo sum in its training row (the sums stream's eos_fill_length), then PAD
SUMS_EOS_FILL = 3


def digit_sums(n: int, seed: int = 0, width: int = 1) -> list[str]:
    """Verifiable single-digit additions like ``3+5=8`` (100 facts); ``width=2``: the answer
    zero-padded to two digits (``3+5=08``, the demo's text task: every answer has the same
    length, so nothing about the answer is told by where it ends)."""
    rng = np.random.default_rng(seed + 5)
    a, b = rng.integers(0, 10, n).tolist(), rng.integers(0, 10, n).tolist()
    return [f"{x}+{y}={x + y:0{width}d}" for x, y in zip(a, b)]


def pick_lines(n: int, seed: int = 0, digits: int = 3, tag: int = 4) -> list[str]:
    """Rows like ``381|527=527;8301``: two codes of ``digits`` digits that differ in every
    digit, the answer either one (a fair coin), then ``;`` and a tag of ``tag`` random digits
    that no scorer reads. The policy experiments' task: the answer's digits are coupled (each is
    50/50 until one is written), the tag's are free (uncertain, but any value is right), so one
    confidence scale cannot tell which uncertain positions are safe to write together."""
    rng = np.random.default_rng(seed)
    first = rng.integers(0, 10, (n, digits))
    second = (first + rng.integers(1, 10, (n, digits))) % 10  # a different digit everywhere
    coin = rng.random(n) < 0.5
    tags = rng.integers(0, 10, (n, tag))
    out = []
    for a, b, c, t in zip(first.tolist(), second.tolist(), coin.tolist(), tags.tolist()):
        x, y = "".join(map(str, a)), "".join(map(str, b))
        out.append(f"{x}|{y}={x if c else y};{''.join(map(str, t))}")
    return out


def arithmetic_lines(n: int, seed: int = 0, max_operand: int = 50) -> list[str]:
    """Verifiable lines like ``12+7=19`` / ``30-4=26``."""
    rng = np.random.default_rng(seed)
    a, b = rng.integers(0, max_operand, n), rng.integers(0, max_operand, n)
    plus = rng.random(n) < 0.5
    return [
        f"{x}+{y}={x + y}" if p else f"{max(x, y)}-{min(x, y)}={abs(x - y)}"
        for x, y, p in zip(a.tolist(), b.tolist(), plus.tolist())
    ]
