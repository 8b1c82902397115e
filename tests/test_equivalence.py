"""TP / PP / VPP / DP layouts reproduce the single-process run (fp32, gloo processes)."""

from __future__ import annotations

import pytest
import torch

from megadiff.parallel.launch import run_world
from tests.workers import train_capture

STEPS = 3
RTOL = 1e-5  # max |a - b| / max |b| per tensor, and relative per-step loss difference


def train_world(world: int, overrides: list[str], tmp_path, steps: int = STEPS) -> dict:
    """``steps`` steps on ``world`` gloo ranks: per-step losses, first-step full gradients and
    final full parameters (:func:`tests.workers.train_capture`)."""
    results = run_world(train_capture, world, (overrides, steps, str(tmp_path)))
    losses = next(r["losses"] for r in results if r["losses"] is not None)
    return {"losses": losses, "grads": results[0]["grads"], "params": results[0]["params"]}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    return train_world(1, ["parallel.distributed_optimizer=false"], tmp_path_factory.mktemp("ref"))


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp(min=1e-12))


def _assert_same(run: dict, ref: dict) -> None:
    for step, (a, b) in enumerate(zip(run["losses"], ref["losses"], strict=True)):
        assert abs(a - b) <= RTOL * abs(b), f"step {step + 1}: loss {a} vs {b}"
    for kind in ("grads", "params"):
        assert run[kind].keys() == ref[kind].keys()
        for name, b in ref[kind].items():
            a = run[kind][name]
            assert a.shape == b.shape, f"{kind} {name}: shape {a.shape} vs {b.shape}"
            assert _rel(a, b) <= RTOL, f"{kind} {name}: rel diff {_rel(a, b):.2e}"


LAYOUTS = {
    "tp2": (2, ["parallel.tensor_parallel=2"]),
    "pp2": (2, ["parallel.pipeline_parallel=2"]),
    "pp2_vpp2": (2, ["parallel.pipeline_parallel=2", "parallel.virtual_pipeline=2"]),
    "dp2": (2, []),
    "tp2_pp2": (4, ["parallel.tensor_parallel=2", "parallel.pipeline_parallel=2"]),
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_layout_matches_single_process(layout, reference, tmp_path):
    world, overrides = LAYOUTS[layout]
    run = train_world(world, [*overrides, "parallel.distributed_optimizer=false"], tmp_path)
    _assert_same(run, reference)


def test_distributed_optimizer_matches_single_process(reference, tmp_path):
    """ZeRO-1 sharded optimizer over DP=2: same losses and parameters (grads are sharded)."""
    results = run_world(train_capture, 2, ([], STEPS, str(tmp_path)))
    run = results[0]
    for a, b in zip(run["losses"], reference["losses"], strict=True):
        assert abs(a - b) <= RTOL * abs(b)
    for name, b in reference["params"].items():
        assert _rel(run["params"][name], b) <= RTOL, name


def test_reference_loss_is_finite_and_grads_nonzero(reference):
    assert all(torch.isfinite(torch.tensor(reference["losses"])))
    assert all(g.abs().sum() > 0 for g in reference["grads"].values())
