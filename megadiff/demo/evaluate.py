"""The demo's self-score: its three verifiable tasks sampled with the package's default sampler
settings (what ``megadiff generate`` does with no flags) and scored with
:mod:`megadiff.demo.scoring`; plus the sample files a person looks at.

* **t2i**: every one of the 90 demo captions; colour and position right (chance 1/30);
* **t2s**: ``n_t2s`` demo phrases spoken; retrieval@1 of the DTW scorer among all 90 phrases
  (chance 1/90);
* **text**: every single-digit sum ``a+b=`` (100 prompts); the generated answer (two digits,
  ``08``, as the demo data writes it) is right (chance ~1/19: the sums range over 0..18).

Called at the end of ``megadiff demo``; usable on any demo checkpoint::

    from megadiff.demo.evaluate import score_checkpoint
    score_checkpoint("runs/demo").line()
"""

from __future__ import annotations

import itertools
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from megadiff.demo.scoring import SpeechScorer, score_arithmetic, score_image
from megadiff.demo.shapes import COLORS, POSITIONS, SHAPES, caption
from megadiff.demo.synth import SUMS_EOS_FILL

CHANCE = {"t2i": 1 / 30, "t2s": 1 / 90, "text": 1 / 19}
# the sum rows as trained: two answer digits and the <eot> fill (SUMS_EOS_FILL) before PAD.
# The model reads where a row ends, so a shorter buffer ends where a trained row still holds
# <eot> and draws <eot> into the answer (`2+2=0`): the buffer is the trained row.
TEXT_GEN_LENGTH = 2 + SUMS_EOS_FILL


def all_captions() -> list[str]:
    """The 90 demo captions (every colour x shape x position), in a fixed order."""
    return [caption(c, s, p) for c, s, p in itertools.product(COLORS, SHAPES, POSITIONS)]


def digit_sum_prompts() -> list[str]:
    """The 100 single-digit sum prompts ``a+b=`` of the demo's text task."""
    return [f"{a}+{b}=" for a in range(10) for b in range(10)]


def t2s_phrases(n: int) -> list[str]:
    """``n`` demo phrases spread over colours, shapes and positions (every 90/n-th caption)."""
    caps = all_captions()
    idx = np.linspace(0, len(caps) - 1, min(n, len(caps))).round().astype(int)
    return [caps[i] for i in idx]


@dataclass
class DemoScores:
    t2i: float
    t2s: float
    text: float
    seconds: float
    sample_rate: int = 16000  # of the t2s waves
    records: dict[str, list[dict]] = field(default_factory=dict, repr=False)

    def line(self) -> str:
        """``t2i colour+position 0.86 · t2s retrieval 0.61 · text 0.92``."""
        return (
            f"t2i colour+position {self.t2i:.2f} · t2s retrieval {self.t2s:.2f} · "
            f"text (single-digit sums) {self.text:.2f}"
        )

    def as_dict(self) -> dict:
        return {"t2i": self.t2i, "t2s": self.t2s, "text": self.text, "seconds": self.seconds}


def score_bundle(bundle, n_t2s: int = 30, batch_size: int = 32) -> DemoScores:
    """Sample and score the three demo tasks on a loaded checkpoint (sample i uses seed i, as
    ``megadiff generate`` does)."""
    from megadiff.generation.api import generate
    from megadiff.generation.settings import sampler_config

    t0 = time.perf_counter()

    def run(task: str, prompts: list[str], **kw) -> list[dict]:
        seeds = list(range(len(prompts)))
        return generate(bundle, task, prompts, sampler_config(task), seeds, batch_size, **kw)

    img = run("t2i", all_captions())
    t2i = np.mean([score_image(r["image"], r["prompt"])["correct"] for r in img])
    aud = run("t2s", t2s_phrases(n_t2s))
    scorer = SpeechScorer(bundle.tokenizers["audio"])
    cands = all_captions()
    t2s = np.mean([scorer.score(r["codes"], r["prompt"], cands)["correct"] for r in aud])
    txt = run("text", digit_sum_prompts(), gen_length=TEXT_GEN_LENGTH)
    text = np.mean([score_arithmetic(r["prompt"], r["text"]) for r in txt])
    return DemoScores(
        float(t2i),
        float(t2s),
        float(text),
        time.perf_counter() - t0,
        bundle.tokenizers["audio"].sample_rate,
        {"t2i": img, "t2s": aud, "text": txt},
    )


def score_checkpoint(path: str | Path, n_t2s: int = 30) -> DemoScores:
    """:func:`score_bundle` of a checkpoint (a run dir, its ``checkpoints/`` or ``step_N/``)."""
    from megadiff.generation.load import load_for_generation

    return score_bundle(load_for_generation(path), n_t2s)


def write_samples(scores: DemoScores, out: str | Path, n_wavs: int = 4) -> list[Path]:
    """``out/contact_sheet.png`` (every t2i sample under its caption, a red frame where the
    scorer says wrong), ``out/t2s_NN.wav`` (the first ``n_wavs`` spoken phrases) and
    ``out/text.txt`` (the sums and answers), ``out/scores.json``. Returns the written paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from megadiff.data.tokenizers.audio import write_wav

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    imgs = scores.records["t2i"]
    cols = 10
    rows = -(-len(imgs) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 1.3, rows * 1.45), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, r in zip(axes.flat, imgs):
        ok = score_image(r["image"], r["prompt"])["correct"]
        ax.imshow(r["image"], interpolation="nearest")
        words = r["prompt"].split()
        ax.set_title(f"{words[1]} {words[2]}\n{words[-1]}", fontsize=7, color="k" if ok else "r")
    fig.suptitle(f"megadiff demo t2i: {scores.line()}", fontsize=9)
    fig.tight_layout()
    sheet = out / "contact_sheet.png"
    fig.savefig(sheet, dpi=80)
    plt.close(fig)
    written = [sheet]
    for i, r in enumerate(scores.records["t2s"][:n_wavs]):
        path = out / f"t2s_{i:02d}_{r['prompt'].replace(' ', '_')}.wav"
        write_wav(path, r["wav"], scores.sample_rate)
        written.append(path)
    lines = [f"{r['prompt']}{r['text']!r}" for r in scores.records["text"]]
    (out / "text.txt").write_text("\n".join(lines) + "\n")
    (out / "scores.json").write_text(json.dumps(scores.as_dict(), indent=1) + "\n")
    written += [out / "text.txt", out / "scores.json"]
    return written
