"""SDE batch rescaling: megadiff.optim.rescale and the ``megadiff rescale`` command.

Expected values are computed here in closed form, never through the code under test.
"""

from __future__ import annotations

import json
import math
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from megadiff.optim.rescale import (
    LogicalRecipe,
    OptimHParams,
    apply_kappa,
    critical_batch,
    rescale,
)

REPO = Path(__file__).resolve().parents[1]
H0 = OptimHParams(lr=3e-4, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1)


def logical(ref_batch=256, ref_tokens=10**9, gamma=0.44, **hp) -> LogicalRecipe:
    return LogicalRecipe(ref_batch, ref_tokens, **{**vars(H0), **hp}, gamma=gamma)


def close(a: float, b: float, rel: float = 1e-12) -> bool:
    return math.isclose(a, b, rel_tol=rel, abs_tol=0.0)


# ---------------------------------------------------------------- the rule


@pytest.mark.parametrize("gamma", [0.0, 0.44, 1.0])
def test_identity_at_kappa_one(gamma):
    lg = logical(gamma=gamma)
    p = rescale(lg, batch=256, tokens=10**9, seq_len=2048)
    assert p.kappa == 1.0
    assert (p.lr, p.beta1, p.beta2, p.eps, p.weight_decay) == (3e-4, 0.9, 0.95, 1e-8, 0.1)
    assert apply_kappa(H0, 1.0) == H0


def test_closed_form_example():
    # B/B0 = 4, D/D0 = 4, gamma = 0.5  ->  kappa = 4 * (1/4)^0.5 = 2
    p = rescale(logical(gamma=0.5), batch=1024, tokens=4 * 10**9, seq_len=2048)
    assert close(p.kappa, 2.0)
    assert close(p.lr, 4.242640687119285e-4)  # 3e-4 * sqrt(2)
    assert close(p.beta1, 0.81)  # 0.9 ** 2
    assert close(p.beta2, 0.9025)  # 0.95 ** 2
    assert close(p.eps, 7.071067811865476e-9)  # 1e-8 / sqrt(2)
    assert close(p.weight_decay, 0.1414213562373095)  # 0.1 * sqrt(2)


def test_matches_formula_on_random_recipes():
    rng = random.Random(0)
    for _ in range(200):
        b0, b = rng.randint(1, 4096), rng.randint(1, 4096)
        seq_len = rng.choice([128, 1024, 4096])
        d0 = b0 * seq_len * rng.randint(1, 10**6)
        d = b * seq_len * rng.randint(1, 10**6)
        gamma = rng.uniform(0.0, 1.0)
        p = rescale(logical(b0, d0, gamma), b, d, seq_len)
        kappa = math.exp(math.log(b / b0) + gamma * math.log(d0 / d))
        assert close(p.kappa, kappa, 1e-9)
        assert close(p.lr, 3e-4 * kappa**0.5, 1e-9)
        assert close(p.beta1, math.exp(kappa * math.log(0.9)), 1e-9)
        assert close(p.beta2, math.exp(kappa * math.log(0.95)), 1e-9)
        assert close(p.eps, 1e-8 * kappa**-0.5, 1e-9)
        assert close(p.weight_decay, 0.1 * kappa**0.5, 1e-9)


def test_gamma_zero_is_square_root_rule():
    for batch in (1, 64, 256, 1000, 8192):
        for tokens in (10**9, 7 * 10**9):  # gamma = 0: the horizon does not matter
            p = rescale(logical(gamma=0.0), batch, tokens, seq_len=2048)
            assert close(p.lr, 3e-4 * math.sqrt(batch / 256))
            assert close(p.kappa, batch / 256)
        # at a fixed horizon every gamma reduces to the square-root rule
        p = rescale(logical(gamma=0.44), batch, 10**9, seq_len=2048)
        assert close(p.lr, 3e-4 * math.sqrt(batch / 256))


def test_composition_apply_kappa():
    rng = random.Random(1)
    for _ in range(500):
        k1, k2 = 10 ** rng.uniform(-3, 3), 10 ** rng.uniform(-3, 3)
        two, one = apply_kappa(apply_kappa(H0, k1), k2), apply_kappa(H0, k1 * k2)
        for f in ("lr", "beta1", "beta2", "eps", "weight_decay"):
            assert close(getattr(two, f), getattr(one, f), 1e-9), (f, k1, k2)


def test_composition_through_recipes():
    # (B0, D0) -> (B1, D1) -> (B2, D2) equals (B0, D0) -> (B2, D2): the kappas multiply
    lg = logical(gamma=0.44)
    mid = rescale(lg, batch=96, tokens=3 * 10**9, seq_len=1024)
    two = rescale(mid.as_logical(), batch=2048, tokens=50 * 10**9, seq_len=1024)
    one = rescale(lg, batch=2048, tokens=50 * 10**9, seq_len=1024)
    assert close(mid.kappa, (96 / 256) * (1 / 3) ** 0.44)
    assert close(two.kappa, (2048 / 96) * (3 / 50) ** 0.44)
    assert close(one.kappa, (2048 / 256) * (1 / 50) ** 0.44)
    assert close(mid.kappa * two.kappa, one.kappa)
    for f in ("lr", "beta1", "beta2", "eps", "weight_decay"):
        assert close(getattr(two, f), getattr(one, f), 1e-12), f
    assert two.steps == one.steps


@pytest.mark.parametrize("beta", [1e-6, 0.1, 0.5, 0.9, 0.95, 0.999, 0.99999, 1 - 1e-12])
def test_betas_stay_strictly_inside_unit_interval(beta):
    rng = random.Random(2)
    kappas = [10 ** rng.uniform(-30, 30) for _ in range(2000)] + [1e-300, 1e-30, 1e30, 1e300]
    for kappa in kappas:
        hp = apply_kappa(OptimHParams(1e-3, beta, beta, 1e-8, 0.1), kappa)
        assert 0.0 < hp.beta1 < 1.0 and 0.0 < hp.beta2 < 1.0, (beta, kappa)


def test_beta_clamp_at_float_extremes():
    # naive beta ** kappa reaches the endpoints in float64 ...
    assert 0.9**1e-30 == 1.0 and 0.9**1e30 == 0.0
    # ... the documented clamp is the nearest double inside (0, 1)
    assert apply_kappa(H0, 1e-30).beta1 == 1.0 - 2.0**-53
    assert apply_kappa(H0, 1e30).beta1 == 2.0**-1074


# ---------------------------------------------------------------- steps and critical batch


@pytest.mark.parametrize(
    "tokens, seq_len, batch, steps",
    [
        (1_000_000, 1000, 10, 100),  # exact
        (1_000_001, 1000, 10, 101),  # rounded up
        (10_999, 1000, 10, 2),
        (6_400_000_000_000, 4096, 1536, 1_017_253),  # 3B recipe: 1017252.60... -> ceil
        (2**60, 2**12, 2**10, 2**38),  # exact with huge integers (no float rounding)
        (2**60 + 1, 2**12, 2**10, 2**38 + 1),
    ],
)
def test_steps_is_ceil_of_tokens_over_batch_tokens(tokens, seq_len, batch, steps):
    p = rescale(logical(ref_batch=1, ref_tokens=10**6), batch, tokens, seq_len)
    assert p.steps == steps
    assert tokens <= p.tokens_trained < tokens + seq_len * batch


def test_critical_batch_and_warning():
    assert critical_batch(4 * 10**11, 2048, 5e5) == 390.625  # D / (L * S_crit)
    lg = logical(ref_tokens=10**11)
    above = rescale(lg, 1024, 4 * 10**11, 2048, s_crit=5e5)
    assert above.batch_crit == 390.625
    assert len(above.warnings) == 1 and "critical batch" in above.warnings[0]
    below = rescale(lg, 256, 4 * 10**11, 2048, s_crit=5e5)
    assert below.batch_crit == 390.625 and below.warnings == []
    assert rescale(lg, 1024, 4 * 10**11, 2048).batch_crit is None  # no s_crit: no check


# ---------------------------------------------------------------- validation


@pytest.mark.parametrize(
    "arg, kwargs",
    [
        ("ref_batch", {"ref_batch": 0}),
        ("ref_batch", {"ref_batch": -4}),
        ("ref_batch", {"ref_batch": 2.5}),
        ("ref_tokens", {"ref_tokens": 0}),
        ("lr", {"lr": 0.0}),
        ("lr", {"lr": -1e-3}),
        ("lr", {"lr": float("nan")}),
        ("lr", {"lr": float("inf")}),
        ("beta1", {"beta1": 0.0}),
        ("beta1", {"beta1": 1.0}),
        ("beta2", {"beta2": 1.5}),
        ("beta2", {"beta2": -0.1}),
        ("eps", {"eps": 0.0}),
        ("eps", {"eps": -1e-8}),
        ("weight_decay", {"weight_decay": -0.1}),
        ("gamma", {"gamma": -0.44}),
    ],
)
def test_invalid_logical_recipe(arg, kwargs):
    with pytest.raises(ValueError, match=rf"^{arg} "):
        logical(**kwargs)


@pytest.mark.parametrize(
    "arg, batch, tokens, seq_len, s_crit",
    [
        ("batch", 0, 10**9, 2048, None),
        ("batch", -8, 10**9, 2048, None),
        ("tokens", 256, 0, 2048, None),
        ("tokens", 256, 256 * 2048 - 1, 2048, None),  # fewer than one batch
        ("seq_len", 256, 10**9, 0, None),
        ("s_crit", 256, 10**9, 2048, 0.0),
        ("s_crit", 256, 10**9, 2048, -5.0),
    ],
)
def test_invalid_physical_arguments(arg, batch, tokens, seq_len, s_crit):
    with pytest.raises(ValueError, match=rf"^{arg} "):
        rescale(logical(), batch, tokens, seq_len, s_crit=s_crit)


def test_reference_horizon_shorter_than_one_reference_batch():
    with pytest.raises(ValueError, match=r"^ref_tokens "):
        rescale(logical(ref_batch=256, ref_tokens=1000), 256, 10**9, 2048)


def test_one_batch_of_tokens_is_allowed():
    assert rescale(logical(), 256, 256 * 2048, 2048).steps == 1


# ---------------------------------------------------------------- CLI

BASE = ["rescale", "--ref-batch", "256", "--ref-tokens", "1e9", "--seq-len", "2048"]
BASE += ["--lr", "3e-4", "--batch", "1024", "--tokens", "4B", "--gamma", "0.5"]


def cli(monkeypatch, argv: list[str]) -> int:
    from megadiff.cli import main

    monkeypatch.setattr(sys, "argv", ["megadiff"])  # main() overwrites sys.argv; restore after
    try:
        return main(argv)
    except SystemExit as e:  # argparse errors
        return e.code


def test_cli_json_matches_library_and_formula(monkeypatch, capsys):
    assert cli(monkeypatch, [*BASE, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)  # exactly one JSON object on stdout
    lib = rescale(logical(gamma=0.5), 1024, 4 * 10**9, 2048)
    for k in ("kappa", "lr", "beta1", "beta2", "eps", "weight_decay", "steps", "batch", "tokens"):
        assert out[k] == getattr(lib, k), k
    assert close(out["kappa"], 2.0) and close(out["beta2"], 0.9025)
    assert out["steps"] == 1908  # ceil(4e9 / (2048 * 1024)) = ceil(1907.35)
    assert out["warnings"] == [] and out["logical"]["lr"] == 3e-4


def test_cli_table(monkeypatch, capsys):
    assert cli(monkeypatch, BASE) == 0
    out = capsys.readouterr().out
    rows = {line.split()[0]: line.split()[1:] for line in out.splitlines()[2:] if line.strip()}
    assert rows["beta1"] == ["0.9", "0.81"]
    assert rows["lr"] == ["0.0003", "0.000424264"]
    assert rows["kappa"] == ["1", "2"]
    # 1e9 / (2048 * 256) = 4e9 / (2048 * 1024) = 1907.35 -> 1908 in both columns
    assert rows["steps"] == ["1,908", "1,908"]
    for row in ("beta2", "eps", "weight_decay"):
        assert len(rows[row]) == 2


def test_cli_warns_above_critical_batch(monkeypatch, capsys):
    assert cli(monkeypatch, [*BASE, "--s-crit", "1e4", "--json"]) == 0
    captured = capsys.readouterr()
    out = json.loads(captured.out)
    assert out["batch_crit"] == 4e9 / (2048 * 1e4)
    assert out["warnings"] and "warning" in captured.err


@pytest.mark.parametrize(
    "extra, flag",
    [
        (["--batch", "0"], "--batch"),
        (["--ref-batch", "-1"], "--ref-batch"),
        (["--beta1", "1.0"], "--beta1"),
        (["--beta2", "0"], "--beta2"),
        (["--eps", "-1"], "--eps"),
        (["--weight-decay", "-0.1"], "--weight-decay"),
        (["--gamma", "-1"], "--gamma"),
        (["--lr", "nan"], "--lr"),
        (["--lr", "fast"], "--lr"),
        (["--tokens", "1000"], "--tokens"),  # fewer than one batch
        (["--tokens", "1.5"], "--tokens"),
        (["--seq-len", "0"], "--seq-len"),
        (["--s-crit", "0"], "--s-crit"),
    ],
)
def test_cli_bad_input_exits_2(monkeypatch, capsys, extra, flag):
    assert cli(monkeypatch, [*BASE, *extra]) == 2
    err = capsys.readouterr().err
    assert flag in err and "Traceback" not in err


def test_cli_missing_required_flag_exits_2(monkeypatch, capsys):
    assert cli(monkeypatch, BASE[:-6]) == 2  # no --batch
    assert "--batch" in capsys.readouterr().err


def test_cli_without_ref_tokens_is_the_batch_only_rule(monkeypatch, capsys):
    """No --ref-tokens: D0 = D (as optim.logical.ref_tokens: null), so kappa = B/B0 = 4."""
    argv = ["rescale", "--ref-batch", "256", "--seq-len", "2048", "--lr", "3e-4"]
    assert cli(monkeypatch, [*argv, "--batch", "1024", "--tokens", "4B", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["kappa"] == 4.0 and close(out["lr"], 6e-4)
    assert out["logical"]["ref_tokens"] == 4 * 10**9
    assert cli(monkeypatch, [*argv, "--batch", "1024"]) == 2  # no horizon at all
    err = capsys.readouterr().err
    assert "--tokens" in err and "--ref-tokens" in err and "Traceback" not in err


def test_cli_token_counts():
    from megadiff.optim.rescale_cli import count

    assert count("100B") == 10**11 and count("6.4T") == 6_400_000_000_000
    assert count("6.4e12") == 6_400_000_000_000 and count("1_000") == 1000
    assert count("2K") == 2000 and count("4096") == 4096


def test_cli_subprocess_exit_code():
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    argv = [sys.executable, "-m", "megadiff", *BASE]
    run = {"capture_output": True, "text": True, "env": env}
    ok = subprocess.run([*argv, "--json"], check=False, cwd=REPO, **run)
    assert ok.returncode == 0 and close(json.loads(ok.stdout)["kappa"], 2.0)
    bad = subprocess.run([*argv, "--batch", "-3"], check=False, **run)
    assert bad.returncode == 2
    assert "--batch" in bad.stderr and "Traceback" not in bad.stderr


def test_no_torch_import():
    # `megadiff rescale` must stay instant and usable without torch
    code = "import sys, megadiff.optim.rescale_cli; assert 'torch' not in sys.modules"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    subprocess.run([sys.executable, "-c", code], check=True, env=env)
