"""Held-out evaluation in the training loop: the same checkpoint gives the same eval record at
every layout and batch size, from the same rows and noise (real gloo processes)."""

from __future__ import annotations

import math

import pytest
import torch

from megadiff.config import DiffusionConfig
from megadiff.parallel.launch import run_world
from tests.workers import eval_rows, fit_with_eval

RTOL = 1e-5
# 2 x 5 sequences at 3 t each: 30 rows, not a multiple of any tested global batch (padding)
EVAL = ["eval.batches=2", "eval.batch_size=5", "eval.t_points=3", "eval.seed=11"]


def _merged(results: list[dict]) -> tuple[dict, dict]:
    record = next(r["record"] for r in results if r["record"] is not None)
    rows: dict = {}
    for r in results:
        rows.update(r["rows"])
    return record, rows


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """Train 2 steps at TP = PP = DP = 1, save, evaluate."""
    run_dir = tmp_path_factory.mktemp("ref")
    record, rows = _merged(run_world(eval_rows, 1, ([*EVAL], str(run_dir), 2)))
    return {"ckpt": str(run_dir / "checkpoints"), "record": record, "rows": rows}


LAYOUTS = {
    "tp1_gb8": (1, ["train.global_batch=8", "train.micro_batch=4"]),
    "tp2": (2, ["parallel.tensor_parallel=2"]),
    "pp2": (2, ["parallel.pipeline_parallel=2"]),
    "dp2": (2, []),
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_eval_record_same_at_every_layout_and_batch(layout, reference, tmp_path):
    world, overrides = LAYOUTS[layout]
    load = [f"checkpoint.load={reference['ckpt']}", "checkpoint.load_optimizer=false"]
    results = run_world(eval_rows, world, ([*EVAL, *overrides, *load], str(tmp_path), 0))
    record, rows = _merged(results)
    ref = reference["record"]
    keys = [k for k in ref if k.startswith("val_") and k != "val_time"]
    assert {"val_loss", "val_ppl", "val_loss_text", "val_loss_image", "val_loss_audio"} <= set(keys)
    assert keys == [k for k in record if k.startswith("val_") and k != "val_time"]
    for k in keys:
        assert abs(record[k] - ref[k]) <= RTOL * abs(ref[k]), f"{k}: {record[k]} vs {ref[k]}"
    assert record["step"] == 2 and record["tokens"] == ref["tokens"]
    # the same 30 rows, each with the same masked inputs and weights
    assert sorted(rows) == sorted(reference["rows"]) == list(range(30))
    for i, (inputs, weight) in reference["rows"].items():
        assert torch.equal(rows[i][0], inputs) and torch.equal(rows[i][1], weight), i


def test_eval_noise_is_stratified_and_seeded(reference, tmp_path):
    """Each sequence's 3 rows mask more and more tokens (one level per third); another
    eval.seed gives other masks for the same sequences and a close, different loss."""
    rows = reference["rows"]
    for seq in range(10):
        masked = [int((rows[3 * seq + k][1] > 0).sum()) for k in range(3)]
        assert masked[0] < masked[1] < masked[2]
    other = run_world(eval_rows, 1, ([*EVAL[:-1], "eval.seed=12"], str(tmp_path), 2))[0]
    assert any(not torch.equal(other["rows"][i][0], rows[i][0]) for i in rows)
    a, b = other["record"]["val_loss"], reference["record"]["val_loss"]
    assert a != b and abs(a - b) < 0.2 * b


@pytest.mark.parametrize("engine", ["megatron", "deepspeed"])
def test_fit_evaluates_at_start_every_n_and_end_on_both_engines(tmp_path, engine):
    if engine == "deepspeed":
        pytest.importorskip("deepspeed")
    overrides = [
        *EVAL, "train.steps=5", "eval.every=2", f"train.engine={engine}",
        "checkpoint.save_on_exit=false",
    ]  # fmt: skip
    metrics = run_world(fit_with_eval, 2, (overrides, str(tmp_path)))[0]["metrics"]
    evals = [m for m in metrics if "val_loss" in m]
    assert [(m["step"], m["tokens"]) for m in evals] == [(s, s * 4 * 16) for s in (0, 2, 4, 5)]
    assert [m["step"] for m in metrics if "loss" in m] == [1, 2, 3, 4, 5]
    for m in evals:
        assert math.isfinite(m["val_loss"])
        assert m["val_ppl"] == pytest.approx(math.exp(m["val_loss"]))
        assert "loss" not in m
    assert evals[-1]["val_loss"] < evals[0]["val_loss"]


def test_stratified_grid_one_level_per_stratum_and_seeded_per_sequence():
    """Each sequence's K rows mask exactly c_k = 1 + floor(n (k + u) / K) of its n valid tokens
    (one level per 1/K stratum), weighted n / c_k; PAD is never masked; a sequence's noise
    depends on (seed, its index) only, not on the set around it."""
    from megadiff.data.synthetic import SyntheticSource
    from megadiff.diffusion.objective import MaskingObjective
    from megadiff.training.evaluation import HeldOut, stratified_noise

    src = SyntheticSource(120, 16, seed=3)
    obj = MaskingObjective(DiffusionConfig(), src.mask_id, src.pad_id)
    b = src.held_out(6)
    b["tokens"][1, 10:] = src.pad_id  # a padded sequence: 10 valid tokens
    held = HeldOut(b["tokens"], b["modality"], torch.zeros(6, dtype=torch.long), ["s"])
    k = 4
    noised, _ = stratified_noise(obj, held, k, seed=5)
    masked = (noised.inputs == src.mask_id).view(6, k, 16)
    for i, n in enumerate([16, 10, 16, 16, 16, 16]):
        c = masked[i].sum(1)
        strata = torch.div((c - 1) * k, n, rounding_mode="floor")
        assert strata.tolist() == list(range(k)), (i, c.tolist())
        w = noised.weight.view(6, k, 16)[i]
        assert torch.allclose(w[masked[i]], (n / c.float()).repeat_interleave(c))
    assert not masked[1, :, 10:].any()
    fewer, _ = stratified_noise(
        obj,
        HeldOut(
            *(x[:2] for x in (b["tokens"], b["modality"])), torch.zeros(2, dtype=torch.long), ["s"]
        ),
        k,
        seed=5,
    )
    assert torch.equal(fewer.inputs, noised.inputs[: 2 * k])
    other, _ = stratified_noise(obj, held, k, seed=6)
    assert not torch.equal(other.inputs, noised.inputs)


def test_synthetic_held_out_is_fixed_and_its_own_seed_stream():
    """The same held-out samples every time; other draws than the training samples (of the same
    32 documents: with 5% substitutions many samples of both equal their document exactly)."""
    from megadiff.data.synthetic import SyntheticSource

    src = SyntheticSource(120, 16, seed=3)
    held = src.held_out(64)["tokens"]
    assert torch.equal(held, SyntheticSource(120, 16, seed=3).held_out(64)["tokens"])
    train = src.batch(0, 64)["tokens"]
    assert (held != train).any(1).sum() > 32
