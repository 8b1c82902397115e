"""Generation end to end on a tiny demo run: its distributed checkpoint (saved at TP=2) loaded
into the reference model, the TP logits adapter, every task, ``megadiff generate`` outputs and
its errors, and ``megadiff demo`` leaving a checkpoint and the command to try next."""

from __future__ import annotations

import json
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from megadiff.checkpoint_files import MANIFEST, write_manifest
from megadiff.demo.data import DemoParams, build_demo_data
from megadiff.diffusion.sampling import SamplerConfig, SamplingError, sample
from megadiff.generation.api import generate
from megadiff.generation.load import CheckpointError, load_for_generation
from megadiff.generation.settings import sampler_config, task_settings
from megadiff.generation.tasks import TaskError, build_request
from megadiff.parallel.launch import run_world
from tests.sampling_workers import TINY_DEMO, train_and_logits
from tests.test_checkpoint import cli_world

SMALL = DemoParams(
    text_vocab=512, n_arith_docs=50, n_images=300, image_codebook=64, n_audio=40, audio_codebook=32
)
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """(run dir, tokens, TP rank 0 logits, TP rank 1 logits, rank 0 output incl. the logits of
    some positions and columns) of a one-step TP=2 run."""
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
    out = run_world(train_and_logits, 2, (overrides, str(base / "run"), tokens))
    return base / "run", tokens, out[0]["logits"], out[1]["logits"], out[0]


def test_checkpoint_and_tp_adapter_match_reference(ckpt):
    run, tokens, tp0, tp1, rank0 = ckpt
    assert torch.equal(tp0, tp1)  # every TP rank sees the gathered logits
    from megadiff.parallel import cpu_compat

    compat = cpu_compat.is_enabled()
    b = load_for_generation(run)  # a run dir
    assert cpu_compat.is_enabled() == compat  # the CPU compat mode is left as it was
    assert set(b.tokenizers) == {"text", "image", "audio"} and b.step == 1
    assert Path(b.path) == run / "checkpoints" / "step_00000001"
    for p in (run / "checkpoints", run / "checkpoints" / "step_00000001"):
        assert load_for_generation(p).path == b.path
    ref = b.logits_fn(tokens)
    assert ref.shape == tp0.shape == (2, 24, b.vocab.vocab_size)
    keep = tokens != b.vocab.pad_id
    assert (ref - tp0).abs()[keep].max() < 1e-4
    # only some positions and columns: the same logits, left out of the output layer's work
    at = torch.tensor([[5, 0, 23], [11, 11, 2]])
    part = b.logits_fn(tokens, positions=at, columns=(7, 300))
    assert part.shape == (2, 3, 293)
    rows = ref.gather(1, at[..., None].expand(-1, -1, ref.shape[-1]))
    torch.testing.assert_close(part, rows[..., 7:300])
    assert torch.equal(rank0["at"], at)  # the TP adapter, asked the same: the same logits
    torch.testing.assert_close(rank0["part"], rows[..., 7:300], atol=1e-4, rtol=0)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        b.logits_fn(tokens, positions=at, columns=(0, b.vocab.vocab_size + 1))
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

        from megadiff.demo.synth import draw_shape

        Image.fromarray(draw_shape("circle", "red", "left")).save(tmp_path / "x.png")
        prompts = [str(tmp_path / "x.png")]
    else:
        from megadiff.data.tokenizers.audio import write_wav
        from megadiff.demo.synth import formant_say

        write_wav(tmp_path / "x.wav", formant_say("a red circle"), 16000)
        prompts = [str(tmp_path / "x.wav")]
    c = sampler_config(task, None, {task: {"strategy": "confidence", "steps": 4, "cfg_scale": 0.5}})
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


def _cli(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "megadiff", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=300,
    )


def _cli_here(capsys, *args: str) -> subprocess.CompletedProcess:
    """``megadiff ARGS`` in this process (no interpreter start-up): exit code and output."""
    from megadiff.cli import main

    argv = sys.argv
    try:
        code = main(list(args))
    except SystemExit as e:  # argparse errors
        code = e.code
    finally:
        sys.argv = argv
    out = capsys.readouterr()
    return subprocess.CompletedProcess(args, code, out.out, out.err)


def test_cli_writes_samples(ckpt, tmp_path):
    out = tmp_path / "out"
    r = _cli(
        "generate", "--ckpt", str(ckpt[0] / "checkpoints"), "--task", "t2i",
        "--prompt", "a blue square on the top", "--prompt", "a red circle in the center",
        "--num-samples", "2", "--strategy", "threshold", "--threshold", "0.5", "--steps", "6",
        "--cfg", "1.0", "--out", str(out), "--no-progress",
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    rows = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert len(rows) == 4 and all((out / row["file"]).is_file() for row in rows)
    assert rows[0]["settings"]["strategy"] == "threshold" and rows[0]["settings"]["cfg_scale"] == 1
    assert all(2 <= row["nfe"] <= 12 and row["seconds"] > 0 for row in rows)
    assert rows[0]["seed"] == 0 and rows[3]["seed"] == 3


def test_defaults_precedence(tmp_path):
    from megadiff.generation.cli import add_arguments, flag_settings
    from megadiff.generation.settings import DEFAULTS_FILE

    shipped = json.loads(DEFAULTS_FILE.read_text())
    c = sampler_config("t2i")
    assert c.strategy == shipped["t2i"]["strategy"]
    c = sampler_config("t2i", None, {"t2i": {"strategy": "margin", "steps": 5}})
    assert (c.strategy, c.steps) == ("margin", 5)
    import argparse

    p = argparse.ArgumentParser()
    add_arguments(p)
    args = p.parse_args(["--ckpt", "x", "--task", "t2i", "--steps", "7", "--cfg", "2"])
    c = sampler_config("t2i", flag_settings(args), {"t2i": {"strategy": "margin", "steps": 5}})
    assert (c.strategy, c.steps, c.cfg_scale) == ("margin", 7, 2.0)
    args = p.parse_args(["--ckpt", "x", "--task", "text", "--block-length", "0"])
    assert sampler_config("text", None, {"text": {"block_length": 4}}).block_length == 4
    text_defaults = {"text": {"block_length": 4}}
    assert sampler_config("text", flag_settings(args), text_defaults).block_length is None
    with pytest.raises(TaskError, match="unknown setting"):
        sampler_config("t2i", None, {"t2i": {"stepz": 5}})
    with pytest.raises(TaskError, match="overrides: t2i.cfg: unknown setting"):
        sampler_config("t2i", {"cfg": 2.0})  # overrides name SamplerConfig fields


def test_four_layers_of_settings():
    """package defaults < the run's sampling section < a defaults file < overrides, for the
    sampler and the buffer lengths; a buffer length only where the task has that buffer."""
    assert task_settings("text").gen_length == 32 and task_settings("t2s").audio_frames is None
    run = {"text": {"gen_length": 5, "strategy": "confidence", "steps": 3}}
    s = task_settings("text", run=run)
    assert (s.gen_length, s.sampler.strategy, s.sampler.steps) == (5, "confidence", 3)
    assert s.sampler.block_length == 8  # not in the run's section: the package's default
    s = task_settings("text", None, {"text": {"gen_length": 6, "steps": 4}}, run)
    assert (s.gen_length, s.sampler.strategy, s.sampler.steps) == (6, "confidence", 4)
    s = task_settings("text", {"gen_length": 7}, {"text": {"gen_length": 6}}, run)
    assert s.gen_length == 7
    assert task_settings("t2s", run={"t2s": {"audio_frames": 9}}).audio_frames == 9
    assert task_settings("caption", run=run).gen_length == 32  # another task's section
    with pytest.raises(TaskError, match=r"sampling.t2i.gen_length: only for caption, asr, text"):
        task_settings("t2i", run={"t2i": {"gen_length": 4}})
    with pytest.raises(TaskError, match=r"defaults: text.audio_frames: only for t2s"):
        task_settings("text", defaults={"text": {"audio_frames": 4}})
    with pytest.raises(TaskError, match=r"sampling.text.steps: must be an integer or null"):
        task_settings("text", run={"text": {"steps": "4"}})
    with pytest.raises(TaskError, match=r"overrides: text.gen_length: must be an integer >= 1"):
        task_settings("text", {"gen_length": 0})


def _with_sampling(step: Path, dest: Path, sampling: dict) -> Path:
    """A copy of checkpoint ``step`` whose config.yaml has the ``sampling`` section."""
    import yaml

    shutil.copytree(step, dest)
    cfg = yaml.safe_load((dest / "config.yaml").read_text())
    (dest / "config.yaml").write_text(
        yaml.safe_dump({**cfg, "sampling": sampling}, sort_keys=False)
    )
    write_manifest(dest, 1)
    return dest


def test_generate_uses_the_checkpoints_sampling_section(ckpt, tmp_path, capsys):
    """``megadiff generate`` reads the sampler settings the run's config carries (said on
    stdout, recorded in samples.jsonl); flags win over them; a bad section is named (exit 2)."""
    step = ckpt[0] / "checkpoints" / "step_00000001"
    carried = {"text": {"gen_length": 3, "strategy": "confidence", "steps": 3}}
    path = _with_sampling(step, tmp_path / "ckpt", carried)
    base = ["generate", "--ckpt", str(path), "--task", "text", "--prompt", "1+2=", "--no-progress"]
    r = _cli_here(capsys, *base, "--out", str(tmp_path / "a"))
    assert r.returncode == 0, r.stderr
    assert "the checkpoint's sampling.text: gen_length=3, strategy=confidence, steps=3" in r.stdout
    (row,) = [json.loads(x) for x in (tmp_path / "a" / "samples.jsonl").read_text().splitlines()]
    assert row["gen_length"] == 3 and row["nfe"] == 3
    assert (row["settings"]["strategy"], row["settings"]["steps"]) == ("confidence", 3)
    r = _cli_here(capsys, *base, "--gen-length", "6", "--steps", "2", "--out", str(tmp_path / "b"))
    assert r.returncode == 0, r.stderr
    (row,) = [json.loads(x) for x in (tmp_path / "b" / "samples.jsonl").read_text().splitlines()]
    assert row["gen_length"] == 6 and row["settings"]["steps"] == 2 and row["nfe"] == 2
    r = _cli_here(capsys, *[a if a != str(path) else str(step) for a in base], "--out",
                  str(tmp_path / "c"))  # fmt: skip
    (row,) = [json.loads(x) for x in (tmp_path / "c" / "samples.jsonl").read_text().splitlines()]
    assert r.returncode == 0 and row["gen_length"] == 32 and "sampling.text" not in r.stdout
    bad = _with_sampling(step, tmp_path / "bad", {"text": {"gen_length": 0}})
    r = _cli_here(capsys, *[a if a != str(path) else str(bad) for a in base], "--out",
                  str(tmp_path / "d"))  # fmt: skip
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert f"checkpoint {bad}: config.yaml: sampling.text.gen_length: must be" in r.stderr


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
    with pytest.raises(SamplingError, match="threshold must be in"):
        sampler_config("text", None, {"text": {"threshold": 0.0}})
    with pytest.raises(SamplingError, match="steps must be >= 1"):
        sampler_config("t2i", None, {"t2i": {"steps": 0}})
    with pytest.raises(TaskError, match="longer than the model's context 160"):
        generate(b, "text", ["1+1=2 " * 100], sampler_config("text"), [0])
    # a checkpoint without the image tokenizer cannot do t2i (but still does t2s)
    src = Path(b.path)
    bad = tmp_path / "noimg" / src.name
    shutil.copytree(src, bad)
    (bad / "tokenizers" / "image.vq").unlink()
    write_manifest(bad, 1)
    nb = load_for_generation(bad)
    with pytest.raises(CheckpointError, match="no image tokenizer, needed by task 't2i'"):
        generate(nb, "t2i", ["a red circle"], sampler_config("t2i"), [0])
    nb.require("t2s")
    # not a checkpoint: missing, an unrelated directory, a damaged checkpoint
    with pytest.raises(CheckpointError, match="does not exist"):
        load_for_generation(tmp_path / "nothing")
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "model.pt").write_bytes(b"x")
    with pytest.raises(CheckpointError, match="not a megadiff checkpoint"):
        load_for_generation(tmp_path / "junk")
    broken = tmp_path / "broken" / src.name
    shutil.copytree(src, broken)
    (broken / "meta.json").write_text("{}")
    with pytest.raises(CheckpointError, match="not a usable checkpoint"):
        load_for_generation(broken)


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--task", "poem"], "unknown task 'poem'"),
        (["--task", "text", "--strategy", "best"], "argument --strategy: invalid choice: 'best'"),
        (["--task", "text", "--strategy", "policy"], "--strategy policy needs --policy PATH"),
        (["--task", "text", "--policy", "p"], "--policy is for --strategy policy"),
        (["--task", "text", "--threshold", "1.5"], "argument --threshold: must be in (0, 1]"),
        (["--task", "t2i", "--steps", "0"], "argument --steps: must be >= 1, got 0"),
        (["--task", "text", "--temperature", "nan"], "argument --temperature: must be a finite"),
        (["--task", "text", "--gen-length", "-5"], "argument --gen-length: must be >= 1, got -5"),
        (["--task", "t2s", "--audio-frames", "-3"], "argument --audio-frames: must be >= 1"),
        (["--task", "t2i", "--gen-length", "5"], "--gen-length is for task caption or asr or"),
        (["--task", "text", "--audio-frames", "5"], "--audio-frames is for task t2s, not text"),
        (["--task", "text", "--prompt", " "], "--prompt number 2 is empty"),
        (["--task", "text", "--gen-length", "400"], "longer than the model's context 160"),
        (["--task", "t2i", "--ckpt-kind", "noimg"], "no image tokenizer, needed by task 't2i'"),
        (["--task", "text", "--ckpt-kind", "junk"], "not a megadiff checkpoint"),
    ],
)
def test_cli_errors_exit_2(ckpt, tmp_path, capsys, flags, message):
    path = ckpt[0]
    if "--ckpt-kind" in flags:
        kind = flags[flags.index("--ckpt-kind") + 1]
        flags = flags[: flags.index("--ckpt-kind")]
        src = path / "checkpoints" / "step_00000001"
        path = tmp_path / kind
        if kind == "noimg":
            shutil.copytree(src, path)
            (path / "tokenizers" / "image.vq").unlink()
            write_manifest(path, 1)
        else:
            path.mkdir()
            (path / "notes.txt").write_text("not a checkpoint")
    r = _cli_here(
        capsys, "generate", "--ckpt", str(path), "--prompt", "1+2=", "--no-progress", *flags
    )
    assert r.returncode == 2, r.stderr
    assert message in r.stderr and "Traceback" not in r.stderr


def test_unreadable_wav_for_asr_is_named(ckpt, tmp_path, capsys):
    """A corrupt or empty WAV given to asr: exit 2 naming the file, no traceback."""
    from megadiff.data.tokenizers.audio import write_wav

    corrupt = tmp_path / "corrupt.wav"
    corrupt.write_bytes(b"RIFF\x10\x00\x00\x00WAVEjunk" + bytes(range(40)))
    empty = tmp_path / "empty.wav"
    write_wav(empty, np.zeros(0, np.float32), 16000)
    for wav, message in ((corrupt, "cannot read WAV"), (empty, "holds no audio")):
        args = ["--ckpt", str(ckpt[0]), "--task", "asr", "--prompt", str(wav), "--no-progress"]
        r = _cli_here(capsys, "generate", *args, "--out", str(tmp_path / "out"))
        assert r.returncode == 2, r.stderr
        assert message in r.stderr and str(wav) in r.stderr and "Traceback" not in r.stderr
    with pytest.raises(SamplingError, match="temperature must be a finite number"):
        sampler_config("text", {"temperature": float("nan")})  # library use: settings too


def test_demo_rejects_bad_tasks_share(tmp_path):
    r = _cli("demo", "--data-dir", str(tmp_path / "d"), "--tasks", "1.5", "train.steps=1")
    assert r.returncode == 2 and "--tasks must be in [0, 1], got 1.5" in r.stderr
    assert not (tmp_path / "d").exists()  # checked before any data is built


@pytest.fixture(scope="module")
def demo_data_dir(tmp_path_factory) -> Path:
    """The ``megadiff demo`` default data, built once for the demo command tests (reused by
    the command: same ``DemoParams``)."""
    out = tmp_path_factory.mktemp("demo") / "data"
    build_demo_data(out, log=lambda *_: None)
    return out


def test_demo_leaves_checkpoint_scores_itself_and_prints_valid_commands(
    demo_data_dir, tmp_path, capsys
):
    """A 2-step demo: checkpoint, the closing self-score line, the contact sheet (a PNG holding a
    10 x 9 grid of pictures), WAVs, and each printed ``megadiff generate`` command runs and
    writes its sample."""
    from PIL import Image

    tiny = [o for o in TINY_DEMO if not o.startswith("data.")]
    run = tmp_path / "run"
    r = _cli(
        "demo", "--data-dir", str(demo_data_dir), "--tasks", "0.3", *tiny,
        "model.seq_length=64", "train.steps=2", f"run.dir={run}",
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert (run / "checkpoints" / "step_00000002" / MANIFEST).is_file()
    cfg = json.loads((demo_data_dir / "tasks" / "manifest.json").read_text())
    assert cfg["num_samples"] > 0
    assert "masked-token loss, mean of the first 10% of logged steps" in r.stdout
    line = next(x for x in r.stdout.splitlines() if x.startswith("demo scores"))
    scores = json.loads((run / "samples" / "scores.json").read_text())
    assert f"t2i colour+position {scores['t2i']:.2f} · t2s retrieval {scores['t2s']:.2f}" in line
    with Image.open(run / "samples" / "contact_sheet.png") as sheet:
        assert sheet.format == "PNG" and sheet.width > 600 and sheet.height > 600
    assert len(list((run / "samples").glob("t2s_*.wav"))) == 4
    assert len((run / "samples" / "text.txt").read_text().splitlines()) == 100
    commands = [x.strip() for x in r.stdout.splitlines() if x.strip().startswith("megadiff gen")]
    assert [shlex.split(c)[5] for c in commands] == ["t2i", "t2s", "text"]
    for command, suffix in zip(commands, (".png", ".wav", ".txt")):
        g = _cli_here(capsys, *shlex.split(command)[1:], "--no-progress")
        assert g.returncode == 0, (command, g.stderr)
        out = Path(shlex.split(command)[shlex.split(command).index("--out") + 1])
        assert len(list(out.glob(f"*{suffix}"))) == 1, command


def test_demo_stop_exits_75_and_the_same_command_continues(demo_data_dir, tmp_path):
    """A stop (here the wall-clock budget: 0.6 ms, one step) is the command's exit code (75,
    requeue); the checkpoint is at the stop step and running the same command again resumes."""
    tiny = [o for o in TINY_DEMO if not o.startswith("data.")]
    argv = [
        "demo", "--data-dir", str(demo_data_dir), *tiny, "model.num_layers=1",
        "train.steps=50", "train.exit_after_minutes=1e-5", f"run.dir={tmp_path / 'run'}",
    ]  # fmt: skip
    ckpts = tmp_path / "run" / "checkpoints"
    for step in (1, 2):
        (r,) = cli_world(argv, command=())  # the command in a preloaded process: no imports
        assert r.returncode == 75, r.stderr
        assert sorted(p.name for p in ckpts.iterdir()) == [
            f"step_{s:08d}" for s in range(max(1, step - 1), step + 1)
        ]
        assert (ckpts / f"step_{step:08d}" / MANIFEST).is_file()
        assert "run the same command again to continue it" in r.stdout
        assert "demo finished" not in r.stdout and "try it" not in r.stdout


def test_demo_refuses_a_run_dir_another_run_holds(demo_data_dir, tmp_path):
    """Like ``megadiff train``: a held run.dir is refused (exit 2, naming the holder) before
    anything is trained or written there."""
    import os
    import socket

    from megadiff.config import load_config
    from megadiff.parallel.env import LaunchEnv
    from megadiff.training.run_lock import hold_run_dirs

    run_dir = tmp_path / "run"
    held = load_config(None, [f"run.dir={run_dir}"])
    tiny = [o for o in TINY_DEMO if not o.startswith("data.")]
    argv = ["demo", "--data-dir", str(demo_data_dir), *tiny, "train.steps=2", "--no-score",
            f"run.dir={run_dir}"]  # fmt: skip
    alone = LaunchEnv(rank=0, world_size=1, local_rank=0, master_addr="", master_port=0,
                      launcher="single")  # fmt: skip
    with hold_run_dirs(held, alone):
        (r,) = cli_world(argv, command=())
    assert r.returncode == 2, r.stderr[-2000:]
    holder = f"pid {os.getpid()} on host {socket.gethostname()}"
    assert f"{run_dir} is in use by another megadiff run ({holder}" in r.stderr, r.stderr
    assert "megadiff demo: error:" in r.stderr and "Traceback" not in r.stderr
    assert not (run_dir / "metrics.jsonl").exists() and not (run_dir / "checkpoints").exists()


def test_prompts_file_plain_and_jsonl(tmp_path):
    import argparse

    from megadiff.generation.cli import _prompts

    plain = tmp_path / "p.txt"
    plain.write_text("12+7=\n\n a red circle \n")
    assert _prompts(argparse.Namespace(prompt=["x"], prompts=str(plain))) == [
        "x",
        "12+7=",
        "a red circle",
    ]
    js = tmp_path / "p.jsonl"
    js.write_text(json.dumps("able=611644\nack=768175\nack?") + "\n\n" + json.dumps("1+2=") + "\n")
    assert _prompts(argparse.Namespace(prompt=[], prompts=str(js))) == [
        "able=611644\nack=768175\nack?",
        "1+2=",
    ]
    js.write_text('"ok"\n{"prompt": 1}\n')
    with pytest.raises(TaskError, match="p.jsonl:2: expected a non-empty JSON string"):
        _prompts(argparse.Namespace(prompt=[], prompts=str(js)))
    js.write_text("not json\n")
    with pytest.raises(TaskError, match="p.jsonl:1: not a JSON string"):
        _prompts(argparse.Namespace(prompt=[], prompts=str(js)))


def test_samples_jsonl_is_strict_json_with_non_finite_numbers(tmp_path):
    """A record's non-finite number becomes null: any JSON parser reads samples.jsonl."""
    from megadiff.generation.api import write_outputs

    record = {"prompt": "3+5=", "text": "8", "nfe": 3, "score": float("nan"), "gap": float("inf")}
    write_outputs([record], tmp_path, sampler_config("text"), 16000)

    def refuse(name):
        raise ValueError(f"non-standard JSON constant {name}")

    row = json.loads((tmp_path / "samples.jsonl").read_text(), parse_constant=refuse)
    assert row["score"] is None and row["gap"] is None and row["text"] == "8"
