"""Training with held-out evaluation on real MDS streams and their ``val/`` splits, and the
exit-2 errors of bad ``val_path`` / ``eval.*`` keys (the real ``megadiff train`` command)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import corpus
from conftest import megadiff_cli as megadiff

from megadiff.data.preprocess import Record, write_shards

MODEL = [
    "model.num_layers=1",
    "model.hidden_size=32",
    "model.num_attention_heads=4",
    "model.ffn_hidden_size=64",
    "model.seq_length=32",
    "train.micro_batch=2",
    "train.global_batch=4",
    "optim.warmup_tokens=16",
    "logging.progress=false",
    "data.source=mds",
    "eval.batches=2",
    "eval.batch_size=3",
    "eval.t_points=2",
]


@pytest.fixture(scope="module")
def streams(tmp_path_factory, text_tok):
    root = tmp_path_factory.mktemp("val_streams")
    docs = [Record(f"doc{i}", text=d) for i, d in enumerate(corpus(60, seed=2))]
    write_shards("text", docs, root / "text", text_tok, val_count=5)
    rng = np.random.default_rng(0)
    pairs = [Record(f"p{i}", text=f"clip {i}", item=rng.integers(0, 16, (4, 4))) for i in range(30)]
    modal = {"codebook_size": 16, "num_codebooks": 1, "grid": [4, 4]}
    write_shards("image", pairs, root / "img", text_tok, modal, val_fraction=0.3)
    write_shards("text", docs[:20], root / "plain", text_tok)  # no held-out split
    return root


def train(run_dir, streams: list[dict], *extra: str):
    return megadiff(
        "train", *MODEL, f"data.streams={json.dumps(streams)}", f"run.dir={run_dir}", *extra
    )


def test_train_reports_val_losses_per_modality_and_stream(streams, tmp_path):
    spec = [
        {"name": "text", "path": str(streams / "text")},
        {"name": "img", "path": str(streams / "img")},
    ]
    r = train(tmp_path / "run", spec, "train.steps=2", "eval.every=2")
    assert r.returncode == 0, r.stderr[-3000:]
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    evals = [x for x in rows if "val_loss" in x]
    assert [x["step"] for x in evals] == [0, 2] and [x["step"] for x in rows if "loss" in x] == [
        1,
        2,
    ]
    want = {"val_loss_text", "val_loss_image", "val_loss_stream_text", "val_loss_stream_img"}
    assert want <= set(evals[0]) and "val_loss_audio" not in evals[0]
    assert "eval step 2: val_loss" in r.stdout and "ppl" in r.stdout
    assert f"val loss    {evals[-1]['val_loss']:.4f} (step 2)" in r.stdout  # the run summary
    from tests.test_logging import _scalars  # TensorBoard's own reader

    tb = _scalars(tmp_path / "run" / "tensorboard")
    assert [s for s, _ in tb["val/loss"]] == [0, 2]
    assert tb["val/loss_stream_img"][-1][1] == pytest.approx(evals[-1]["val_loss_stream_img"])


def test_stream_loss_weight_scales_that_streams_training_loss(streams, tmp_path):
    """``loss_weight: 3`` on the image stream: the same first step (same rows, same noise,
    same weights) has three times the image-token loss; the text stream's rows are unchanged."""
    first = {}
    for w in (1.0, 3.0):
        spec = [
            {"name": "text", "path": str(streams / "text")},
            {"name": "img", "path": str(streams / "img"), "loss_weight": w},
        ]
        r = train(tmp_path / f"w{w}", spec, "train.steps=1", "eval.every=0")
        assert r.returncode == 0, r.stderr[-3000:]
        line = (tmp_path / f"w{w}" / "metrics.jsonl").read_text().splitlines()[0]
        first[w] = json.loads(line)
    assert first[3.0]["loss_image"] == pytest.approx(3 * first[1.0]["loss_image"], rel=1e-5)
    assert first[3.0]["loss"] > first[1.0]["loss"]


def test_bad_val_path_and_missing_split_fail_naming_the_key(streams, tmp_path):
    bad = [{"name": "text", "path": str(streams / "text"), "val_path": str(tmp_path / "nope")}]
    r = train(tmp_path / "a", bad, "train.steps=1")  # a given val_path is checked even eval off
    assert r.returncode == 2 and "data.streams[0].val_path" in r.stderr, r.stderr[-2000:]
    assert str(tmp_path / "nope") in r.stderr and "Traceback" not in r.stderr
    plain = [{"name": "p", "path": str(streams / "plain")}]
    r = train(tmp_path / "b", plain, "train.steps=1", "eval.every=5")
    assert r.returncode == 2 and "data.streams[0].val_path" in r.stderr
    assert "--val-fraction" in r.stderr and "eval.every=0" in r.stderr
    wrong = [
        {"name": "p", "path": str(streams / "plain"), "val_path": str(streams / "img" / "val")}
    ]
    r = train(tmp_path / "c", wrong, "train.steps=1", "eval.every=5")
    assert r.returncode == 2 and "data.streams[0].val_path" in r.stderr and "image" in r.stderr


@pytest.mark.parametrize(
    "override, key",
    [("eval.t_points=0", "eval.t_points"), ("eval.every=-1", "eval.every"),
     ("eval.batch_size=0", "eval.batch_size"), ("eval.sed=1", "eval.sed")],
)  # fmt: skip
def test_bad_eval_keys_name_the_key(override, key):
    from megadiff.config import ConfigError, check_sections, load_config

    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        check_sections(load_config(None, [override]))


def test_bad_eval_key_exits_2_from_the_command(tmp_path):
    r = megadiff("train", "eval.batches=0", f"run.dir={tmp_path}")
    assert r.returncode == 2 and "'eval.batches'" in r.stderr and ">= 1" in r.stderr
