"""``megadiff policy eval`` (the real command) on a tiny checkpoint trained by ``megadiff train``
on EOS-filled single sums: the heuristics' table and JSON, NFE of the fixed-step settings, and
bad input -> named error, exit 2."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from megadiff.data.preprocess import Record, write_shards
from megadiff.data.tokenizers.text import train_bpe
from megadiff.demo.synth import digit_sums

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}


def megadiff(*args: str, cwd: str = ROOT) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "megadiff", *args]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=cwd, env=ENV, timeout=300)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> str:
    """A 2-step run of a tiny model on a sums stream read one per row with EOS fill."""
    d = tmp_path_factory.mktemp("policy_eval")
    lines = digit_sums(400, seed=1)
    tok = train_bpe(lines + ["the red square and the blue circle"], 270, d / "t.tiktoken")
    recs = [Record(f"s[{i}]", text=t) for i, t in enumerate(lines)]
    write_shards("text", recs, d / "sums", tok, val_fraction=0.05)
    stream = [{"name": "sums", "path": str(d / "sums"), "pack": False, "eos_fill": True}]
    r = megadiff(
        "train",
        "model.num_layers=1",
        "model.hidden_size=32",
        "model.num_attention_heads=2",
        "model.ffn_hidden_size=64",
        "model.seq_length=16",
        "data.source=mds",
        f"data.streams={json.dumps(stream)}",
        "train.steps=2",
        "train.micro_batch=4",
        "train.global_batch=4",
        "logging.progress=false",
        "logging.tensorboard=false",
        f"run.dir={d / 'run'}",
    )
    assert r.returncode == 0, r.stderr[-3000:]
    return str(d / "run")


def test_heuristics_json_and_table(ckpt):
    r = megadiff(
        "policy", "eval", "--ckpt", ckpt, "--task", "sums", "--n", "6", "--gen-length", "8",
        "--taus", "0.5,0.9", "--gammas", "0.1", "--json",
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout)
    assert out["task"] == "sums" and out["n"] == 6 and out["block_length"] is None
    labels = [p["label"] for p in out["points"]]
    assert labels == [
        "confidence steps=8",
        "confidence steps=4",
        "confidence steps=2",
        "margin steps=8",
        "threshold tau=0.5",
        "threshold tau=0.9",
        "entropy gamma=0.1",
    ]
    nfe = {p["label"]: p["nfe"] for p in out["points"]}
    # fixed steps in full diffusion: exactly that many forward passes per sample
    assert nfe["confidence steps=8"] == 8 and nfe["confidence steps=2"] == 2
    assert nfe["margin steps=8"] == 8
    for p in out["points"]:
        assert p["n"] == 6 and 0 <= p["low"] <= p["accuracy"] <= p["high"] <= 1
        assert 1 <= p["nfe"] <= 8  # adaptive: at least one token per step, capped at 8
    r = megadiff(
        "policy", "eval", "--ckpt", ckpt, "--task", "sums", "--n", "4", "--gen-length", "8",
        "--block-length", "4", "--taus", "0.9", "--gammas", "0.1",
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    assert "blocks of 4" in r.stdout and "| confidence steps=8 |" in r.stdout


@pytest.mark.parametrize(
    "extra,match",
    [
        (["--task", "sums", "--block-length", "9"], "--block-length 9 is longer than"),
        (["--task", "sums", "--taus", "0.5,1.5"], r"--taus must be values in \(0, 1\]"),
        (["--task", "sums", "--gen-length", "40"], "more than the checkpoint's context 16"),
        (["--task", "no_such_verifier_mod:f"], "'no_such_verifier_mod' does not import"),
        (["--task", "arithmetic"], "not a built-in task"),
        (["--task", "bad.jsonl"], r"bad.jsonl:2: no 'answer'"),
        (["--task", "accents.jsonl"], "cannot express 'é'"),
    ],
)
def test_bad_input_exit_2(ckpt, tmp_path, extra, match):
    (tmp_path / "bad.jsonl").write_text('{"prompt": "1+1=", "answer": "2"}\n{"prompt": "x"}\n')
    rows = [{"prompt": f"{a}+{b}=", "answer": "é"} for a in range(5) for b in range(5)]
    (tmp_path / "accents.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    r = megadiff("policy", "eval", "--ckpt", ckpt, "--n", "2", *extra, cwd=str(tmp_path))
    assert r.returncode == 2, r.stderr[-2000:]
    assert "megadiff policy eval: error:" in r.stderr
    assert len(__import__("re").findall(match, r.stderr)) == 1, r.stderr


def test_missing_checkpoint_exit_2(tmp_path):
    r = megadiff("policy", "eval", "--ckpt", str(tmp_path / "nothing"), "--task", "sums")
    assert r.returncode == 2 and "megadiff policy eval: error:" in r.stderr
    assert str(tmp_path / "nothing") in r.stderr


def test_verifier_from_current_directory(ckpt, tmp_path):
    (tmp_path / "my_check.py").write_text(
        textwrap.dedent(
            """
            def always(prompt, completion):
                return 1.0
            """
        )
    )
    r = megadiff(
        "policy", "eval", "--ckpt", ckpt, "--task", "my_check:always", "--prompts", "sums",
        "--n", "3", "--gen-length", "4", "--taus", "0.9", "--gammas", "0.1", "--json",
        cwd=str(tmp_path),
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    assert all(p["accuracy"] == 1.0 for p in json.loads(r.stdout)["points"])
