"""Scorers: known-good and known-bad inputs for arithmetic, text->image and text->speech."""

from __future__ import annotations

import numpy as np
import pytest

from megadiff.data.synth import (
    BACKGROUND,
    COLORS,
    draw_shape,
    lookup_facts,
    lookup_lines,
)
from megadiff.generation.scoring import (
    SpeechScorer,
    arithmetic_answer,
    arithmetic_prompts,
    codes_spectrogram,
    dtw_distance,
    lookup_prompts,
    parse_caption,
    score_arithmetic,
    score_image,
    score_lookup,
)


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


def test_lookup_scorer_and_table():
    words = [f"w{chr(97 + i)}{chr(97 + j)}" for i in range(26) for j in range(26)]
    facts = lookup_facts(words, 200, seed=0)
    assert facts == lookup_facts(words, 200, seed=0) and len(facts) == 200
    assert facts != lookup_facts(words, 200, seed=1)
    assert set(facts) <= set(words)
    assert all(len(c) == 6 and c.isdigit() for c in facts.values())
    assert len(set(facts.values())) > 190  # codes are (almost all) distinct
    with pytest.raises(ValueError, match="from only 3 words"):
        lookup_facts(["abc", "def", "ghi"], 5)
    key, code = next(iter(facts.items()))
    other = next(c for c in facts.values() if c != code)
    assert score_lookup(f"{key}=", code, facts)
    assert score_lookup(f"{key}=", code + "\nkasobe=1", facts)
    assert not score_lookup(f"{key}=", other, facts)
    assert not score_lookup(f"{key}=", code[:5], facts)
    assert not score_lookup(f"{key}=", code + "7", facts)  # a longer number is wrong
    assert not score_lookup(f"{key}=", " " + code, facts)
    with pytest.raises(ValueError, match="not a key"):
        score_lookup("zzzzzz=", code, facts)
    with pytest.raises(ValueError, match="not a lookup prompt"):
        score_lookup("12+7=", code, facts)
    ps = lookup_prompts(facts, 50, seed=1)
    assert ps == lookup_prompts(facts, 50, seed=1) and all(p[:-1] in facts for p in ps)
    # the training lines use the same table and format
    lines = lookup_lines(facts, 100, seed=0)
    assert all(score_lookup(line.split("=")[0] + "=", line.split("=")[1], facts) for line in lines)


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
    from megadiff.data.audio_tokenizer import SpectralRVQ, resample
    from megadiff.data.synth import Espeak

    e = Espeak()
    phrases = [f"a {c} {s} on the left" for c in COLORS for s in ("circle", "square")]
    wavs = [resample(e.say(p), e.sample_rate, 16000) for p in phrases]
    return SpectralRVQ(16000, 1024, 640, 64, 2).fit(wavs, iters=5, seed=0)


def test_speech_scorer_good_and_bad(codec):
    from megadiff.data.audio_tokenizer import resample
    from megadiff.data.synth import Espeak

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
