"""A newcomer's path on the synthetic data: ``examples/tiny_cpu.yaml`` leaves a checkpoint with a
vocabulary layout and a byte-level text tokenizer that ``megadiff generate`` samples from, and
that ``megadiff convert to-hf`` exports with a ``transformers`` tokenizer (readable files)."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def megadiff(*args: str, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "megadiff", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=env,
        timeout=300,
    )


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """``megadiff train examples/tiny_cpu.yaml`` for 2 steps (synthetic data, default vocab)."""
    base = tmp_path_factory.mktemp("synthetic")
    r = megadiff(
        "train", str(ROOT / "examples" / "tiny_cpu.yaml"), "train.steps=2",
        f"run.dir={base / 'run'}", "logging.progress=false", cwd=base,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    return base / "run"


def test_checkpoint_has_layout_and_byte_tokenizer(run):
    (ckpt,) = (run / "checkpoints").glob("step_*")
    layout = json.loads((ckpt / "vocab.json").read_text())
    assert layout["vocab_size"] == 512 and layout["text_size"] == 256
    assert layout["mask_id"] == 256 + 7  # after the byte ids and <bot> <eot> + 5 task tokens
    ranks = (ckpt / "tokenizers" / "text.tiktoken").read_text().split()
    assert len(ranks) == 2 * 256 and ranks[:2] == ["AA==", "0"]  # base64 of byte 0, rank 0


def generate(capsys, *args: str) -> tuple[int, str]:
    """``megadiff generate ARGS`` in this process: (exit code, stderr)."""
    from megadiff.cli import main

    argv = sys.argv
    try:
        code = main(["generate", *args, "--no-progress"])
    finally:
        sys.argv = argv
    return code, capsys.readouterr().err


def test_generate_text_and_the_identical_samples_warning(run, tmp_path, capsys):
    out = tmp_path / "s"
    args = ["--ckpt", str(run), "--task", "text", "--prompt", "ab", "--gen-length", "4"]
    code, err = generate(capsys, *args, "--num-samples", "2", "--out", str(out))
    assert code == 0, err
    rows = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and rows[0]["text"] == rows[1]["text"]  # greedy: identical
    assert "identical" in err and "--temperature" in err
    code, err = generate(
        capsys, *args, "--num-samples", "2", "--temperature", "1", "--out", str(tmp_path)
    )
    assert code == 0 and "identical" not in err, err
    code, err = generate(capsys, "--ckpt", str(run), "--task", "t2i", "--prompt", "x")
    assert code == 2 and "synthetic" in err and "image tokenizer" in err


def test_hf_export_has_a_transformers_tokenizer_and_readable_files(run, tmp_path):
    """Exported under umask 027: files 0640, folders 0750 (not safetensors' 0600); then a fresh
    offline process loads the tokenizer and model with ``trust_remote_code`` and round-trips
    text through them; ``from-hf`` names no temporary folder."""
    from megadiff.export.to_hf import to_hf

    out = tmp_path / "hf"
    old = os.umask(0o027)
    try:
        to_hf(run, out)
    finally:
        os.umask(old)
    modes = {p.relative_to(out).as_posix(): stat.S_IMODE(p.stat().st_mode) for p in out.rglob("*")}
    assert modes["model.safetensors"] == 0o640 and modes["tokenizers"] == 0o750
    assert set(modes.values()) == {0o640, 0o750}
    assert stat.S_IMODE(out.stat().st_mode) == 0o750

    code = (
        "import json, sys, torch\n"
        "from transformers import AutoModel, AutoTokenizer\n"
        "tok = AutoTokenizer.from_pretrained(sys.argv[1], trust_remote_code=True)\n"
        "model = AutoModel.from_pretrained(sys.argv[1], trust_remote_code=True)\n"
        "ids = tok('héllo <mask>', return_tensors='pt').input_ids\n"
        "plain = tok('<mask>', split_special_tokens=True).input_ids\n"
        "x = torch.cat([ids, torch.full((1, 4), tok.mask_token_id)], 1)\n"
        "y = model.generate(x, steps=2, modality='text')\n"
        "print(json.dumps({'ids': ids[0].tolist(), 'mask': tok.mask_token_id,\n"
        "    'pad': tok.pad_token_id, 'back': tok.decode(ids[0]), 'y': y[0].tolist(),\n"
        "    'plain': plain,\n"
        "    'eot': tok.convert_tokens_to_ids('<eot>'), 'gen': tok.decode(y[0])}))\n"
    )
    env = {**os.environ, "PYTHONPATH": "", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    env["HF_HOME"] = str(tmp_path / "hf_home")
    r = subprocess.run(
        [sys.executable, "-c", code, str(out)],
        capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    got = json.loads(r.stdout.strip().splitlines()[-1])
    layout = json.loads((out / "vocab.json").read_text())
    assert (got["mask"], got["pad"]) == (layout["mask_id"], layout["pad_id"])
    assert got["ids"] == [*"héllo ".encode(), layout["mask_id"]]  # byte ids, then the special
    assert got["plain"] == list(b"<mask>") and got["back"] == "héllo <mask>"
    assert got["eot"] == layout["specials"]["<eot>"]
    # every MASK (the one in the prompt too) filled from the text range; the rest kept
    assert got["y"][:7] == got["ids"][:7] and len(got["y"]) == len(got["ids"]) + 4
    assert all(0 <= i < layout["mask_id"] for i in got["y"]) and got["gen"].startswith("héllo ")

    r = megadiff("convert", "from-hf", "--hf", str(out), "--out", str(tmp_path / "back"),
                 cwd=tmp_path)  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    assert "partial" not in r.stdout + r.stderr and str(tmp_path / "back") in r.stdout
    assert (tmp_path / "back" / "tokenizers" / "text.tiktoken").is_file()
