"""Scorers for the demo's verifiable tasks (used by ``tools/eval_sampling.py`` and the tests).

* **text** (arithmetic): the prompt ends in ``a+b=`` / ``a-b=``; the sample is correct when the
  generated text starts with the right number (leading spaces allowed, then a non-digit or end).
* **text** (lookup): the prompt defines codes (``able=611644``) and its last line asks one back
  (``able?``, :func:`~megadiff.demo.synth.lookup_groups`); correct when the generated text
  starts with that code (and no further digit follows).
* **text** (pick): the prompt ``381|527=`` offers two codes; correct when the generated text
  starts with either one whole (then a non-digit or end; :func:`~megadiff.demo.synth.pick_lines`).
* **t2i**: the caption ("a red circle on the left") fixes the colour and position; the decoded
  image is correct when its foreground (pixels far from the background colour) has the caption's
  colour (nearest palette colour of its mean) and its centroid is nearest the caption's position.
* **t2s**: the reference is espeak-ng's rendering of the transcript, encoded with the codec.
  Metric: **DTW log-spectral distance** (dB): the codec log-magnitude spectrograms of the
  generated codes and of the reference codes (the codec's own reconstruction, so codec error does
  not count and no Griffin-Lim phase enters), aligned by dynamic time warping, mean RMS
  difference over the aligned frame pairs. A sample is correct when its own transcript's
  reference is the nearest among the candidate transcripts' references (retrieval@1).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np

from megadiff.demo.shapes import BACKGROUND, COLORS, parse_caption, position_centres
from megadiff.demo.synth import lookup_groups, pick_lines

_ARITH = re.compile(r"(\d+)\s*([+-])\s*(\d+)\s*=\s*$")
_LEADING_INT = re.compile(r"\s*(\d+)(?!\d)")
_PICK = re.compile(r"(\d+)\|(\d+)=$")


# ----------------------------------------------------------------------------- arithmetic


def arithmetic_answer(prompt: str) -> int:
    """The true answer of a prompt ending in ``a+b=`` or ``a-b=``."""
    m = _ARITH.search(prompt)
    if m is None:
        raise ValueError(f"not an arithmetic prompt (expected '...a+b=' or '...a-b='): {prompt!r}")
    a, op, b = int(m.group(1)), m.group(2), int(m.group(3))
    return a + b if op == "+" else a - b


def parse_leading_int(text: str) -> int | None:
    """The integer the text starts with (after spaces), or None."""
    m = _LEADING_INT.match(text)
    return int(m.group(1)) if m else None


def score_arithmetic(prompt: str, generated: str) -> bool:
    """True when ``generated`` starts with the answer of ``prompt``."""
    return parse_leading_int(generated) == arithmetic_answer(prompt)


def arithmetic_prompts(n: int, seed: int = 1234, max_operand: int = 50) -> list[str]:
    """``n`` prompts like the demo's lines (``12+7=`` or ``30-4=``, the larger operand first)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        a, b = (int(v) for v in rng.integers(0, max_operand, 2))
        out.append(f"{a}+{b}=" if rng.random() < 0.5 else f"{max(a, b)}-{min(a, b)}=")
    return out


_DEFINITION = re.compile(r"^([a-z]+)=(\d+)$", re.MULTILINE)
_QUESTION = re.compile(r"(?:^|\n)([a-z]+)\?$")


def lookup_answer(prompt: str) -> str:
    """The code a lookup prompt asks for: the last definition ``key=code`` of the key in its
    final question line ``key?``."""
    q = _QUESTION.search(prompt)
    if q is None:
        raise ValueError(f"not a lookup prompt (expected a last line 'key?'): {prompt!r}")
    codes = [c for k, c in _DEFINITION.findall(prompt) if k == q.group(1)]
    if not codes:
        raise ValueError(f"lookup prompt {prompt!r}: '{q.group(1)}' is never defined in it")
    return codes[-1]


def score_lookup(prompt: str, generated: str) -> bool:
    """True when ``generated`` starts with the asked code (then no further digit)."""
    code = lookup_answer(prompt)
    return generated.startswith(code) and not generated[len(code) : len(code) + 1].isdigit()


def lookup_prompts(words: Sequence[str], n: int, seed: int = 1234, pairs: int = 2) -> list[str]:
    """``n`` prompts like the demo's lookup groups without the answer (``...\nkey?``)."""
    return [g[: g.rindex("?") + 1] for g in lookup_groups(words, n, seed, pairs)]


def pick_codes(prompt: str) -> tuple[str, str]:
    """The two codes a pick prompt ``381|527=`` offers."""
    m = _PICK.search(prompt)
    if m is None:
        raise ValueError(f"not a pick prompt (expected 'code|code='): {prompt!r}")
    return m.group(1), m.group(2)


def score_pick(prompt: str, generated: str) -> bool:
    """True when ``generated`` (leading spaces removed) starts with one of the prompt's two codes
    whole, not followed by another digit."""
    m = _LEADING_INT.match(generated)
    return m is not None and m.group(1) in pick_codes(prompt)


def pick_prompts(n: int, seed: int = 1234) -> list[str]:
    """``n`` prompts like the pick rows without their answer (``381|527=``)."""
    return [line[: line.index("=") + 1] for line in pick_lines(n, seed)]


# ----------------------------------------------------------------------------- text -> image


def score_image(img: np.ndarray, caption: str, fg_threshold: float = 90.0) -> dict:
    """``{"color_ok", "position_ok", "correct", "color", "position"}`` of an RGB uint8 image."""
    colour, _, position = parse_caption(caption)
    x = np.asarray(img, np.float64)
    fg = np.abs(x - np.array(BACKGROUND)).sum(-1) > fg_threshold
    if fg.sum() < 4:  # (almost) empty picture
        return dict(color_ok=False, position_ok=False, correct=False, color=None, position=None)
    mean = x[fg].mean(0)
    got_colour = min(COLORS, key=lambda c: np.abs(mean - np.array(COLORS[c])).sum())
    rows, cols = np.nonzero(fg)
    cy, cx = rows.mean(), cols.mean()
    centres = position_centres(img.shape[0])
    got_pos = min(centres, key=lambda p: (centres[p][0] - cy) ** 2 + (centres[p][1] - cx) ** 2)
    ok_c, ok_p = got_colour == colour, got_pos == position
    return dict(
        color_ok=ok_c, position_ok=ok_p, correct=ok_c and ok_p, color=got_colour, position=got_pos
    )


# ----------------------------------------------------------------------------- text -> speech


def codes_spectrogram(codec, codes: np.ndarray) -> np.ndarray:
    """The codec's log-magnitude spectrogram (dB) of ``codes`` ``[frames, K]``."""
    codes = np.asarray(codes, np.int64).reshape(-1, codec.num_codebooks)
    cb = codec.codebook
    logmag = sum(cb[k][codes[:, k]] for k in range(codec.num_codebooks))
    return (20.0 / np.log(10.0)) * np.asarray(logmag, np.float64)


def dtw_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Mean frame distance (RMS over bins) along the optimal DTW path of ``a`` ``[n, F]`` and
    ``b`` ``[m, F]`` (steps: diagonal, horizontal, vertical)."""
    if len(a) == 0 or len(b) == 0:
        return float("inf")
    d = np.sqrt(((a[:, None, :] - b[None, :, :]) ** 2).mean(-1))
    n, m = d.shape
    acc = np.full((n + 1, m + 1), np.inf)
    steps = np.zeros((n + 1, m + 1))
    acc[0, 0] = 0.0
    for i in range(1, n + 1):
        for j in range(1, m + 1):
            prev = ((i - 1, j - 1), (i - 1, j), (i, j - 1))
            pi, pj = min(prev, key=lambda p: acc[p])
            acc[i, j] = acc[pi, pj] + d[i - 1, j - 1]
            steps[i, j] = steps[pi, pj] + 1
    return float(acc[n, m] / steps[n, m])


class SpeechScorer:
    """Reference renderings of transcripts (espeak-ng, encoded with the codec), cached.

    ``say(text) -> wave`` at ``say_rate`` Hz (default: a new :class:`~megadiff.demo.synth.Espeak`;
    pass an existing one's ``say`` to share it: espeak-ng's synth callback is process-global).
    espeak-ng renders the same text slightly differently from call to call, so the reference of
    each transcript is rendered once and cached.
    """

    def __init__(self, codec, say=None, say_rate: int | None = None):
        self.codec = codec
        self._say, self._rate = say, say_rate
        self._refs: dict[str, np.ndarray] = {}

    def _speaker(self):
        if self._say is None:
            from megadiff.demo.synth import Espeak

            e = Espeak()
            self._say, self._rate = e.say, e.sample_rate
        return self._say, self._rate

    def reference(self, transcript: str) -> np.ndarray:
        """The reference spectrogram ``[frames, F]`` (dB) of a transcript."""
        if transcript not in self._refs:
            from megadiff.data.tokenizers.audio import resample

            say, rate = self._speaker()
            wav = resample(say(transcript), rate, self.codec.sample_rate)
            self._refs[transcript] = codes_spectrogram(self.codec, self.codec.encode(wav))
        return self._refs[transcript]

    def distance(self, codes: np.ndarray, transcript: str) -> float:
        """DTW log-spectral distance (dB) of generated ``codes`` to the transcript's reference."""
        return dtw_distance(codes_spectrogram(self.codec, codes), self.reference(transcript))

    def score(self, codes: np.ndarray, transcript: str, candidates: Sequence[str]) -> dict:
        """``{"lsd", "correct", "nearest"}``: ``correct`` when the transcript's own reference is
        the nearest of ``candidates`` (which should include it)."""
        spec = codes_spectrogram(self.codec, codes)
        # in a fixed order (not a set's, which varies with the process's hash seed): the order
        # in which references are first rendered changes them a little
        texts = dict.fromkeys((transcript, *candidates))
        dist = {t: dtw_distance(spec, self.reference(t)) for t in texts}
        nearest = min(dist, key=dist.get)
        return dict(lsd=dist[transcript], correct=nearest == transcript, nearest=nearest)
