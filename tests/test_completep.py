"""model.parameterization=completep: residual scaling and per-group lr/eps multipliers."""

from __future__ import annotations

import pytest
import torch

from megadiff.config import ConfigError, load_config
from megadiff.model.completep import multipliers
from megadiff.parallel.launch import run_world
from megadiff.plan import resolve
from tests.workers import optimizer_groups, train_capture

# TINY (tests/workers.py): 4 layers, hidden 32, lr 1e-3, eps 1e-8, min_lr_ratio 0.1
CP = "model.parameterization=completep"


@pytest.mark.parametrize(
    "shape,want",
    [
        # (hidden, base hidden, layers, base layers, alpha) -> (residual, hidden lr, hidden eps)
        ((64, 16, 8, 2, 1.0), (0.25, 0.25, 0.25)),  # m_N = 4, m_L = 4
        ((64, 16, 8, 2, 0.5), (0.5, 0.125, 0.25)),  # depth-muP: lr x 4^-0.5 / 4
        ((32, 64, 2, 8, 1.0), (4.0, 2.0, 2.0)),  # smaller than the base
        ((48, 48, 6, 6, 1.0), (1.0, 1.0, 1.0)),  # at the base: identity
    ],
)
def test_multipliers_follow_the_formulas(shape, want):
    h, bh, n, bn, a = shape
    cfg = load_config(
        None,
        [
            CP,
            f"model.hidden_size={h}",
            f"model.base_hidden_size={bh}",
            f"model.num_layers={n}",
            f"model.base_num_layers={bn}",
            f"model.depth_alpha={a}",
            "model.num_attention_heads=4",
        ],
    )
    m = multipliers(cfg.model)
    assert (m.residual, m.hidden_lr, m.hidden_eps) == pytest.approx(want, rel=1e-12)
    std = load_config(None, [f"model.hidden_size={h}", f"model.base_hidden_size={bh}"])
    assert multipliers(std.model) == multipliers(load_config(None, [CP]).model)  # all 1.0


@pytest.mark.parametrize(
    "overrides,key",
    [
        (["model.parameterization=completeP"], "model.parameterization"),
        ([CP, "model.base_hidden_size=0"], "model.base_hidden_size"),
        ([CP, "model.base_num_layers=-2"], "model.base_num_layers"),
        ([CP, "model.depth_alpha=1.5"], "model.depth_alpha"),
    ],
)
def test_bad_keys_are_rejected(overrides, key):
    with pytest.raises(ConfigError) as e:
        resolve(load_config(None, overrides))
    assert f"'{key}" in str(e.value)


def test_optimizer_groups_and_residual_scales(tmp_path):
    # base width 8 -> m_N = 4; base depth 2 -> m_L = 2, alpha = 1: residual x 0.5
    over = [CP, "model.base_hidden_size=8", "model.base_num_layers=2", "optim.weight_decay=0.1"]
    out = run_world(optimizer_groups, 1, (over, str(tmp_path)))[0]
    assert out["scales"] == [(0.5, 0.5)] * 4
    hidden = [n for n in out["groups"] if n.startswith("decoder.layers.") and "norm" not in n]
    assert len(hidden) == 4 * 4  # qkv, proj, fc1, fc2 per layer
    for name, (max_lr, min_lr, eps, wd) in out["groups"].items():
        if name in hidden:
            assert (max_lr, min_lr, eps) == pytest.approx((1e-3 / 4, 1e-4 / 4, 1e-8 / 4)), name
            assert wd == pytest.approx(0.1)
        else:  # embedding, output layer, norms: base values (norms: no weight decay)
            assert (max_lr, min_lr, eps) == pytest.approx((1e-3, 1e-4, 1e-8)), name
            assert wd == (0.0 if "norm" in name else pytest.approx(0.1)), name


def test_completep_at_base_shape_equals_standard(tmp_path):
    """Base = actual width/depth: bit-identical losses and parameters to the standard model."""
    at_base = [CP, "model.base_hidden_size=32", "model.base_num_layers=4"]
    std = run_world(train_capture, 1, ([], 3, str(tmp_path / "std")))[0]
    cp = run_world(train_capture, 1, (at_base, 3, str(tmp_path / "cp")))[0]
    assert cp["losses"] == std["losses"]
    for name, p in std["params"].items():
        assert torch.equal(cp["params"][name], p), name
    # and the comparison can fail: a different base changes the run
    off = [CP, "model.base_hidden_size=16", "model.base_num_layers=2"]
    moved = run_world(train_capture, 1, (off, 3, str(tmp_path / "off")))[0]
    assert moved["losses"][0] != std["losses"][0]  # residual scale changes the first forward
    assert moved["losses"][2] != std["losses"][2]
