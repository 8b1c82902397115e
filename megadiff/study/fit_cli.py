"""``megadiff fit scaling|mixing TABLE``: fit a scaling law or a data-mixing law to a CSV of runs.

    megadiff fit scaling runs.csv [--by modality] [--json] [--plot fit.png] [--bootstrap 200]
    megadiff fit mixing mix.csv [--weights text=1,image=1,audio=1] [--json] [--plot mix.png]

Table formats, formulas and outputs: docs/studies.md. Bad input exits 2 naming the file, column
or row and what to do.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from megadiff.study.table import (
    TableError,
    numeric_column,
    read_table,
    require_columns,
    require_points,
)

SCALING_COLUMNS = ["params", "tokens", "loss"]
PROPORTION_PREFIXES = ("p_", "proportion_")
LOSS_PREFIX = "val_loss_"
LOSS_EXCLUDED = ("val_loss_stream_",)  # per-stream losses are not modalities
PROPORTION_SUM_TOL = 1e-3


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="fit", metavar="LAW", required=True)
    s = sub.add_parser("scaling", help="L(N, D) = E + A/N^alpha + B/D^beta (Chinchilla-style)")
    s.add_argument("table", metavar="TABLE", help="CSV with columns params, tokens, loss")
    s.add_argument("--by", metavar="COLUMN", help="fit one law per value of COLUMN")
    s.add_argument("--bootstrap", type=int, default=200, help="bootstrap resamples (default 200)")
    s.add_argument("--seed", type=int, default=0, help="bootstrap seed (default 0)")
    _common(s)
    m = sub.add_parser("mixing", help="L_i(r) = c_i + k_i exp(sum_j t_ij r_j) per loss column")
    m.add_argument("table", metavar="TABLE", help="CSV with p_<name> and val_loss_<name> columns")
    m.add_argument(
        "--weights",
        metavar="M=W,...",
        help="target weights per loss, e.g. text=1,image=2 (default: 1 each)",
    )
    _common(m)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print the fit as JSON")
    p.add_argument("--plot", metavar="FILE.png", help="write a figure (.png, .pdf or .svg)")


def check_plot_path(plot: str | None) -> Path | None:
    from megadiff.training.plot import check_figure_path

    return None if plot is None else check_figure_path(plot, "--plot", TableError)


# ------------------------------------------------------------------------------------- scaling


def scaling_groups(args) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """``{group: (N, D, loss)}`` of the table (one group ``"all"`` without ``--by``)."""
    from megadiff.study.scaling import LAW_PARAMS

    header, rows = read_table(args.table)
    require_columns(args.table, header, SCALING_COLUMNS + ([args.by] if args.by else []))
    if args.bootstrap < 0:
        raise TableError(f"--bootstrap must be >= 0, got {args.bootstrap}")
    groups: dict[str, list[dict[str, str]]] = {}
    for row in rows:
        groups.setdefault(row[args.by] if args.by else "all", []).append(row)
    if not rows:
        require_points(args.table, 0, len(LAW_PARAMS), "")
    out = {}
    for name, group in groups.items():
        what = f" ({args.by}={name})" if args.by else ""
        cols = [numeric_column(args.table, group, c) for c in SCALING_COLUMNS]
        require_points(args.table, len(group), len(LAW_PARAMS), what)
        for col, values in zip(SCALING_COLUMNS[:2], cols[:2]):
            if len(np.unique(values)) < 2:
                raise TableError(
                    f"table '{args.table}'{what}: column '{col}' has a single value; the law needs "
                    f"at least 2 distinct values of {col} (better 3 or more)"
                )
        out[name] = tuple(cols)
    return out


def print_scaling(name: str, fit, params, tokens) -> None:
    res = fit.to_dict()
    print(f"[{name}] {fit.n_points} points, rms log-loss residual {fit.rmse_log:.4f}")
    note = "   (95% bootstrap interval)" if fit.n_boot else ""
    print(f"  L(N, D) = E + A/N^alpha + B/D^beta{note}")
    for k in ("E", "A", "B", "alpha", "beta"):
        ci = res[f"{k}_ci"]
        interval = f"   [{ci[0]:.4g}, {ci[1]:.4g}]" if ci else ""
        print(f"  {k:>6} = {res[k]:.4g}{interval}")
    co = res["compute_optimal"]
    ci_a = f" [{co['a_ci'][0]:.3f}, {co['a_ci'][1]:.3f}]" if co["a_ci"] else ""
    ci_b = f" [{co['b_ci'][0]:.3f}, {co['b_ci'][1]:.3f}]" if co["b_ci"] else ""
    print(f"  compute-optimal (C = 6ND): N* ∝ C^{co['a']:.3f}{ci_a}, D* ∝ C^{co['b']:.3f}{ci_b}")
    c_max = float(np.max(6.0 * params * tokens))
    n_opt, d_opt = fit.law.compute_optimal(c_max)
    print(f"  at the largest compute C={c_max:.3g}: N*={n_opt:.3g}, D*={d_opt:.3g}")
    for p in fit.isoflop:
        where = "" if p["inside_range"] else " (outside the sampled N: extrapolated)"
        n_law = float(fit.law.compute_optimal(p["compute"])[0])
        print(
            f"  IsoFLOP C={p['compute']:.3g}: N*={p['params_opt']:.3g} (law: {n_law:.3g}), "
            f"loss {p['loss_opt']:.4f}, {p['n_points']} points{where}"
        )
    if res["isoflop_a"] is not None:
        print(f"  IsoFLOP estimate of the exponent: N* ∝ C^{res['isoflop_a']:.3f}")


def plot_scaling(path: Path, data: dict, fits: dict) -> None:
    """Per fit: loss vs D per N with the law, residuals, and the IsoFLOP profiles if any."""
    from matplotlib.figure import Figure

    cols = 3 if any(f.isoflop for f in fits.values()) else 2
    fig = Figure(figsize=(5.5 * cols, 4 * len(fits)), layout="constrained")
    axes = fig.subplots(len(fits), cols, squeeze=False)
    for (name, (n, d, loss)), row in zip(data.items(), axes):
        fit = fits[name]
        law = fit.law
        ax, ax_res = row[0], row[1]
        for i, nv in enumerate(np.unique(n)):
            sel = n == nv
            color = f"C{i % 10}"
            ax.scatter(d[sel], loss[sel], color=color, s=14, label=f"N={nv:.3g}")
            dd = np.geomspace(d[sel].min(), d[sel].max(), 100)
            ax.plot(dd, law.loss(nv, dd), color=color, lw=1)
        ax.set(xscale="log", yscale="log", xlabel="tokens D", ylabel="loss", title=f"{name}: fit")
        ax.legend(fontsize=7, ncol=2)
        ax.grid(alpha=0.3, which="both")
        pred = law.loss(n, d)
        ax_res.scatter(pred, loss / pred - 1.0, s=14)
        ax_res.axhline(0.0, color="k", lw=0.8)
        ax_res.set(xscale="log", xlabel="predicted loss", ylabel="observed / predicted − 1")
        ax_res.set_title(f"{name}: residuals")
        ax_res.grid(alpha=0.3)
        if cols == 3:
            plot_isoflop(row[2], name, n, d, loss, fit)
    fig.savefig(path, dpi=110)


def plot_isoflop(ax, name: str, n, d, loss, fit) -> None:
    """Loss vs N at each IsoFLOP compute level: points, the parabola and its optimum."""
    from megadiff.study.scaling import ISOFLOP_RTOL

    c = 6.0 * n * d
    for i, p in enumerate(fit.isoflop):
        sel = np.abs(c / p["compute"] - 1.0) <= ISOFLOP_RTOL
        color = f"C{i % 10}"
        ax.scatter(n[sel], loss[sel], color=color, s=14, label=f"C={p['compute']:.2g}")
        x = np.linspace(np.log(n[sel].min()), np.log(n[sel].max()), 100)
        ax.plot(np.exp(x), np.polyval(p["parabola"], x), color=color, lw=1)
        ax.scatter([p["params_opt"]], [p["loss_opt"]], color=color, marker="*", s=80)
    ax.set(xscale="log", xlabel="params N", ylabel="loss", title=f"{name}: IsoFLOP (★ optimum)")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3, which="both")


def run_scaling(args) -> int:
    from megadiff.study.scaling import fit_scaling

    plot = check_plot_path(args.plot)
    data = scaling_groups(args)
    fits = {k: fit_scaling(*v, n_boot=args.bootstrap, seed=args.seed) for k, v in data.items()}
    if args.json:
        if args.by:
            out = {"by": args.by, "fits": {k: f.to_dict() for k, f in fits.items()}}
        else:
            out = fits["all"].to_dict()
        print(json.dumps(out, indent=2))
    else:
        for name, fit in fits.items():
            print_scaling(name, fit, *data[name][:2])
    if plot:
        plot_scaling(plot, data, fits)
        print(f"megadiff fit: wrote {plot}", file=sys.stderr)
    return 0


# -------------------------------------------------------------------------------------- mixing


def mixing_columns(path: str, header: list[str]) -> tuple[list[str], list[str], list[str]]:
    """``(proportion columns, their names, loss columns)`` of a mixing table."""
    props = [c for c in header if c.startswith(PROPORTION_PREFIXES)]
    losses = [c for c in header if c.startswith(LOSS_PREFIX) and not c.startswith(LOSS_EXCLUDED)]
    if len(props) < 2 or not losses:
        raise TableError(
            f"table '{path}' needs >= 2 proportion columns (p_<name> or proportion_<name>, "
            f"e.g. p_text,p_image,p_audio) and >= 1 loss column (val_loss_<modality>, e.g. "
            f"val_loss_text); it has: {', '.join(header)}"
        )
    names = [c.split("_", 1)[1] if c.startswith("p_") else c[len("proportion_") :] for c in props]
    if len(set(names)) < len(names):
        raise TableError(
            f"table '{path}' names a proportion twice ({', '.join(props)}); keep one column each"
        )
    return props, names, losses


def parse_weights(text: str | None, losses: list[str]) -> list[float]:
    names = [c[len(LOSS_PREFIX) :] for c in losses]
    if text is None:
        return [1.0] * len(names)
    weights = dict.fromkeys(names, 0.0)
    for item in text.split(","):
        key, sep, value = item.partition("=")
        key = key.strip()
        try:
            w = float(value)
        except ValueError:
            w = -1.0
        if not sep or key not in weights or not w >= 0:
            raise TableError(
                f"--weights {text}: '{item}' must be NAME=W with W >= 0 and NAME one of "
                f"{', '.join(names)} (the table's val_loss_<NAME> columns)"
            )
        weights[key] = w
    if not any(weights.values()):
        raise TableError(f"--weights {text}: at least one weight must be positive")
    return list(weights.values())


def mixing_inputs(args):
    from megadiff.study.mixing import n_params

    header, rows = read_table(args.table)
    props, names, losses = mixing_columns(args.table, header)
    weights = parse_weights(args.weights, losses)
    r = np.stack([numeric_column(args.table, rows, c, positive=False) for c in props], axis=1)
    if len(rows) == 0:
        require_points(args.table, 0, n_params(len(props)), "")
    for i, row in enumerate(r, start=1):
        if (row < 0).any() or abs(row.sum() - 1.0) > PROPORTION_SUM_TOL:
            raise TableError(
                f"table '{args.table}' row {i} (line {i + 1}): proportions {', '.join(props)} are "
                f"{', '.join(f'{v:g}' for v in row)} (sum {row.sum():g}); they must be >= 0 and "
                f"sum to 1 (normalise the row)"
            )
    ys = {c: numeric_column(args.table, rows, c) for c in losses}
    require_points(args.table, len(rows), n_params(len(props)), "")
    return names, r, ys, weights


def plot_mixing(path: Path, names, r, ys, laws) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(4.2 * (len(names) + 1), 4), layout="constrained")
    axes = fig.subplots(1, len(names) + 1)
    ax = axes[0]
    for i, (col, y) in enumerate(ys.items()):
        ax.scatter(laws[col].loss(r), y, s=12, color=f"C{i}", label=col)
    lo = min(float(y.min()) for y in ys.values())
    hi = max(float(y.max()) for y in ys.values())
    ax.plot([lo, hi], [lo, hi], color="k", lw=0.8)
    ax.set(xlabel="predicted loss", ylabel="observed loss", title="predicted vs observed")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    x = np.linspace(0.0, 1.0, 101)
    m = len(names)
    for j, (ax, name) in enumerate(zip(axes[1:], names)):
        # fitted curve along r_j = x with the other proportions equal
        line = np.tile(((1.0 - x) / (m - 1))[:, None], (1, m))
        line[:, j] = x
        for i, (col, y) in enumerate(ys.items()):
            ax.scatter(r[:, j], y, s=12, color=f"C{i}", alpha=0.5)
            ax.plot(x, laws[col].loss(line), color=f"C{i}", lw=1.2)
        ax.set(xlabel=f"proportion of {name}", ylabel="loss", title=f"loss vs {name}")
        ax.text(
            0.02, 0.02, "lines: fit, other proportions equal", transform=ax.transAxes, fontsize=7
        )
        ax.grid(alpha=0.3)
    fig.savefig(path, dpi=110)


def run_mixing(args) -> int:
    from megadiff.study.mixing import fit_mixing_law, optimal_mixture

    plot = check_plot_path(args.plot)
    names, r, ys, weights = mixing_inputs(args)
    laws, rms = {}, {}
    for col, y in ys.items():
        laws[col], rms[col] = fit_mixing_law(r, y)
    best, target = optimal_mixture(list(laws.values()), weights)
    out = {
        "proportions": names,
        "formula": "L_i(r) = c_i + k_i exp(sum_j t_ij r_j), sum_j t_ij = 0",
        "losses": {
            col: {
                "c": law.c,
                "k": law.k,
                "t": dict(zip(names, law.t)),
                "rms_rel_residual": rms[col],
            }
            for col, law in laws.items()
        },
        "weights": {col[len(LOSS_PREFIX) :]: w for col, w in zip(ys, weights)},
        "optimum": {
            "proportions": dict(zip(names, (float(v) for v in best))),
            "losses": {col: float(law.loss(best)[0]) for col, law in laws.items()},
            "target": target,
        },
        "n_points": len(r),
    }
    if args.json:
        print(json.dumps(out, indent=2))
    else:
        print(f"{len(r)} mixtures of {', '.join(names)}")
        for col, d in out["losses"].items():
            ts = " ".join(f"t_{n}={v:+.3f}" for n, v in d["t"].items())
            print(
                f"  {col}: c={d['c']:.4f} k={d['k']:.4f} {ts} "
                f"(rms rel. residual {d['rms_rel_residual']:.4f})"
            )
        opt = " ".join(f"{n}={v:.3f}" for n, v in out["optimum"]["proportions"].items())
        print(f"optimum of sum w_i L_i (weights {out['weights']}): {opt}, target {target:.4f}")
    if plot:
        plot_mixing(plot, names, r, ys, laws)
        print(f"megadiff fit: wrote {plot}", file=sys.stderr)
    return 0


def run(args: argparse.Namespace) -> int:
    try:
        return run_scaling(args) if args.fit == "scaling" else run_mixing(args)
    except TableError as e:
        print(f"megadiff fit {args.fit}: error: {e}", file=sys.stderr)
        return 2
