"""What a run reports: TensorBoard events (read back with tensorboard's own reader), W&B
offline runs, the progress line and end-of-run summary, the already-complete and
load-beyond-steps messages, and ``megadiff plot``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from megadiff.training.metrics import MetricsLogger
from megadiff.training.plot import PlotError, build_figure
from megadiff.training.sinks import TensorBoardSink
from tests.workers import TINY

ROOT = Path(__file__).resolve().parents[1]
STEPS = 3
TOKENS_PER_STEP = 4 * 16  # TINY: global_batch x seq_length
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _env() -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("SLURM_", "RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_"))
    }
    env.update(PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    return env


def _megadiff(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "megadiff", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=_env(),
        timeout=300,
    )


# the tiny test model with the logging defaults (TensorBoard on)
TINY_DEFAULT_LOGGING = [a for a in TINY if not a.startswith("logging.")]


def _train(run_dir: Path, *extra: str) -> subprocess.CompletedProcess:
    args = ("train", *TINY_DEFAULT_LOGGING, f"run.dir={run_dir}", *extra)
    return _megadiff(*args)


def _records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _scalars(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar tag under ``log_dir`` as (step, value) pairs, read by tensorboard."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return {t: [(e.step, e.value) for e in acc.Scalars(t)] for t in acc.Tags()["scalars"]}


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """A real 3-step `megadiff train` run (progress line on, TensorBoard on by default)."""
    run_dir = tmp_path_factory.mktemp("logging") / "run_a"
    r = _train(run_dir, f"train.steps={STEPS}")
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    return run_dir, r


def test_training_writes_tensorboard_scalars(trained):
    run_dir, _ = trained
    records = _records(run_dir)
    assert [r["step"] for r in records] == [1, 2, 3]
    scalars = _scalars(run_dir / "tensorboard")
    for tag in ("train/loss", "lr", "grad_norm", "tokens_per_s", "peak_memory_gib"):
        assert tag in scalars, sorted(scalars)
        assert [s for s, _ in scalars[tag]] == [1, 2, 3], tag
    for modality in ("text", "image", "audio"):
        assert f"train/loss_{modality}" in scalars, sorted(scalars)
    got = [v for _, v in scalars["train/loss"]]
    assert got == pytest.approx([r["loss"] for r in records], rel=1e-6)  # float32 in events
    assert all(v > 0 for _, v in scalars["peak_memory_gib"])
    # tokens as the x axis: the same values again under by_tokens/
    by_tokens = scalars["by_tokens/train/loss"]
    assert [s for s, _ in by_tokens] == [TOKENS_PER_STEP * i for i in (1, 2, 3)]
    assert [v for _, v in by_tokens] == got


def test_progress_line_and_end_of_run_summary(trained):
    run_dir, r = trained
    out = r.stdout
    last = _records(run_dir)[-1]
    progress = [line for line in out.splitlines() if line.startswith(f"step {STEPS}/{STEPS}")]
    assert len(progress) == 1, out
    assert f"gnorm {last['grad_norm']:.3f}" in progress[0]
    assert f"mem {last['peak_memory_gib']:.2f} GiB" in progress[0]
    assert "run ended: reached train.steps=3 (exit 0)" in out, out
    summary = out[out.index("run ended:") :]
    assert "steps       3 (3 this run, from step 0)" in summary
    assert f"tokens      {STEPS * TOKENS_PER_STEP}" in summary
    assert f"train loss  {last['loss']:.4f} (step 3)" in summary
    assert "val loss    none" in summary
    assert f"checkpoint  {run_dir / 'checkpoints' / 'step_00000003'}" in summary
    assert "wall time" in summary
    # start-up noise: no optimizer table without optim.logical
    assert "optim:" not in out and "logical  physical" not in out


def test_rerunning_a_finished_run_says_it_is_complete(trained):
    run_dir, _ = trained
    before = (run_dir / "metrics.jsonl").read_text()
    r = _train(run_dir, f"train.steps={STEPS}")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "already complete at step 3 — raise train.steps to continue" in r.stdout, r.stdout
    assert "resumed from" not in r.stdout and "run ended" not in r.stdout
    assert (run_dir / "metrics.jsonl").read_text() == before


def test_checkpoint_load_at_or_beyond_train_steps_is_refused(trained, tmp_path):
    run_dir, _ = trained
    load = f"checkpoint.load={run_dir / 'checkpoints'}"
    for steps in (STEPS, STEPS - 1):
        r = _train(tmp_path / f"b{steps}", load, f"train.steps={steps}")
        assert r.returncode == 2, r.stdout[-2000:] + r.stderr[-2000:]
        for words in ("at step 3", f"train.steps={steps}", "checkpoint.reset_step=true"):
            assert words in r.stderr, r.stderr
        assert not (tmp_path / f"b{steps}" / "metrics.jsonl").exists()


def test_checkpoint_load_says_loaded_not_resumed_and_plot_draws_both_runs(trained, tmp_path):
    run_a, _ = trained
    run_b = tmp_path / "run_b"
    r = _train(run_b, f"checkpoint.load={run_a / 'checkpoints'}", "train.steps=5")
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    ckpt = run_a / "checkpoints" / "step_00000003"
    assert f"loaded weights and optimizer state from {ckpt}; training from its step 3" in r.stdout
    assert "resumed from" not in r.stdout
    assert "steps       5 (2 this run, from step 3)" in r.stdout

    png = tmp_path / "loss.png"
    p = _megadiff(
        "plot", str(run_a), str(run_b), "--key", "loss", "--x", "tokens", "--out", str(png)
    )
    assert p.returncode == 0, p.stderr
    assert png.read_bytes()[:8] == PNG_SIGNATURE
    fig = build_figure([run_a, run_b], "loss", "tokens")
    lines = fig.axes[0].get_lines()
    assert [line.get_label() for line in lines] == ["run_a", "run_b"]
    for line, run in zip(lines, (run_a, run_b), strict=True):
        records = _records(run)
        assert list(line.get_xdata()) == [rec["tokens"] for rec in records]
        assert list(line.get_ydata()) == [rec["loss"] for rec in records]
    assert len(lines[0].get_xdata()) == 3 and len(lines[1].get_xdata()) == 2


def _write_metrics(run_dir: Path, records: list[dict]) -> Path:
    run_dir.mkdir(parents=True)
    text = "".join(json.dumps(r) + "\n" for r in records) + '{"step": 9, "loss'  # torn line
    (run_dir / "metrics.jsonl").write_text(text)
    return run_dir


def test_plot_figure_from_metrics_files(tmp_path):
    """Eval records between training records: only the records with the key make a curve;
    null values are skipped; a run without the key is left out of the legend."""
    a = _write_metrics(
        tmp_path / "a",
        [
            {"step": 0, "tokens": 0, "val_loss_image": 6.0},
            {"step": 1, "tokens": 64, "loss": 5.5},
            {"step": 2, "tokens": 128, "loss": 5.0, "val_loss_image": 4.5},
            {"step": 4, "tokens": 256, "val_loss_image": None},
        ],
    )
    b = _write_metrics(tmp_path / "b", [{"step": 2, "tokens": 256, "val_loss_image": 3.0}])
    c = _write_metrics(tmp_path / "c", [{"step": 1, "tokens": 64, "loss": 7.0}])
    fig = build_figure([a, b, c], "val_loss_image", "step")
    lines = fig.axes[0].get_lines()
    assert [line.get_label() for line in lines] == ["a", "b"]
    assert list(lines[0].get_xdata()) == [0, 2] and list(lines[0].get_ydata()) == [6.0, 4.5]
    assert list(lines[1].get_xdata()) == [2] and list(lines[1].get_ydata()) == [3.0]
    by_tokens = build_figure([a, b], "val_loss_image", "tokens").axes[0].get_lines()
    assert list(by_tokens[1].get_xdata()) == [256]
    assert fig.axes[0].get_xlabel() == "step" and fig.axes[0].get_ylabel() == "val_loss_image"

    with pytest.raises(PlotError, match="keys these runs have: loss, val_loss_image"):
        build_figure([a, c], "val_loss_text")
    with pytest.raises(PlotError, match=str(tmp_path / "missing")):
        build_figure([a, tmp_path / "missing"], "loss")
    (tmp_path / "empty").mkdir()
    with pytest.raises(PlotError, match="has no metrics.jsonl"):
        build_figure([tmp_path / "empty"], "loss")


def test_plot_cli_errors_exit_2(tmp_path, capsys):
    from megadiff.cli import main

    a = _write_metrics(tmp_path / "a", [{"step": 1, "tokens": 64, "loss": 5.5}])
    out = str(tmp_path / "p.png")
    assert main(["plot", str(a), "--key", "val_loss", "--out", out]) == 2
    assert (
        "no run has values for --key val_loss; keys these runs have: loss"
        in capsys.readouterr().err
    )
    assert main(["plot", str(tmp_path / "nope"), "--key", "loss", "--out", out]) == 2
    assert str(tmp_path / "nope") in capsys.readouterr().err
    assert main(["plot", str(a), "--key", "loss", "--out", str(tmp_path / "no" / "p.png")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert not Path(out).exists()


def test_val_records_become_val_scalars(tmp_path):
    """Eval records written through the run's logger appear as val/* scalars (both x axes)."""
    log = MetricsLogger(
        tmp_path, 10, enabled=True, progress=False, sinks=[TensorBoardSink(tmp_path / "tb")]
    )
    log.log({"step": 1, "tokens": 64, "loss": 5.0, "lr": 1e-3, "tokens_per_s": 10.0})
    val = {"val_loss": 4.5, "val_loss_image": 4.25, "val_loss_books": 4.75, "val_ppl": 90.0}
    log.write({"step": 2, "tokens": 128, **val})
    log.write({"step": 4, "tokens": 256, "val_loss": 4.0, "val_loss_image": float("nan")})
    log.close()
    scalars = _scalars(tmp_path / "tb")
    assert scalars["val/loss"] == [(2, 4.5), (4, 4.0)]
    assert scalars["val/loss_image"] == [(2, 4.25)]  # the NaN is left out
    assert scalars["val/loss_books"] == [(2, 4.75)]
    assert scalars["val/ppl"] == [(2, 90.0)]
    assert scalars["by_tokens/val/loss"] == [(128, 4.5), (256, 4.0)]
    assert scalars["train/loss"] == [(1, 5.0)]
    assert log.last_val is not None and log.last_val["step"] == 4


def test_wandb_offline_writes_its_run_folder(tmp_path, monkeypatch):
    wandb = pytest.importorskip(
        "wandb", reason="wandb is an optional extra: pip install megadiff[wandb]"
    )
    from megadiff.config import load_config
    from megadiff.training.sinks import build_sinks

    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = load_config(
        None,
        [
            f"run.dir={tmp_path}",
            "logging.tensorboard=false",
            "logging.wandb.project=megadiff-test-project",
            "logging.wandb.mode=offline",
        ],
    )
    (sink,) = build_sinks(cfg)
    sink.write({"step": 1, "tokens": 64, "loss": 5.0, "grad_norm": 0.5})
    sink.write({"step": 1, "tokens": 64, "val_loss": 4.5})
    sink.close()
    wandb.teardown()  # the wandb service process writes the run file; wait until it has
    (run,) = (tmp_path / "wandb").glob("offline-run-*")
    (data_file,) = run.glob("run-*.wandb")
    data = data_file.read_bytes()  # wandb's own record file: the config and history are in it
    for words in (b"megadiff-test-project", b"global_batch", b"train/loss", b"val/loss"):
        assert words in data, words


def test_wandb_run_continues_on_resume_and_starts_anew_otherwise(tmp_path, monkeypatch):
    """A run resumed from its own checkpoint logs into the same W&B run (its kept id); a fresh
    start in the same run.dir gets a new id."""
    wandb = pytest.importorskip(
        "wandb", reason="wandb is an optional extra: pip install megadiff[wandb]"
    )
    from megadiff.config import load_config
    from megadiff.training.sinks import WANDB_ID_FILE, build_sinks

    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = load_config(None, [f"run.dir={tmp_path}", "logging.tensorboard=false",
                             "logging.wandb.project=p", "logging.wandb.mode=offline"])  # fmt: skip
    ids = []
    for resumed in (False, True, False):
        (sink,) = build_sinks(cfg, resumed=resumed)
        ids.append(sink.run.id)
        sink.write({"step": len(ids), "tokens": 64, "loss": 5.0})
        sink.close()
        assert (tmp_path / WANDB_ID_FILE).read_text().strip() == ids[-1]
    wandb.teardown()
    assert ids[0] == ids[1] != ids[2]
    folders = [p.name for p in (tmp_path / "wandb").glob("offline-run-*")]
    for run_id in set(ids):  # wandb's own folders carry the ids (`wandb sync` joins them)
        assert any(run_id in name for name in folders), (run_id, folders)


def test_logging_keys_are_validated():
    from megadiff.config import ConfigError, check_sections, load_config

    with pytest.raises(ConfigError, match=r"logging\.wandb\.mode.*did you mean 'offline'"):
        load_config(None, ["logging.wandb.mode=ofline"])
    cfg = load_config(None, ["logging.wandb.mode=offline"])
    with pytest.raises(ConfigError, match=r"logging\.wandb\.mode.*needs logging\.wandb\.project"):
        check_sections(cfg)
    with pytest.raises(ConfigError, match="logging.tensorboard"):
        load_config(None, ["logging.tensorboard=maybe"])


def test_a_missing_logging_package_is_named_before_training(monkeypatch):
    import importlib.util

    from megadiff.config import ConfigError, load_config
    from megadiff.machine import check_machine
    from megadiff.plan import resolve

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a)
    )
    over = ["logging.wandb.project=p", "logging.wandb.mode=offline", *TINY]
    with pytest.raises(ConfigError, match=r"logging\.wandb\.mode.*megadiff\[wandb\]"):
        check_machine(resolve(load_config(None, over), 1).cfg)
