"""Generation end to end on a tiny demo checkpoint: export from a TP=2 trainer, the TP logits
adapter vs the reference model, every task, ``megadiff generate`` outputs and its errors."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from megadiff.data.demo import DemoParams, build_demo_data
from megadiff.diffusion.sampling import SamplerConfig, SamplingError, sample
from megadiff.generation.cli import generate, sampler_config
from megadiff.generation.export import CheckpointError, load_for_generation
from megadiff.generation.tasks import TaskError, build_request
from megadiff.parallel.launch import run_world
from tests.sampling_workers import export_and_logits

SMALL = DemoParams(
    text_vocab=512, n_arith_docs=50, n_images=300, image_codebook=64, n_audio=40, audio_codebook=32
)
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    base = tmp_path_factory.mktemp("gen")
    demo = build_demo_data(base / "data", SMALL, log=lambda *_: None)
    streams = [
        {"name": n, "path": demo.streams[n], "proportion": 1.0} for n in ("text", "image", "audio")
    ]
    overrides = [
        "parallel.tensor_parallel=2",
        f"data.streams={json.dumps(streams)}",
        f"data.vocab={demo.vocab_path}",
    ]
    v = demo.vocab
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, v.vocab_size, (2, 24), generator=g)
    tokens[1, -4:] = v.pad_id
    tokens[:, 4:12] = v.mask_id
    args = (overrides, str(base / "run"), str(base / "ckpt"), tokens)
    out = run_world(export_and_logits, 2, args)
    return base / "ckpt", tokens, out[0]["logits"], out[1]["logits"]


def test_export_and_tp_adapter_match_reference(ckpt):
    path, tokens, tp0, tp1 = ckpt
    assert torch.equal(tp0, tp1)  # every TP rank sees the gathered logits
    b = load_for_generation(path)
    assert set(b.tokenizers) == {"text", "image", "audio"}
    ref = b.logits_fn(tokens)
    assert ref.shape == tp0.shape == (2, 24, b.vocab.vocab_size)
    keep = tokens != b.vocab.pad_id
    assert (ref - tp0).abs()[keep].max() < 1e-4
    # the same sampler run over either logits_fn gives the same tokens (greedy)
    x = tokens.clone()
    mod = torch.zeros_like(x)
    ranges = torch.from_numpy(b.vocab.ranges_array())
    c = SamplerConfig("confidence", steps=4)
    a = sample(b.logits_fn, x, mod, ranges, b.vocab.mask_id, c).tokens
    fixed = {"n": 0}

    def tp_fn(t):  # replays the TP logits for the first call only, then the reference
        fixed["n"] += 1
        return tp0 if fixed["n"] == 1 else b.logits_fn(t)

    assert torch.equal(sample(tp_fn, x, mod, ranges, b.vocab.mask_id, c).tokens[0], a[0])


@pytest.mark.parametrize("task", ["text", "t2i", "t2s", "caption", "asr"])
def test_every_task_generates_decodable_output(ckpt, task, tmp_path):
    b = load_for_generation(ckpt[0])
    if task in ("text", "t2i", "t2s"):
        prompts = ["12+7=", "a red circle on the left"] if task == "text" else ["a red circle"] * 2
    elif task == "caption":
        from PIL import Image

        from megadiff.data.synth import draw_shape

        Image.fromarray(draw_shape("circle", "red", "left")).save(tmp_path / "x.png")
        prompts = [str(tmp_path / "x.png")]
    else:
        from megadiff.data.audio_tokenizer import write_wav
        from megadiff.data.synth import formant_say

        write_wav(tmp_path / "x.wav", formant_say("a red circle"), 16000)
        prompts = [str(tmp_path / "x.wav")]
    c = sampler_config(task, None, {task: {"steps": 4, "cfg_scale": 0.5}})
    recs = generate(b, task, prompts, c, list(range(len(prompts))), gen_length=6)
    for r in recs:
        assert r["nfe"] == 8  # 4 steps x 2 (CFG)
        if task == "t2i":
            assert r["image"].shape == (32, 32, 3) and r["image"].dtype == np.uint8
        elif task == "t2s":
            assert r["wav"].ndim == 1 and len(r["wav"]) > 0
            assert r["codes"].shape == (r["audio_frames"], 2) and r["codes"].max() < 32
        else:
            assert isinstance(r["text"], str)


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "megadiff.generation.cli", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )


def test_cli_writes_samples(ckpt, tmp_path):
    out = tmp_path / "out"
    r = _cli(
        "--ckpt", str(ckpt[0]), "--task", "t2i", "--prompt", "a blue square on the top",
        "--prompt", "a red circle in the center", "--num-samples", "2", "--strategy", "threshold",
        "--threshold", "0.5", "--steps", "6", "--cfg", "1.0", "--out", str(out), "--no-progress",
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    rows = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert len(rows) == 4 and all((out / row["file"]).is_file() for row in rows)
    assert rows[0]["settings"]["strategy"] == "threshold" and rows[0]["settings"]["cfg_scale"] == 1
    assert all(2 <= row["nfe"] <= 12 and row["seconds"] > 0 for row in rows)
    assert rows[0]["seed"] == 0 and rows[3]["seed"] == 3


def test_errors(ckpt, tmp_path):
    b = load_for_generation(ckpt[0])
    with pytest.raises(TaskError, match="unknown task"):
        sampler_config("poem")
    with pytest.raises(TaskError, match="unknown task"):
        build_request("poem", "x", b.vocab, b.tokenizers, 160)
    with pytest.raises(SamplingError, match="unknown strategy"):
        sampler_config("text", None, {"text": {"strategy": "best"}})
    with pytest.raises(SamplingError, match="threshold must be in"):
        sampler_config("text", None, {"text": {"threshold": 1.2}})
    with pytest.raises(SamplingError, match="steps must be >= 1"):
        sampler_config("t2i", None, {"t2i": {"steps": 0}})
    with pytest.raises(TaskError, match="longer than the model's context 160"):
        generate(b, "text", ["1+1=2 " * 100], sampler_config("text"), [0])
    # a checkpoint without the image tokenizer cannot do t2i (but still does t2s)
    bad = tmp_path / "noimg"
    shutil.copytree(ckpt[0], bad)
    (bad / "tokenizers" / "image.vq").unlink()
    cfg = yaml.safe_load((bad / "config.yaml").read_text())
    cfg["data"]["vocab"] = str(tmp_path / "elsewhere" / "vocab.json")
    (bad / "config.yaml").write_text(yaml.safe_dump(cfg))
    nb = load_for_generation(bad)
    with pytest.raises(CheckpointError, match="no image tokenizer, needed by task 't2i'"):
        generate(nb, "t2i", ["a red circle"], sampler_config("t2i"), [0])
    nb.require("t2s")
    with pytest.raises(CheckpointError, match="does not exist"):
        load_for_generation(tmp_path / "nothing")
    r = _cli("--ckpt", str(bad), "--task", "t2i", "--prompt", "x", "--out", str(tmp_path / "o"))
    assert r.returncode == 2 and "no image tokenizer" in r.stderr
