"""``megadiff demo`` end to end as a user runs it, at a reduced budget: the data build, training,
the self-score and the sample files. The full budget's scores are a benchmark
(docs/benchmarks.md), not a timed test; here each score must clear chance by a wide margin."""

from __future__ import annotations

import json
import subprocess
import sys
import wave

import numpy as np
import pytest

from megadiff.demo.evaluate import CHANCE

STEPS = 800  # of the default 1400: pictures and speech well above chance, the sums rising
MARGIN = {"t2i": 10, "t2s": 10, "text": 2}  # times chance


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo_run")
    run = root / "run"
    cmd = [
        *(sys.executable, "-m", "megadiff", "demo", "--data-dir", str(root / "data")),
        *(f"run.dir={run}", f"train.steps={STEPS}", "eval.every=0"),
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    return run, out.stdout


def test_demo_scores_itself_well_above_chance(demo_run):
    run, stdout = demo_run
    scores = json.loads((run / "samples" / "scores.json").read_text())
    assert "demo scores" in stdout and "t2i colour+position" in stdout
    for task, times in MARGIN.items():
        assert scores[task] >= times * CHANCE[task], (task, scores)


def test_demo_writes_a_contact_sheet_and_speech(demo_run):
    import matplotlib.image

    run, _ = demo_run
    sheet = matplotlib.image.imread(run / "samples" / "contact_sheet.png")
    assert sheet.shape[0] > 400 and sheet.shape[1] > 600
    assert np.unique(sheet[..., :3].reshape(-1, 3), axis=0).shape[0] > 20  # pictures, not blank
    wavs = sorted((run / "samples").glob("t2s_*.wav"))
    assert len(wavs) == 4
    with wave.open(str(wavs[0])) as w:
        audio = np.frombuffer(w.readframes(w.getnframes()), np.int16)
    assert w.getframerate() == 16000 and audio.size > 8000 and audio.std() > 100
    answers = (run / "samples" / "text.txt").read_text().splitlines()
    assert len(answers) == 100 and answers[0].startswith("0+0=")
