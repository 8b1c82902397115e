"""Scorers: known-good and known-bad inputs for arithmetic, text->image and text->speech."""

from __future__ import annotations

import numpy as np
import pytest

from megadiff.demo.scoring import (
    SpeechScorer,
    arithmetic_answer,
    arithmetic_prompts,
    codes_spectrogram,
    dtw_distance,
    lookup_answer,
    lookup_prompts,
    score_arithmetic,
    score_image,
    score_lookup,
)
from megadiff.demo.shapes import BACKGROUND, COLORS, parse_caption
from megadiff.demo.synth import draw_shape, lookup_groups


def test_arithmetic_scorer():
    assert arithmetic_answer("12+7=") == 19
    assert arithmetic_answer("3+4=7\n30-4=") == 26  # the last line is the question
    assert score_arithmetic("12+7=", "19\n30-4=26")
    assert score_arithmetic("12+7=", " 19")
    assert score_arithmetic("49-49=", "0")
    assert not score_arithmetic("12+7=", "18\n")
    assert not score_arithmetic("12+7=", "190")  # a longer number is wrong
    assert not score_arithmetic("12+7=", "1 9")
    assert not score_arithmetic("12+7=", "")
    assert not score_arithmetic("12+7=", "x19")
    with pytest.raises(ValueError, match="not an arithmetic prompt"):
        arithmetic_answer("the cat")


def test_arithmetic_prompts_are_demo_like():
    ps = arithmetic_prompts(200, seed=3)
    assert len(ps) == 200 and ps == arithmetic_prompts(200, seed=3)
    for p in ps:
        a, b = (int(v) for v in p[:-1].replace("-", "+").split("+"))
        assert 0 <= a < 50 and 0 <= b < 50 and p.endswith("=")
        assert "-" not in p or a >= b  # no negative answers, like the training lines
    assert {"+" in p for p in ps} == {True, False}


def test_lookup_scorer_and_prompts():
    prompt = "able=611644\nack=768175\nack?"
    assert lookup_answer(prompt) == "768175"
    assert score_lookup(prompt, "768175")
    assert score_lookup(prompt, "768175\nfoo=1")
    assert not score_lookup(prompt, "611644")  # the other definition
    assert not score_lookup(prompt, "76817")
    assert not score_lookup(prompt, "7681750")  # a longer number is wrong
    assert not score_lookup(prompt, " 768175")
    assert lookup_answer("ack=1\nack=2\nack?") == "2"  # the last definition counts
    with pytest.raises(ValueError, match="never defined"):
        lookup_answer("able=611644\nzz?")
    with pytest.raises(ValueError, match="not a lookup prompt"):
        lookup_answer("12+7=")
    words = [f"w{chr(97 + i)}{chr(97 + j)}" for i in range(26) for j in range(26)]
    ps = lookup_prompts(words, 50, seed=1)
    assert ps == lookup_prompts(words, 50, seed=1) and ps != lookup_prompts(words, 50, seed=2)
    for p in ps:
        lines = p.split("\n")
        assert len(lines) == 3 and lines[-1].endswith("?")
        keys = [line.split("=")[0] for line in lines[:2]]
        assert keys[0] != keys[1] and lines[-1][:-1] in keys and set(keys) <= set(words)
    # the training groups are the prompts plus their answers
    for g in lookup_groups(words, 30, seed=0):
        q = g[: g.rindex("?") + 1]
        assert score_lookup(q, g[len(q) :])
    with pytest.raises(ValueError, match="from only 1 words"):
        lookup_groups(["abc"], 5)


@pytest.mark.parametrize("shape", ["circle", "square", "triangle"])
@pytest.mark.parametrize("position", ["left", "right", "top", "bottom", "center"])
def test_image_scorer_accepts_the_drawn_picture(shape, position):
    for colour in COLORS:
        caption = f"a {colour} {shape} {'in the' if position == 'center' else 'on the'} {position}"
        s = score_image(draw_shape(shape, colour, position), caption)
        assert s["correct"], (caption, s)


def test_image_scorer_rejects_wrong_pictures():
    cap = "a red circle on the left"
    wrong_colour = score_image(draw_shape("circle", "blue", "left"), cap)
    assert wrong_colour["position_ok"] and not wrong_colour["color_ok"]
    wrong_place = score_image(draw_shape("circle", "red", "right"), cap)
    assert wrong_place["color_ok"] and not wrong_place["position_ok"]
    assert not wrong_colour["correct"] and not wrong_place["correct"]
    empty = np.empty((32, 32, 3), np.uint8)
    empty[:] = BACKGROUND
    assert not score_image(empty, cap)["correct"]
    noise = np.random.default_rng(0).integers(0, 256, (32, 32, 3)).astype(np.uint8)
    assert not score_image(noise, cap)["correct"]
    with pytest.raises(ValueError, match="not a demo caption"):
        parse_caption("a picture of a cat")


def test_dtw_distance():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(20, 5))
    assert dtw_distance(a, a) == 0.0
    stretched = np.repeat(a, 2, axis=0)  # the same sound, twice as slow
    assert dtw_distance(a, stretched) == 0.0
    b = a + 1.0  # every bin 1 dB off: RMS 1 on the diagonal path
    assert dtw_distance(a, b) == pytest.approx(1.0)


@pytest.fixture(scope="module")
def codec():
    from megadiff.data.tokenizers.audio import SpectralRVQ, resample
    from megadiff.demo.synth import Espeak

    e = Espeak()
    phrases = [f"a {c} {s} on the left" for c in COLORS for s in ("circle", "square")]
    wavs = [resample(e.say(p), e.sample_rate, 16000) for p in phrases]
    return SpectralRVQ(16000, 1024, 640, 64, 2).fit(wavs, iters=5, seed=0)


def test_speech_scorer_good_and_bad(codec):
    from megadiff.data.tokenizers.audio import resample
    from megadiff.demo.synth import Espeak

    e = Espeak()  # one instance: espeak-ng's synth callback is process-global
    scorer = SpeechScorer(codec, e.say, e.sample_rate)
    texts = ["a red circle on the left", "a blue square in the center", "a white triangle"]
    ref = scorer.reference(texts[0])
    assert np.array_equal(scorer.distance(np.zeros((0, 2), np.int64), texts[0]), np.inf)
    # known good: the reference's own codes (0 dB), and a fresh rendering of the same transcript
    # (espeak-ng's output varies slightly from call to call)
    codes = codec.encode(resample(e.say(texts[0]), e.sample_rate, 16000))
    fresh = scorer.score(codes, texts[0], texts)
    assert fresh["correct"] and fresh["nearest"] == texts[0]
    assert codes_spectrogram(codec, codes).shape[1] == ref.shape[1] == 513
    # known bad: another transcript's rendering, silence, random codes
    other = codec.encode(resample(e.say(texts[1]), e.sample_rate, 16000))
    bad = scorer.score(other, texts[0], texts)
    assert not bad["correct"] and bad["nearest"] == texts[1]
    assert bad["lsd"] > 2 * fresh["lsd"]
    silence = codec.encode(np.zeros(16000, np.float32))
    assert scorer.distance(silence, texts[0]) > 2 * fresh["lsd"]
    rand = np.random.default_rng(0).integers(0, 64, (40, 2))
    assert scorer.distance(rand, texts[0]) > 2 * fresh["lsd"]


def test_speech_scorer_renders_references_in_the_order_given(codec):
    """References are rendered transcript first, then the candidates in their order (a set's
    order would change with the hash seed, and espeak-ng's renderings with the order)."""
    said = []

    def say(text):
        said.append(text)
        return np.sin(np.arange(8000) * (0.05 + 0.01 * len(said))).astype(np.float32)

    scorer = SpeechScorer(codec, say, 16000)
    texts = [f"a {c} circle" for c in COLORS]
    scorer.score(np.zeros((20, 2), np.int64), texts[3], texts)
    assert said == [texts[3]] + texts[:3] + texts[4:]
