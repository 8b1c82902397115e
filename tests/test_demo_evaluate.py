"""The demo's self-score routine (:mod:`megadiff.demo.evaluate`): its prompt sets cover the demo
world, its scorers give ground truth full marks and mismatched truth about chance, and the
sample files it writes (contact sheet PNG, WAVs, answers) are real files."""

from __future__ import annotations

import json

import numpy as np
from PIL import Image

from megadiff.demo.evaluate import (
    CHANCE,
    DemoScores,
    all_captions,
    digit_sum_prompts,
    t2s_phrases,
    write_samples,
)
from megadiff.demo.scoring import parse_caption, score_arithmetic, score_image
from megadiff.demo.shapes import COLORS, POSITIONS, SHAPES
from megadiff.demo.synth import draw_shape


def test_prompt_sets_cover_the_demo_world():
    caps = all_captions()
    assert len(set(caps)) == 90 == len(COLORS) * len(SHAPES) * len(POSITIONS)
    assert {parse_caption(c) for c in caps} == {
        (c, s, p) for c in COLORS for s in SHAPES for p in POSITIONS
    }
    sums = digit_sum_prompts()
    assert len(set(sums)) == 100 and all(len(p) == 4 and p.endswith("=") for p in sums)
    phrases = t2s_phrases(30)
    assert len(set(phrases)) == 30 and set(phrases) <= set(caps)
    assert {parse_caption(p)[0] for p in phrases} == set(COLORS)  # spread, not one colour


def test_scorers_give_truth_full_marks_and_shuffled_truth_about_chance():
    caps = all_captions()
    drawn = [draw_shape(*[parse_caption(c)[i] for i in (1, 0, 2)]) for c in caps]
    assert all(score_image(img, c)["correct"] for img, c in zip(drawn, caps))
    shuffled = np.random.default_rng(0).permutation(len(caps))
    wrong = np.mean([score_image(drawn[j], c)["correct"] for j, c in zip(shuffled, caps)])
    assert wrong < 5 * CHANCE["t2i"]
    truth = [str(int(p[0]) + int(p[2])) + "\n" for p in digit_sum_prompts()]
    assert all(score_arithmetic(p, t) for p, t in zip(digit_sum_prompts(), truth))
    assert not score_arithmetic("3+5=", "81")  # a longer number is wrong


def test_write_samples_contact_sheet_wavs_and_answers(tmp_path):
    caps = all_captions()
    img = [
        {"prompt": c, "image": draw_shape(*[parse_caption(c)[i] for i in (1, 0, 2)])} for c in caps
    ]
    wave = (0.1 * np.sin(np.arange(8000) / 5)).astype(np.float32)
    aud = [{"prompt": p, "wav": wave} for p in t2s_phrases(6)]
    txt = [{"prompt": p, "text": "8\n"} for p in digit_sum_prompts()]
    scores = DemoScores(1.0, 0.5, 0.1, 1.0, 16000, {"t2i": img, "t2s": aud, "text": txt})
    files = write_samples(scores, tmp_path / "samples")
    with Image.open(files[0]) as sheet:
        assert sheet.format == "PNG" and min(sheet.size) > 600
        px = np.asarray(sheet.convert("RGB")).reshape(-1, 3).astype(int)
    red = np.abs(px - np.array(COLORS["red"])).sum(1) < 60  # the red shapes are on it
    assert red.sum() > 100
    wavs = sorted((tmp_path / "samples").glob("t2s_*.wav"))
    assert len(wavs) == 4 and all(w.stat().st_size > 8000 for w in wavs)
    lines = (tmp_path / "samples" / "text.txt").read_text().splitlines()
    assert lines[0] == "0+0='8\\n'" and len(lines) == 100
    assert json.loads((tmp_path / "samples" / "scores.json").read_text())["t2s"] == 0.5
    assert scores.line().startswith("t2i colour+position 1.00 · t2s retrieval 0.50 · text")
