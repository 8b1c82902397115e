"""Benchmark tools' arithmetic, checked against independent counts."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from megadiff.config import load_config
from megadiff.model.reference import ReferenceConfig, ReferenceModel
from megadiff.plan import resolve

ROOT = Path(__file__).parents[1]


def _tool(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "tools" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_flops_per_token_counts_every_matmul_weight():
    bench = _tool("bench_mfu")
    cfg = resolve(load_config(None, ["model.num_query_groups=2", "model.num_layers=3"]), 1).cfg
    model = ReferenceModel(ReferenceConfig.from_model_config(cfg.model))
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    m = cfg.model
    attention = 12 * m.num_layers * m.hidden_size * m.seq_length
    assert bench.flops_per_token(cfg) == 6 * linear + attention


def _row(strategy: str, score: float, nfe: float, **kw) -> dict:
    r = dict(strategy=strategy, score=score, nfe=nfe, steps=None, threshold=0.9)
    r.update(entropy_bound=0.1, temperature=0.0, cfg_scale=0.0, top_k=0, block_length=None)
    r.update(kw)
    return r


def test_eval_sampling_proposal_and_nfe_reduction():
    ev = _tool("eval_sampling")
    rows = [
        _row("confidence", 0.50, 1.0, steps=1),
        _row("confidence", 0.80, 4.0, steps=4),
        _row("confidence", 0.90, 8.0, steps=8),
        _row("threshold", 0.89, 2.5, threshold=0.9),
        _row("threshold", 0.60, 1.2, threshold=0.5),
        _row("confidence", 0.95, 2.0, steps=2, temperature=1.0),  # another temperature
    ]
    # the cheapest within 0.02 of the best (0.95): only the T=1 row itself
    assert ev.propose(rows, 0.02) is rows[5]
    # within 0.1 of the best: 0.89 at 2.5 NFE beats 0.90 at 8
    assert ev.propose(rows[:5], 0.1) is rows[3]
    red = {x["threshold"]: x for x in ev.nfe_reduction(rows, slack=0.02)}
    hi = red["threshold tau=0.9 T=0"]
    assert hi["fixed"] == "confidence steps=8 T=0" and hi["reduction"] == 8.0 / 2.5
    lo = red["threshold tau=0.5 T=0"]  # 0.60 - 0.02 is first reached by 4 steps (0.80)
    assert lo["fixed_nfe"] == 4.0 and lo["reduction"] == 4.0 / 1.2
    # against the one-token-per-step baseline (8 steps, 0.90): 0.89 is within 0.02, 0.60 is not
    assert hi["baseline"] == "confidence steps=8 T=0" and hi["baseline_reduction"] == 8.0 / 2.5
    assert lo["baseline_reduction"] is None and lo["baseline_nfe"] == 8.0
    d = ev.to_defaults(rows[3])
    assert d["strategy"] == "threshold" and d["threshold"] == 0.9 and "score" not in d
    assert ev.digit_accuracy("123456", "123999\n") == 0.5 and ev.digit_accuracy("12", "") == 0.0
    assert len(ev.settings(ev.QUICK["arith"])) == 3 * 2 + 1 + 1  # 3 count strategies x 2 steps


def test_bench_sampler_interleaves_a_git_revision(monkeypatch, capsys):
    """The overhead table, one row per case, with the column of the sampler at another revision
    (here HEAD) timed in the same loop; an unknown revision is a clear error."""
    bench = _tool("bench_sampler")
    argv = ["bench_sampler", "--batch", "2", "--repeats", "1", "--against", "HEAD"]
    monkeypatch.setattr("sys.argv", argv)
    monkeypatch.setattr(bench, "CASES", bench.CASES[:1] + bench.CASES[-1:])
    assert bench.main() == 0
    out = capsys.readouterr().out.splitlines()
    rows = [r for r in out if r.startswith(("| text", "| t2i"))]
    assert len(rows) == 2
    for r in rows:
        cells = [c.strip() for c in r.strip("|").split("|")]
        assert len(cells) == 10
        shares = [float(c.rstrip("%")) for c in cells[5:9]]
        assert all(0 < s < 100 for s in shares), r
        assert float(cells[9]) > 0  # the other revision's total time
    monkeypatch.setattr("sys.argv", ["bench_sampler", "--against", "no-such-revision"])
    with pytest.raises(SystemExit, match="no-such-revision"):
        bench.main()
