"""Activation recompute (``model.recompute``): megatron-core's checkpointing on CPU (gloo)
gives the gradients, losses and parameters of the run without it, in one process and under
TP=2 / PP=2, with dropout on so the recomputed forward must replay the RNG streams."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from megadiff.config import ConfigError, load_config
from megadiff.machine import layer_activations
from megadiff.parallel.launch import run_world
from megadiff.plan import resolve
from tests.workers import TINY, train_capture

STEPS = 2
# dropout on: the recomputed forward must draw the same masks (CPU RNG + megatron tracker)
DROPOUT = ["model.hidden_dropout=0.1", "model.attention_dropout=0.1"]
VARIANTS = {
    "full_uniform": ["model.recompute=full", "model.recompute_num_layers=2"],
    "full_block": [
        "model.recompute=full",
        "model.recompute_method=block",
        "model.recompute_num_layers=1",
    ],
    "selective": ["model.recompute=selective"],
}
LAYOUTS = {
    "single": (1, []),
    "tp2": (2, ["parallel.tensor_parallel=2"]),
    "pp2": (2, ["parallel.pipeline_parallel=2"]),
}
_baselines: dict[str, dict] = {}


def _run(world: int, overrides: list[str], tmp_path) -> dict:
    base = [*DROPOUT, "parallel.distributed_optimizer=false", *overrides]
    results = run_world(train_capture, world, (base, STEPS, str(tmp_path)))
    losses = next(r["losses"] for r in results if r["losses"] is not None)
    return {"losses": losses, "grads": results[0]["grads"], "params": results[0]["params"]}


def _baseline(layout: str, tmp_path_factory) -> dict:
    if layout not in _baselines:
        world, overrides = LAYOUTS[layout]
        _baselines[layout] = _run(world, overrides, tmp_path_factory.mktemp(f"none_{layout}"))
    return _baselines[layout]


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_recompute_matches_no_recompute(layout, variant, tmp_path, tmp_path_factory):
    """Bit-identical: same losses per step, first-step gradients and final parameters."""
    ref = _baseline(layout, tmp_path_factory)
    world, overrides = LAYOUTS[layout]
    run = _run(world, [*overrides, *VARIANTS[variant]], tmp_path)
    assert run["losses"] == ref["losses"]
    for kind in ("grads", "params"):
        assert run[kind].keys() == ref[kind].keys()
        for name, b in ref[kind].items():
            assert torch.equal(run[kind][name], b), f"{kind} {name} differs"
    assert all(g.abs().sum() > 0 for g in ref["grads"].values())


def _resolve(overrides: list[str], world: int = 1):
    return resolve(load_config(None, [*TINY, *overrides]), world)


@pytest.mark.parametrize(
    ("overrides", "world", "key", "words"),
    [
        (["model.recompute=partial"], 1, "model.recompute", "none, selective, full"),
        (["model.recompute=selective"], 1, "model.recompute", "attention_dropout=0"),
        (  # 4 layers / PP 2 = 2 per stage
            ["model.recompute=full", "model.recompute_num_layers=3",
             "model.recompute_method=block", "parallel.pipeline_parallel=2"],
            2, "model.recompute_num_layers", "more than the 2 layers",
        ),
        (
            ["model.recompute=full", "model.recompute_num_layers=3"],
            1, "model.recompute_num_layers", "does not divide the 4 layers",
        ),
        (["model.recompute=full", "model.recompute_num_layers=0"], 1,
         "model.recompute_num_layers", ">= 1"),
        (["model.recompute_method=blocks"], 1, "model.recompute_method", "uniform, block"),
    ],
)  # fmt: skip
def test_bad_recompute_settings_are_refused(overrides, world, key, words):
    with pytest.raises(ConfigError) as e:
        _resolve(overrides, world)
    assert key in str(e.value) and words in str(e.value), str(e.value)


def test_cli_exits_2_on_bad_recompute_before_training(tmp_path):
    run_dir = tmp_path / "run"
    r = subprocess.run(
        [sys.executable, "-m", "megadiff", "train", "model.recompute=full",
         "model.recompute_num_layers=5", f"run.dir={run_dir}"],
        capture_output=True,
        text=True,
    )  # fmt: skip
    assert r.returncode == 2, r.stderr
    assert "model.recompute_num_layers" in r.stderr and "Traceback" not in r.stderr
    assert not run_dir.exists()


def test_recompute_reaches_megatron_config():
    from megadiff.model.build import transformer_config
    from megadiff.parallel import cpu_compat

    cpu_compat.enable()
    full = transformer_config(
        _resolve(["model.recompute=full", "model.recompute_method=block"]).cfg
    )
    assert (full.recompute_granularity, full.recompute_method) == ("full", "block")
    assert full.recompute_num_layers == 1
    sel = transformer_config(
        _resolve(["model.recompute=selective", "model.attention_dropout=0.1"]).cfg
    )
    assert sel.recompute_granularity == "selective" and sel.recompute_modules == ["core_attn"]
    assert transformer_config(_resolve([]).cfg).recompute_granularity is None


def test_memory_estimate_counts_recompute():
    """8 layers, h=512, ffn=1408, seq 1024, micro-batch 8, fp32: per layer 8192 tokens x
    (10 x 512 + 3 x 1408) x 4 B; a layer input is 8192 x 512 x 4 B."""
    shape = ["model.num_layers=8", "model.hidden_size=512", "model.num_attention_heads=8",
             "model.ffn_hidden_size=1408", "model.seq_length=1024", "train.micro_batch=8",
             "train.global_batch=8"]  # fmt: skip
    layer = 8192 * (10 * 512 + 3 * 1408) * 4
    layer_input = 8192 * 512 * 4

    def acts(extra: list[str]) -> int:
        return layer_activations(_resolve([*shape, *extra]).cfg, 4)

    logits = 0
    assert acts([]) == 8 * layer
    assert acts(["model.recompute=full"]) - logits == 8 * layer_input + layer + layer // 2
    uniform4 = ["model.recompute=full", "model.recompute_num_layers=4"]
    assert acts(uniform4) - logits == 2 * layer_input + 4 * layer + layer // 2
    block3 = [
        "model.recompute=full",
        "model.recompute_method=block",
        "model.recompute_num_layers=3",
    ]
    assert acts(block3) - logits == 3 * layer_input + 5 * layer
