"""``megadiff policy eval`` (the real command) on a tiny checkpoint trained by ``megadiff train``
on EOS-filled single sums: the heuristics' table and JSON, NFE of the fixed-step settings, and
bad input -> named error, exit 2."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

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
        "confidence steps=1",
        "margin steps=8",
        "threshold tau=0.5",
        "threshold tau=0.9",
        "entropy gamma=0.1",
    ]
    nfe = {p["label"]: p["nfe"] for p in out["points"]}
    # fixed steps in full diffusion: exactly that many forward passes per sample
    assert nfe["confidence steps=8"] == 8 and nfe["confidence steps=2"] == 2
    assert nfe["confidence steps=1"] == 1
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


def in_process(*args: str, monkeypatch, cwd) -> int:
    """``megadiff ARGS`` in this process (the parser and ``run`` of the real command)."""
    from megadiff.cli import main

    monkeypatch.chdir(cwd)
    monkeypatch.syspath_prepend(str(cwd))  # as `python -m megadiff` run there would
    monkeypatch.setattr(sys, "argv", list(sys.argv))  # main() rewrites it
    return main(list(args))


@pytest.mark.parametrize(
    "extra,match",
    [
        (["--task", "sums", "--block-length", "9"], "--block-length 9 is longer than"),
        (["--task", "sums", "--taus", "0.5,1.5"], r"--taus must be values in \(0, 1\]"),
        (["--task", "sums", "--gen-length", "40"], "more than the checkpoint's context 16"),
        (["--task", "no_such_verifier_mod:f"], "'no_such_verifier_mod:f' does not import"),
        (["--task", "arithmetic"], "not a built-in task"),
        (["--task", "bad.jsonl"], r"bad.jsonl:2: no 'answer'"),
        (["--task", "accents.jsonl"], "cannot express 'é'"),
        (["--task", "sums", "--ckpt", "no_such_run"], "no_such_run"),
    ],
)
def test_bad_input_exit_2(ckpt, tmp_path, monkeypatch, capsys, extra, match):
    (tmp_path / "bad.jsonl").write_text('{"prompt": "1+1=", "answer": "2"}\n{"prompt": "x"}\n')
    rows = [{"prompt": f"{a}+{b}=", "answer": "é"} for a in range(5) for b in range(5)]
    (tmp_path / "accents.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = ["policy", "eval", "--ckpt", ckpt, "--n", "2", "--gen-length", "8", *extra]
    assert in_process(*args, monkeypatch=monkeypatch, cwd=tmp_path) == 2
    err = capsys.readouterr().err
    assert "megadiff policy eval: error:" in err
    assert re.search(match, err), err


def test_verifier_from_current_directory(ckpt, tmp_path, monkeypatch, capsys):
    (tmp_path / "my_check.py").write_text("def always(prompt, completion):\n    return 1.0\n")
    code = in_process(
        "policy", "eval", "--ckpt", ckpt, "--task", "my_check:always", "--prompts", "sums",
        "--n", "3", "--gen-length", "4", "--taus", "0.9", "--gammas", "0.1", "--json",
        monkeypatch=monkeypatch, cwd=tmp_path,
    )  # fmt: skip
    assert code == 0
    assert all(p["accuracy"] == 1.0 for p in json.loads(capsys.readouterr().out)["points"])


def test_policy_point_beside_the_heuristics(ckpt, tmp_path, monkeypatch, capsys):
    """``--policy``: an (untrained) policy folder is run at the same settings as the
    heuristics; it commits at least one token per step, so 1 <= NFE <= gen length. A folder
    that is not a policy is a named error, exit 2."""
    from megadiff.policy.network import UnmaskingPolicy, save_policy

    save_policy(UnmaskingPolicy(), tmp_path / "pol")
    args = ["policy", "eval", "--ckpt", ckpt, "--task", "sums", "--n", "3", "--gen-length", "6"]
    few = ["--taus", "0.9", "--gammas", "0.1", "--json"]
    code = in_process(*args, *few, "--policy", str(tmp_path / "pol"), monkeypatch=monkeypatch,
                      cwd=tmp_path)  # fmt: skip
    assert code == 0
    points = json.loads(capsys.readouterr().out)["points"]
    (pol,) = [p for p in points if p["strategy"] == "policy"]
    assert pol["label"] == f"policy {tmp_path / 'pol'}" and 1 <= pol["nfe"] <= 6
    assert pol["n"] == 3 and len(points) == 7
    (tmp_path / "empty").mkdir()
    code = in_process(*args, *few, "--policy", str(tmp_path / "empty"), monkeypatch=monkeypatch,
                      cwd=tmp_path)  # fmt: skip
    assert code == 2 and "megadiff policy eval: error:" in capsys.readouterr().err


def test_eval_sampling_frontier(ckpt, tmp_path, monkeypatch):
    """``tools/eval_sampling.py --frontier``: one table per mode (full diffusion, blocks), the
    JSON of every point, the plot."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("eval_sampling", f"{ROOT}/tools/eval_sampling.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    from megadiff.policy.network import UnmaskingPolicy, save_policy

    for name in ("a", "b"):  # two policies (e.g. two alphas) beside the heuristics
        save_policy(UnmaskingPolicy(), tmp_path / name)
    out = tmp_path / "front"
    argv = ["eval_sampling.py", "--ckpt", ckpt, "--frontier", "sums", "--gen-length", "4",
            "--blocks", "2", "--n", "3", "--out", str(out), "--policy", str(tmp_path / "a"),
            "--policy", str(tmp_path / "b")]  # fmt: skip
    monkeypatch.setattr(sys, "argv", argv)
    assert tool.main() == 0
    modes = json.loads((out / "frontier.json").read_text())
    assert list(modes) == ["full diffusion", "blocks of 2"]
    for mode, blocks in zip(modes.values(), (1, 2)):
        nfe = {p["label"]: p["nfe"] for p in mode["points"]}
        assert nfe["confidence steps=4"] == 4
        assert nfe["confidence steps=1"] == blocks  # at least one step per block
        for name in ("a", "b"):
            assert blocks <= nfe[f"policy {tmp_path / name}"] <= 4
    assert modes["blocks of 2"]["points"][0]["block_length"] == 2
    md = (out / "frontier.md").read_text()
    assert md.count("| setting | accuracy |") == 2
    assert (out / "frontier.png").read_bytes()[:4] == b"\x89PNG"


def test_eval_sampling_cache_table_on_the_demo_sums(ckpt):
    """``tools/eval_sampling.py --caches`` on the demo's text task (``sums``: the 100
    single-digit sums in the buffer they were trained with: two digits and three ``<eot>``): a
    row per cache, NFE one per token."""
    from megadiff.demo.evaluate import TEXT_GEN_LENGTH

    tool = os.path.join(ROOT, "tools", "eval_sampling.py")
    cmd = [sys.executable, tool, "--ckpt", ckpt, "--caches", "none,prefix,dual"]
    cmd += ["--cache-block", "2", "--tasks", "sums", "--n", "6"]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=ENV, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = [line.split("|")[1:-1] for line in r.stdout.splitlines() if line.startswith("| sums")]
    assert [c[1].strip() for c in rows] == ["none", "prefix", "dual"]
    for cells in rows:
        assert cells[2].strip() == "2" and cells[3].strip() == "6"
        assert float(cells[6]) == TEXT_GEN_LENGTH == 5  # one token per step
        assert 0.0 <= float(cells[4]) <= 1.0
