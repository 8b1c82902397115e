"""optim.logical: the config's logical recipe becomes the physical optimizer."""

from __future__ import annotations

import math

import pytest

from megadiff.config import ConfigError, load_config
from megadiff.optim.recipe import report_lines
from megadiff.parallel.launch import run_world
from megadiff.plan import Plan
from megadiff.plan import resolve as resolve_plan
from tests.workers import optimizer_recipe

BASE = [
    "model.seq_length=64",
    "train.micro_batch=4",
    "optim.lr=2e-3",
    "optim.beta1=0.9",
    "optim.beta2=0.95",
    "optim.eps=1e-8",
    "optim.weight_decay=0.1",
]


def _cfg(*overrides: str) -> Plan:
    return resolve_plan(load_config(None, [*BASE, *overrides]))


def physical_and_report(plan: Plan):
    return plan.recipe.physical, report_lines(plan.recipe)


def resolve(plan: Plan):
    return plan.recipe


def _closed_form(b0, d0, b, d, gamma, lr=2e-3, b1=0.9, b2=0.95, eps=1e-8, wd=0.1):
    k = (b / b0) * (d0 / d) ** gamma
    return dict(
        lr=lr * k**0.5, beta1=b1**k, beta2=b2**k, eps=eps / k**0.5, weight_decay=wd * k**0.5
    )


@pytest.mark.parametrize(
    "b0,d0,b,steps,gamma",
    [(8, 64 * 8 * 100, 32, 25, 0.44), (8, 10**6, 32, 50, 0.44), (16, 10**5, 8, 300, 0.0)],
)
def test_physical_values_match_closed_form(b0, d0, b, steps, gamma):
    cfg = _cfg(
        f"optim.logical.ref_batch={b0}",
        f"optim.logical.ref_tokens={d0}",
        f"optim.logical.gamma={gamma}",
        f"train.global_batch={b}",
        f"train.steps={steps}",
    )
    hp, lines = physical_and_report(cfg)
    want = _closed_form(b0, d0, b, steps * b * 64, gamma)
    for k, v in want.items():
        assert getattr(hp, k) == pytest.approx(v, rel=1e-12), k
    assert any("kappa" in line for line in lines)


def test_ref_tokens_default_is_the_physical_horizon():
    hp, _ = physical_and_report(_cfg("optim.logical.ref_batch=4", "train.global_batch=16"))
    assert hp.lr == pytest.approx(2e-3 * 2) and hp.beta1 == pytest.approx(0.9**4)


def test_identity_at_reference_batch_and_horizon():
    steps, b = 30, 8
    cfg = _cfg(
        f"optim.logical.ref_batch={b}",
        f"optim.logical.ref_tokens={steps * b * 64}",
        f"train.global_batch={b}",
        f"train.steps={steps}",
    )
    res = resolve(cfg)
    assert res.physical == res.configured and res.recipe.kappa == 1.0


@pytest.mark.parametrize(
    "extra",
    [[], ["optim.logical=null"], ["optim.logical.ref_batch=2", "optim.logical.enabled=false"]],
)
def test_no_or_disabled_recipe_uses_optim_as_given(extra):
    res = resolve(_cfg("train.global_batch=8", *extra))
    assert res.logical is None and res.physical == res.configured
    assert res.physical.lr == 2e-3 and res.physical.beta2 == 0.95


def test_warns_above_critical_batch():
    # B_crit = D / (L * s_crit) = (10 * 32 * 64) / (64 * 20) = 16 < 32
    cfg = _cfg(
        "optim.logical.ref_batch=8",
        "optim.logical.s_crit=20",
        "train.global_batch=32",
        "train.steps=10",
    )
    _, lines = physical_and_report(cfg)
    assert sum("WARNING" in line and "critical batch 16" in line for line in lines) == 1
    ok = _cfg("optim.logical.ref_batch=8", "optim.logical.s_crit=5", "train.steps=10")
    assert not any("WARNING" in line for line in physical_and_report(ok)[1])


BAD = [
    (["optim.logical.ref_bach=8"], "optim.logical.ref_batch"),  # typo: suggestion
    (["optim.logical.enabled=true"], "optim.logical.ref_batch"),  # required
    (["optim.logical.ref_batch=0"], "optim.logical.ref_batch"),
    (["optim.logical.ref_batch=two"], "optim.logical.ref_batch"),
    (["optim.logical.ref_batch=8", "optim.logical.ref_tokens=100"], "optim.logical.ref_tokens"),
    (["optim.logical.ref_batch=8", "optim.logical.gamma=-0.5"], "optim.logical.gamma"),
    (["optim.logical.ref_batch=8", "optim.logical.s_crit=0"], "optim.logical.s_crit"),
    (["optim.logical=3"], "optim.logical"),
]


@pytest.mark.parametrize("overrides,key", BAD, ids=[f"{b[1]}{i}" for i, b in enumerate(BAD)])
def test_bad_logical_keys_are_rejected(overrides, key):
    with pytest.raises(ConfigError) as e:
        resolve_plan(load_config(None, [*BASE, *overrides]))
    assert f"'{key}" in str(e.value), str(e.value)


def test_yaml_section(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("optim:\n  lr: 1e-3\n  logical:\n    ref_batch: 2\n    gamma: 0\n")
    cfg = resolve_plan(load_config(p, ["train.global_batch=8", "train.micro_batch=4"]))
    assert physical_and_report(cfg)[0].lr == pytest.approx(1e-3 * 2)


def test_trainer_builds_the_physical_optimizer(tmp_path):
    """A real Trainer: megatron-core optimizer + scheduler carry the rescaled values."""
    # TINY: seq 16, global batch 4, lr 1e-3; logical at B0 = 1, horizon unchanged -> kappa = 4
    out = run_world(
        optimizer_recipe,
        1,
        (["optim.logical.ref_batch=1", "optim.weight_decay=0.1"], str(tmp_path)),
    )[0]
    k = 4.0
    assert out["max_lr"] == pytest.approx(1e-3 * math.sqrt(k))
    assert out["min_lr"] == pytest.approx(1e-3 * math.sqrt(k) * 0.1)
    assert [tuple(b) for b in out["betas"]] == [pytest.approx((0.9**k, 0.95**k))]
    assert list(out["eps"]) == [pytest.approx(1e-8 / math.sqrt(k))]
    assert sorted(out["wd"]) == [0.0, pytest.approx(0.1 * math.sqrt(k))]  # norms: no decay
    assert "kappa = 4" in out["log"] and "physical" in out["log"]
    plain = run_world(optimizer_recipe, 1, ([], str(tmp_path / "plain")))[0]
    assert plain["max_lr"] == pytest.approx(1e-3)
    assert "optim:" not in plain["log"]  # the table only for a logical recipe
