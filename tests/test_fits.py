"""``megadiff fit scaling|mixing``: the fits recover known laws from noisy synthetic tables.

The tables are generated here with numpy from fixed constants (multiplicative Gaussian noise);
expected values (true parameters, the true compute-optimal split, the true optimal mixture by a
dense grid search) are computed here, never through the code under test.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from megadiff.cli import main
from megadiff.study.mixing import fit_mixing_law, optimal_mixture
from megadiff.study.scaling import fit_scaling

# Hoffmann et al. 2022's fitted law, as the "truth"
TRUE = {"E": 1.69, "A": 406.4, "B": 410.7, "alpha": 0.34, "beta": 0.28}
NOISE = 0.005  # 0.5% multiplicative
# three losses of three proportions (text, image, audio); t sums to 0 per loss (the fit's gauge)
NAMES = ("text", "image", "audio")
MIX_TRUE = {
    "text": (2.0, 1.5, (-2.0, 1.0, 1.0)),
    "image": (3.0, 0.8, (1.0, -1.5, 0.5)),
    "audio": (1.0, 0.6, (0.5, 0.5, -1.0)),
}
MIX_NOISE = 0.002


def true_loss(n, d):
    t = TRUE
    return t["E"] + t["A"] / n ** t["alpha"] + t["B"] / d ** t["beta"]


def scaling_table(seed: int = 1, points: int = 6):
    """N x D grid (same ratio per step on both axes, so its diagonals have equal compute)."""
    rng = np.random.default_rng(seed)
    n, d = (
        g.ravel()
        for g in np.meshgrid(np.geomspace(1e7, 1e10, points), np.geomspace(1e9, 1e12, points))
    )
    loss = true_loss(n, d) * (1 + NOISE * rng.standard_normal(n.size))
    return n, d, loss


def write_scaling_csv(path: Path, groups=("all",)) -> Path:
    lines = ["params,tokens,loss,modality"]
    for i, g in enumerate(groups):
        n, d, loss = scaling_table(seed=1 + i)
        lines += [f"{a:.0f},{b:.0f},{c:.6f},{g}" for a, b, c in zip(n, d, loss)]
    path.write_text("\n".join(lines) + "\n")
    return path


def simplex_grid(step: int = 10) -> np.ndarray:
    return np.array(
        [
            (a / step, b / step, 1 - (a + b) / step)
            for a in range(step + 1)
            for b in range(step + 1 - a)
        ]
    )


def mix_true_loss(name, r):
    c, k, t = MIX_TRUE[name]
    return c + k * np.exp(np.asarray(r) @ np.asarray(t))


def write_mixing_csv(path: Path, prefix: str = "p_") -> Path:
    rng = np.random.default_rng(0)
    r = simplex_grid()
    cols = [f"{prefix}{n}" for n in NAMES] + ["val_loss"] + [f"val_loss_{n}" for n in NAMES]
    cols += ["val_loss_stream_web"]
    lines = ["run," + ",".join(cols)]
    for i, row in enumerate(r):
        losses = [mix_true_loss(n, row) * (1 + MIX_NOISE * rng.standard_normal()) for n in NAMES]
        vals = [*row, np.mean(losses), *losses, 9.0]
        lines.append(f"run{i}," + ",".join(f"{v:.6f}" for v in vals))
    path.write_text("\n".join(lines) + "\n")
    return path


def run_cli(monkeypatch, capsys, *argv) -> tuple[int, str, str]:
    monkeypatch.setattr(sys, "argv", [sys.argv[0]])
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def assert_png(path: Path) -> None:
    from matplotlib.image import imread

    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert path.stat().st_size > 20_000
    img = imread(path)
    assert img.shape[0] > 300 and img.shape[1] > 600
    assert img[..., :3].std() > 0.05  # not a blank canvas


# ---------------------------------------------------------------------------- scaling


def test_scaling_recovers_known_law():
    n, d, loss = scaling_table()
    fit = fit_scaling(n, d, loss, n_boot=200, seed=0)
    law = fit.law
    # tolerances: exponents within 0.05 absolute, E within 5%, every truth inside its 95% interval
    assert abs(law.alpha - TRUE["alpha"]) < 0.05
    assert abs(law.beta - TRUE["beta"]) < 0.05
    assert abs(law.E / TRUE["E"] - 1) < 0.05
    for k, v in TRUE.items():
        lo, hi = fit.ci[k]
        assert lo <= v <= hi, (k, v, fit.ci[k])
    # compute-optimal exponents a = beta/(alpha+beta), b = 1 - a, within 0.03 and inside intervals
    a_true = TRUE["beta"] / (TRUE["alpha"] + TRUE["beta"])
    a, b = law.exponents
    assert abs(a - a_true) < 0.03 and abs(b - (1 - a_true)) < 0.03
    assert fit.ci["a"][0] <= a_true <= fit.ci["a"][1]
    # the log residuals are at the noise level
    assert fit.rmse_log < 2 * NOISE


def test_isoflop_profiles_find_the_true_optimum():
    n, d, loss = scaling_table()
    profiles = fit_scaling(n, d, loss, n_boot=0).isoflop
    assert len(profiles) >= 3  # diagonals of the 6x6 grid with >= 3 points
    t = TRUE
    g = (t["alpha"] * t["A"] / (t["beta"] * t["B"])) ** (1 / (t["alpha"] + t["beta"]))
    a_true = t["beta"] / (t["alpha"] + t["beta"])
    for p in profiles:
        if p["inside_range"]:
            n_true = g * (p["compute"] / 6) ** a_true
            # a parabola in log N over a coarse profile: within 35% of the exact optimum
            assert abs(np.log(p["params_opt"] / n_true)) < np.log(1.35), (p, n_true)


def test_fit_scaling_cli_json_and_plot(tmp_path, monkeypatch, capsys):
    csv = write_scaling_csv(tmp_path / "runs.csv")
    png = tmp_path / "fit.png"
    code, out, _ = run_cli(
        monkeypatch,
        capsys,
        "fit",
        "scaling",
        str(csv),
        "--json",
        "--plot",
        str(png),
        "--bootstrap",
        "50",
    )
    assert code == 0
    result = json.loads(out)
    for k in ("E", "A", "B", "alpha", "beta"):
        assert isinstance(result[k], float)
        lo, hi = result[f"{k}_ci"]
        assert lo <= hi
    assert abs(result["alpha"] - TRUE["alpha"]) < 0.05
    assert result["n_points"] == 36 and result["bootstrap_resamples"] == 50
    assert 0 < result["compute_optimal"]["a"] < 1
    assert abs(result["compute_optimal"]["a"] + result["compute_optimal"]["b"] - 1) < 1e-9
    assert result["isoflop"] and result["isoflop_a"] is not None
    # N*(C) = G (C/6)^a minimises the fitted law along C = 6 N D (dense grid search here)
    c = 1e21
    n_grid = np.geomspace(1e7, 1e12, 200_001)
    r = result
    along = r["E"] + r["A"] / n_grid ** r["alpha"] + r["B"] / (c / (6 * n_grid)) ** r["beta"]
    n_best = n_grid[np.argmin(along)]
    co = result["compute_optimal"]
    assert abs(co["G"] * (c / 6) ** co["a"] / n_best - 1) < 1e-3
    assert_png(png)


def test_fit_scaling_by_group(tmp_path, monkeypatch, capsys):
    csv = write_scaling_csv(tmp_path / "runs.csv", groups=("text", "image"))
    code, out, _ = run_cli(
        monkeypatch,
        capsys,
        "fit",
        "scaling",
        str(csv),
        "--by",
        "modality",
        "--json",
        "--bootstrap",
        "0",
    )
    assert code == 0
    result = json.loads(out)
    assert result["by"] == "modality" and set(result["fits"]) == {"text", "image"}
    for fit in result["fits"].values():
        assert fit["alpha_ci"] is None  # no resamples, no intervals
        assert fit["n_points"] == 36
        assert abs(fit["beta"] - TRUE["beta"]) < 0.05


# ----------------------------------------------------------------------------- mixing


def true_optimum(weights) -> np.ndarray:
    r = simplex_grid(step=400)
    target = sum(w * mix_true_loss(n, r) for n, w in zip(NAMES, weights))
    return r[np.argmin(target)]


def test_mixing_recovers_known_law_and_optimum():
    rng = np.random.default_rng(0)
    r = simplex_grid()
    laws = []
    for name in NAMES:
        c, k, t = MIX_TRUE[name]
        y = mix_true_loss(name, r) * (1 + MIX_NOISE * rng.standard_normal(len(r)))
        law, rms = fit_mixing_law(r, y)
        # tolerances: c within 2%, k within 5%, each t within 0.1, residual at the noise level
        assert abs(law.c / c - 1) < 0.02, (name, law)
        assert abs(law.k / k - 1) < 0.05, (name, law)
        assert np.abs(np.asarray(law.t) - t).max() < 0.1, (name, law)
        assert rms < 2 * MIX_NOISE
        laws.append(law)
    for weights in ((1, 1, 1), (0.2, 1, 3)):
        best, _ = optimal_mixture(laws, list(weights))
        assert abs(best.sum() - 1) < 1e-9 and (best >= 0).all()
        assert np.abs(best - true_optimum(weights)).max() < 0.02, (weights, best)


@pytest.mark.parametrize("prefix", ["p_", "proportion_"])
def test_fit_mixing_cli_json_and_plot(tmp_path, monkeypatch, capsys, prefix):
    csv = write_mixing_csv(tmp_path / "mix.csv", prefix)
    png = tmp_path / "mix.png"
    weights = "text=0.2,image=1,audio=3"
    code, out, _ = run_cli(
        monkeypatch,
        capsys,
        "fit",
        "mixing",
        str(csv),
        "--weights",
        weights,
        "--json",
        "--plot",
        str(png),
    )
    assert code == 0
    result = json.loads(out)
    assert result["proportions"] == list(NAMES)
    # val_loss (overall) and val_loss_stream_* are not modality losses
    assert set(result["losses"]) == {f"val_loss_{n}" for n in NAMES}
    assert abs(result["losses"]["val_loss_image"]["c"] - 3.0) < 0.06
    assert result["weights"] == {"text": 0.2, "image": 1.0, "audio": 3.0}
    best = np.array([result["optimum"]["proportions"][n] for n in NAMES])
    assert np.abs(best - true_optimum((0.2, 1, 3))).max() < 0.02
    assert_png(png)


# -------------------------------------------------------------------------- bad input


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_bad_scaling_tables(tmp_path, monkeypatch, capsys):
    def err(*argv):
        code, _, e = run_cli(monkeypatch, capsys, "fit", "scaling", *argv, "--bootstrap", "0")
        assert code == 2, e
        return e

    missing = tmp_path / "nope.csv"
    assert "nope.csv' does not exist" in err(str(missing))
    t = write(tmp_path / "cols.csv", "params,loss\n1e7,3.0\n")
    e = err(str(t))
    assert "lacks column(s) tokens" in e and "expected columns: params, tokens, loss" in e
    t = write(tmp_path / "nan.csv", "params,tokens,loss\n1e7,1e9,3.0\n1e8,abc,2.9\n")
    e = err(str(t))
    assert "row 2 (line 3)" in e and "'tokens' is 'abc'" in e and "positive number" in e
    t = write(tmp_path / "neg.csv", "params,tokens,loss\n1e7,1e9,-3.0\n")
    assert "row 1 (line 2): column 'loss' is '-3.0'" in err(str(t))
    rows = "\n".join(f"{10 ** (7 + i)},{10 ** (9 + i)},{3 - 0.1 * i}" for i in range(4))
    t = write(tmp_path / "few.csv", "params,tokens,loss\n" + rows + "\n")
    e = err(str(t))
    assert "has 4 row(s)" in e and "needs at least 5 rows" in e
    rows = "\n".join(f"1e8,{10 ** (9 + i)},{3 - 0.1 * i}" for i in range(6))
    t = write(tmp_path / "oneN.csv", "params,tokens,loss\n" + rows + "\n")
    assert "column 'params' has a single value" in err(str(t))
    t = write_scaling_csv(tmp_path / "ok.csv")
    assert "lacks column(s) width" in err(str(t), "--by", "width")
    rows = t.read_text().splitlines()
    t = write(
        tmp_path / "bygroup.csv", "\n".join(rows + [r.replace(",all", ",tiny") for r in rows[1:4]])
    )
    e = err(str(t), "--by", "modality")
    assert "(modality=tiny) has 3 row(s)" in e and "needs at least 5 rows" in e
    assert "use a .png" in err(str(t), "--plot", str(tmp_path / "fit.jpg"))


def test_bad_mixing_tables(tmp_path, monkeypatch, capsys):
    def err(*argv):
        code, _, e = run_cli(monkeypatch, capsys, "fit", "mixing", *argv)
        assert code == 2, e
        return e

    assert "does not exist" in err(str(tmp_path / "nope.csv"))
    t = write(tmp_path / "cols.csv", "p_text,val_loss_text\n1,3\n")
    assert "needs >= 2 proportion columns" in err(str(t))
    t = write(tmp_path / "sum.csv", "p_text,p_image,val_loss_text\n0.5,0.5,3\n0.5,0.6,3\n")
    e = err(str(t))
    assert "row 2 (line 3)" in e and "sum 1.1" in e and "sum to 1" in e
    t = write(tmp_path / "twice.csv", "p_text,proportion_text,val_loss_text\n0.5,0.5,3\n")
    assert "names a proportion twice" in err(str(t))
    t = write(tmp_path / "extra.csv", "p_text,p_image,val_loss_text\n0.5,0.5,3,7\n")
    assert "row 1 (line 2) has more cells than the header" in err(str(t))
    t = write(tmp_path / "few.csv", "p_text,p_image,val_loss_text\n0.5,0.5,3\n0.2,0.8,3.1\n")
    assert "needs at least 3 rows" in err(str(t))
    t = write(tmp_path / "nan.csv", "p_text,p_image,val_loss_text\n0.5,0.5,\n")
    assert "row 1 (line 2): column 'val_loss_text' is ''" in err(str(t))
    t = write_mixing_csv(tmp_path / "ok.csv")
    e = err(str(t), "--weights", "text=1,video=2")
    assert "'video=2'" in e and "text, image, audio" in e
    assert "at least one weight must be positive" in err(str(t), "--weights", "text=0")


def test_fit_exit_code_from_the_command_line(tmp_path):
    import subprocess

    repo = Path(__file__).resolve().parents[1]
    proc = subprocess.run(
        [sys.executable, "-m", "megadiff", "fit", "scaling", str(tmp_path / "none.csv")],
        capture_output=True,
        text=True,
        cwd=repo,
        env={**__import__("os").environ, "PYTHONPATH": str(repo)},
    )
    assert proc.returncode == 2 and "does not exist" in proc.stderr
