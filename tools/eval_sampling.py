"""Sweep sampler settings on a trained demo checkpoint; score vs NFE tables, plot, defaults.

    python tools/eval_sampling.py --ckpt runs/demo_tasks --out runs/eval [--tasks lookup,t2i]
    python tools/eval_sampling.py --ckpt runs/demo_tasks --budget     # accuracy per checkpoint
    python tools/eval_sampling.py --ckpt runs/demo_tasks --caches none,prefix,dual \
        --cache-block 2 --tasks arith,lookup,t2i     # accuracy per block KV cache
    python tools/eval_sampling.py --ckpt runs/demo --demo-scores      # `megadiff demo`'s score
    python tools/eval_sampling.py --ckpt runs/demo_sums_rows --frontier sums --gen-length 16 \
        --blocks 4 --n 200 --out runs/frontier    # heuristics' accuracy vs NFE, intervals

Per task, strategy x steps/threshold/entropy bound x temperature (x CFG for t2i/t2s) on fixed
prompts, scored with :mod:`megadiff.demo.scoring`. Tasks: ``arith`` (demo-style
arithmetic ``a+b=``, ``--gen-length`` text tokens), ``lookup`` (two definitions ``key=code`` and a
question ``key?``, as many tokens as a code has digits; both are ``megadiff generate --task
text``), ``sums`` (``megadiff demo``'s text task: the single-digit sums ``3+5=``, answered in
the 5 tokens they were trained with: two digits and three ``<eot>``), ``t2i`` and ``t2s`` (demo
captions). Writes to ``--out``:

* ``results.json``: one row per setting (score, mean NFE, seconds);
* ``tables.md``: score vs NFE per task and strategy, the proposed defaults, and the NFE reduction
  of ``threshold`` vs fixed-step ``confidence`` at equal score;
* ``score_vs_nfe.png``: the same as a plot;
* ``defaults.json``: per generation task, the proposal: the cheapest setting (lowest mean NFE)
  whose score is within ``--tolerance`` of the task's best (``megadiff generate --defaults``;
  copy it to ``megadiff/generation/defaults.json`` to ship it); ``text`` takes the ``lookup``
  proposal (its answers are the longest). A task whose best score is below ``--min-score``
  keeps its current default (the sweep cannot tell settings apart).
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megadiff.demo.evaluate import TEXT_GEN_LENGTH, digit_sum_prompts  # noqa: E402
from megadiff.demo.scoring import (  # noqa: E402
    SpeechScorer,
    arithmetic_prompts,
    lookup_answer,
    lookup_prompts,
    parse_leading_int,
    score_arithmetic,
    score_image,
    score_lookup,
)
from megadiff.diffusion.sampling import SamplerConfig  # noqa: E402
from megadiff.generation.api import generate  # noqa: E402
from megadiff.generation.load import GenerationBundle, load_for_generation  # noqa: E402
from megadiff.generation.settings import builtin_defaults  # noqa: E402
from megadiff.policy.evaluate import wilson  # noqa: E402

COUNT = ("confidence", "margin", "random")
GEN_TASK = {  # eval -> generate
    "arith": "text",
    "lookup": "text",
    "sums": "text",
    "t2i": "t2i",
    "t2s": "t2s",
}
DEFAULTS_FROM = {"lookup": "text", "t2i": "t2i", "t2s": "t2s"}  # generate defaults <- eval task
TEXT_TASKS = ("arith", "lookup", "sums")
SUM_TASKS = ("arith", "sums")  # answers read as a number, scored as arithmetic
# metrics whose NFE reduction is tabulated, per task
METRICS = {
    "arith": ["score", "agree"],
    "sums": ["score", "agree"],
    "lookup": ["score", "agree", "digit_acc"],
}
TEXT_GRID = dict(
    threshold=[0.3, 0.5, 0.7, 0.9, 0.99],
    entropy=[0.01, 0.1, 0.5, 2.0],
    temperature=[0.0, 1.0],
    cfg=[0.0],
)
GRIDS = {  # task -> settings swept
    "arith": dict(TEXT_GRID, steps=[1, 2, 4, 8]),
    "lookup": dict(TEXT_GRID, steps=[1, 2, 3, 6]),  # up to one step per digit
    "sums": dict(TEXT_GRID, steps=[1, 3]),  # of its 5 tokens (two digits, three <eot>)
    "t2i": dict(
        steps=[2, 4, 8, 16, 32],
        threshold=[0.3, 0.5, 0.7, 0.9],
        entropy=[0.1, 1.0, 5.0],
        temperature=[0.0, 1.0],
        cfg=[0.0, 2.0],
        cap=32,  # step cap of the adaptive strategies
    ),
    "t2s": dict(
        steps=[4, 16, 32],
        threshold=[0.3, 0.7],
        entropy=[1.0],
        temperature=[0.0, 1.0],
        cfg=[0.0, 2.0],
        cap=32,
    ),
}
QUICK = {  # a smoke-test grid (--quick)
    "arith": dict(steps=[1, 4], threshold=[0.9], entropy=[0.1], temperature=[0.0], cfg=[0.0]),
    "sums": dict(steps=[1, 3], threshold=[0.9], entropy=[], temperature=[0.0], cfg=[0.0]),
    "lookup": dict(steps=[1, 6], threshold=[0.9], entropy=[], temperature=[0.0], cfg=[0.0]),
    "t2i": dict(steps=[2], threshold=[0.5], entropy=[], temperature=[0.0], cfg=[0.0, 2.0], cap=4),
    "t2s": dict(steps=[2], threshold=[0.5], entropy=[], temperature=[1.0], cfg=[0.0], cap=4),
}


def settings(grid: dict) -> list[SamplerConfig]:
    """Every sampler setting of a grid (top-k 20 when sampling with temperature)."""
    out, cap = [], grid.get("cap")
    for t, s in itertools.product(grid["temperature"], grid["cfg"]):
        top_k = 20 if t > 0 else 0
        kw = dict(temperature=t, cfg_scale=s, top_k=top_k)
        out += [SamplerConfig(st, steps=n, **kw) for st in COUNT for n in grid["steps"]]
        kw["steps"] = cap
        out += [SamplerConfig("threshold", threshold=v, **kw) for v in grid["threshold"]]
        out += [SamplerConfig("entropy", entropy_bound=v, **kw) for v in grid["entropy"]]
    return out


def captions(n: int, seed: int) -> list[str]:
    from megadiff.demo.shapes import random_caption

    rng = np.random.default_rng(seed)
    return [random_caption(rng) for _ in range(n)]


class Evaluator:
    """Prompts and scoring of one task on one checkpoint."""

    def __init__(self, bundle: GenerationBundle, task: str, n: int, gen_length: int, seed: int):
        self.b, self.task, self.gen_length = bundle, task, gen_length
        if task == "arith":
            self.prompts = arithmetic_prompts(n, seed)
        elif task == "sums":  # the demo's text task: single-digit sums, two-digit answers
            sums = digit_sum_prompts()
            order = np.random.default_rng(seed).permutation(len(sums))
            self.prompts = [sums[i] for i in sorted(order[:n])]
            self.gen_length = TEXT_GEN_LENGTH
        elif task == "lookup":
            from megadiff.demo.data import one_token_words

            self.prompts = lookup_prompts(one_token_words(bundle.tokenizers["text"]), n, seed)
            self.gen_length = len(lookup_answer(self.prompts[0]))  # the code's digits
        else:
            self.prompts = captions(n, seed)
        self.speech = SpeechScorer(bundle.tokenizers["audio"]) if task == "t2s" else None
        self.reference: list | None = None  # text: answers of the 1-token-per-step greedy decode
        if task in TEXT_TASKS:
            slow = SamplerConfig("confidence", steps=self.gen_length)
            recs = self._generate(slow)
            self.reference = [self._answer(r["text"]) for r in recs]

    def _generate(self, c: SamplerConfig) -> list[dict]:
        n = len(self.prompts)
        return generate(
            self.b, GEN_TASK[self.task], self.prompts, c, list(range(n)), n, self.gen_length
        )

    def _answer(self, text: str):
        if self.task in SUM_TASKS:
            return parse_leading_int(text)
        return text[: self.gen_length]

    def run(self, c: SamplerConfig) -> dict:
        t0 = time.perf_counter()
        recs = self._generate(c)
        gen_s = time.perf_counter() - t0
        row = dict(task=self.task, **c.to_dict(), n=len(recs), seconds=gen_s)
        row["nfe"] = float(np.mean([r["nfe"] for r in recs]))
        if self.task in TEXT_TASKS:
            if self.task in SUM_TASKS:
                ok = [score_arithmetic(r["prompt"], r["text"]) for r in recs]
            else:
                ok = [score_lookup(r["prompt"], r["text"]) for r in recs]
                row["digit_acc"] = float(
                    np.mean([digit_accuracy(lookup_answer(r["prompt"]), r["text"]) for r in recs])
                )
            got = [self._answer(r["text"]) for r in recs]
            row["agree"] = float(np.mean([a == b for a, b in zip(got, self.reference)]))
            row["examples"] = [f"{r['prompt']}{r['text'][:8]!r}" for r in recs[:3]]
        elif self.task == "t2i":
            sc = [score_image(r["image"], r["prompt"]) for r in recs]
            ok = [s["correct"] for s in sc]
            row["color_acc"] = float(np.mean([s["color_ok"] for s in sc]))
            row["position_acc"] = float(np.mean([s["position_ok"] for s in sc]))
        else:
            cands = sorted(set(self.prompts))
            sc = [self.speech.score(r["codes"], r["prompt"], cands) for r in recs]
            ok = [s["correct"] for s in sc]
            row["lsd"] = float(np.mean([s["lsd"] for s in sc]))
        row["score"] = float(np.mean(ok))
        return row


def label(r: dict) -> str:
    s = r["strategy"]
    if s in COUNT:
        s += f" steps={r['steps']}"
    elif s == "threshold":
        s += f" tau={r['threshold']}"
    elif s == "entropy":
        s += f" gamma={r['entropy_bound']}"
    if s.split()[0] not in COUNT and r["steps"]:
        s += f" cap={r['steps']}"
    s += f" T={r['temperature']:g}"
    if r["cfg_scale"]:
        s += f" cfg={r['cfg_scale']:g}"
    return s


def propose(rows: list[dict], tolerance: float) -> dict:
    """The cheapest setting (mean NFE, then score) within ``tolerance`` of the best score."""
    best = max(r["score"] for r in rows)
    ok = [r for r in rows if r["score"] >= best - tolerance]
    return min(ok, key=lambda r: (r["nfe"], -r["score"]))


def nfe_reduction(rows: list[dict], slack: float = 0.02, key: str = "score") -> list[dict]:
    """For each threshold setting: the fewest NFE fixed-step ``confidence`` (same temperature and
    CFG) needs to reach its ``key`` (minus ``slack``), and the ratio; and the ratio to the
    most-steps ``confidence`` setting (the one-token-per-step baseline) when the threshold
    setting reaches that baseline's ``key`` (minus ``slack``)."""
    out = []
    for r in rows:
        if r["strategy"] != "threshold" or key not in r:
            continue
        fixed = [
            f
            for f in rows
            if f["strategy"] == "confidence"
            and f["temperature"] == r["temperature"]
            and f["cfg_scale"] == r["cfg_scale"]
        ]
        same = [f for f in fixed if f[key] >= r[key] - slack]
        f = min(same, key=lambda f: f["nfe"]) if same else None
        base = max(fixed, key=lambda f: f["nfe"]) if fixed else None
        base_ok = base is not None and r[key] >= base[key] - slack
        out.append(
            dict(
                threshold=label(r),
                key=key,
                score=r[key],
                nfe=r["nfe"],
                fixed=label(f) if f else None,
                fixed_score=f[key] if f else None,
                fixed_nfe=f["nfe"] if f else None,
                reduction=f["nfe"] / r["nfe"] if f else None,
                baseline=label(base) if base else None,
                baseline_score=base[key] if base else None,
                baseline_nfe=base["nfe"] if base else None,
                baseline_reduction=base["nfe"] / r["nfe"] if base_ok else None,
            )
        )
    return out


def digit_accuracy(code: str, generated: str) -> float:
    """Share of the code's digits the generated text has at the same place (a graded score)."""
    return sum(a == b for a, b in zip(code, generated)) / len(code)


def _extra_cells(task: str, r: dict) -> str:
    if task == "t2s":
        return f" {r['lsd']:.2f} |"
    if task == "t2i":
        return f" {r['color_acc']:.3f} | {r['position_acc']:.3f} |"
    if task == "lookup":
        return f" {r['agree']:.3f} | {r['digit_acc']:.3f} |"
    return f" {r['agree']:.3f} |"


def tables(results: dict, proposals: dict, meta: dict) -> str:
    lines = [f"# Sampler sweep: {meta['ckpt']} (step {meta['step']})", ""]
    lines.append(f"`{meta['command']}` ({meta['seconds']:.0f} s)")
    for task, rows in results.items():
        metric = {
            "arith": "arithmetic accuracy",
            "sums": "single-digit sums accuracy",
            "lookup": "lookup accuracy (exact code)",
            "t2i": "colour+position accuracy",
        }.get(task, "retrieval@1 (DTW-LSD nearest reference)")
        lines += ["", f"## {task}: {metric} vs NFE ({rows[0]['n']} prompts)", ""]
        if task in TEXT_TASKS:
            lines += [
                "`agree`: the answer equals that of the greedy one-token-per-step decode "
                "(`confidence`, steps = gen length).",
                "",
            ]
        extra = {
            "t2s": " LSD dB |",
            "t2i": " colour | position |",
            "lookup": " agree | digit accuracy (chance 0.1) |",
        }.get(task, " agree |")
        lines.append(f"| setting | score | mean NFE | s |{extra}")
        lines.append("| --- | --- | --- | --- |" + " --- |" * extra.count("|"))
        for r in sorted(rows, key=lambda r: (r["strategy"], r["temperature"], r["nfe"])):
            e = _extra_cells(task, r)
            lines.append(
                f"| {label(r)} | {r['score']:.3f} | {r['nfe']:.1f} | {r['seconds']:.1f} |{e}"
            )
        p = proposals[task]
        lines += [
            "",
            f"Proposed default: **{label(p)}** (score {p['score']:.3f}, NFE {p['nfe']:.1f})",
        ]
        if task in meta.get("kept_defaults", {}):
            lines[-1] += f"; not adopted ({meta['kept_defaults'][task]}: current default kept)"
        keys = METRICS.get(task, ["score"])
        red = [x for k in keys for x in nfe_reduction(rows, key=k) if x["reduction"] is not None]
        if red:
            lines += [
                "",
                "| metric | threshold | value | NFE | fewest-NFE fixed-step confidence reaching "
                "it | value | NFE | reduction | vs 1 token/step baseline (value, NFE) |",
            ]
            lines.append("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
            for x in red:
                b = x["baseline_reduction"]
                vs = f"{b:.1f}x" if b is not None else "below it"
                vs += f" ({x['baseline_score']:.3f}, {x['baseline_nfe']:.1f})"
                lines.append(
                    f"| {x['key']} | {x['threshold']} | {x['score']:.3f} | {x['nfe']:.1f} | "
                    f"{x['fixed']} | {x['fixed_score']:.3f} | {x['fixed_nfe']:.1f} | "
                    f"{x['reduction']:.1f}x | {vs} |"
                )
    return "\n".join(lines) + "\n"


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(5 * len(results), 4), squeeze=False)
    colours = dict(zip(["confidence", "margin", "random", "threshold", "entropy"], "bgkrm"))
    for ax, (task, rows) in zip(axes[0], results.items()):
        keys = sorted({(r["strategy"], r["temperature"], r["cfg_scale"]) for r in rows})
        for st, t, s in keys:
            rs = [
                r for r in rows if (r["strategy"], r["temperature"], r["cfg_scale"]) == (st, t, s)
            ]
            rs.sort(key=lambda r: r["nfe"])
            name = f"{st} T={t:g}" + (f" cfg={s:g}" if s else "")
            style = ("-" if t == 0 else "--") + ("o" if not s else "s")
            x, y = [r["nfe"] for r in rs], [r["score"] for r in rs]
            ax.plot(x, y, style, color=colours.get(st, "c"), label=name, ms=3, alpha=0.8)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("mean NFE per sample")
        ax.set_ylabel("score (solid: T=0, dashed: T=1; squares: CFG 2)")
        ax.set_title(task)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def to_defaults(row: dict) -> dict:
    keys = ("strategy", "steps", "threshold", "entropy_bound", "temperature", "top_k", "cfg_scale")
    d = {k: row[k] for k in keys}
    d["block_length"] = row["block_length"]
    return d


def budget(args: argparse.Namespace) -> int:
    """Greedy arithmetic, lookup and t2i accuracy of every checkpoint of a run."""
    from megadiff.checkpoint_files import list_checkpoints

    root = Path(args.ckpt)
    root = root / "checkpoints" if (root / "checkpoints").is_dir() else root
    cols = [
        ("arith", "confidence, 1 token/step", None),
        ("arith", "threshold 0.9", SamplerConfig("threshold", threshold=0.9)),
        ("lookup", "confidence, 1 token/step", None),
        ("lookup", "threshold 0.9", SamplerConfig("threshold", threshold=0.9)),
        ("t2i", "confidence, 16 steps", SamplerConfig("confidence", steps=16)),
    ]
    print("| step | tokens | " + " | ".join(f"{t} acc ({d})" for t, d, _ in cols) + " |")
    print("| --- | --- |" + " --- |" * len(cols))
    for _, path in list_checkpoints(root):
        b = load_for_generation(path)
        acc = []
        for task, _, c in cols:
            ev = Evaluator(b, task, args.n, args.gen_length, args.seed)
            r = ev.run(c or SamplerConfig("confidence", steps=ev.gen_length))
            cell = f"{r['score']:.3f}"
            acc.append(cell + (f" (digits {r['digit_acc']:.3f})" if "digit_acc" in r else ""))
        tokens = json.loads((Path(b.path) / "meta.json").read_text())["tokens"]
        cells = " | ".join(acc)
        print(f"| {b.step} | {tokens:,} | {cells} |", flush=True)
    return 0


def cache_compare(args: argparse.Namespace) -> int:
    """Score of greedy confidence decoding (one token per step, blocks of ``--cache-block``)
    per block KV cache, with the binomial interval of each score."""
    b = load_for_generation(args.ckpt)
    caches = args.caches.split(",")
    print("| task | cache | block | n | score | 95% interval | NFE | seconds |")
    print("| --- " * 8 + "|")
    for task in args.tasks.split(","):
        n = {"t2i": max(4, args.n // 2), "t2s": max(4, args.n // 4)}.get(task, args.n)
        ev = Evaluator(b, task, n, args.gen_length, args.seed)
        steps = ev.gen_length if task in TEXT_TASKS else 32
        for cache in caches:
            c = SamplerConfig("confidence", steps=steps, block_length=args.cache_block, cache=cache)
            r = ev.run(c)
            lo, hi = wilson(r["score"] * r["n"], r["n"])
            cells = f"{r['score']:.3f} | [{lo:.3f}, {hi:.3f}] | {r['nfe']:.1f} | {r['seconds']:.1f}"
            print(f"| {task} | {cache} | {args.cache_block} | {r['n']} | {cells} |", flush=True)
    return 0


def frontier_sweep(args: argparse.Namespace) -> int:
    """Accuracy vs mean NFE of the heuristics (and ``--policy``) on a policy task's held-out
    prompts, in full diffusion and in blocks of each ``--blocks`` length
    (``megadiff.policy.evaluate``): a markdown table per mode (frontier points in bold),
    ``frontier.json`` and ``frontier.png`` under ``--out``."""
    from megadiff.policy.evaluate import compare, table, to_json
    from megadiff.policy.tasks import check_expressible, load_task

    b = load_for_generation(args.ckpt)
    task = load_task(args.frontier, b.tokenizers.get("text"))
    check_expressible(task, b.tokenizers.get("text"), text_size=b.vocab.text_size)
    prompts = task.prompts("eval", args.n, args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    modes = [None] + [int(v) for v in args.blocks.split(",") if v.strip()]
    all_points, md = {}, []
    for block in modes:
        name = f"blocks of {block}" if block else "full diffusion"
        policies = []
        if args.policy:  # trained policies at the same settings, beside the heuristics
            from megadiff.policy.cli import load_policy_setting

            policies = [load_policy_setting(q, args.gen_length, block) for q in args.policy]
        points = compare(
            b, task, prompts, args.gen_length, block, policies=policies,
            log=lambda p, name=name: print(f"{name}: {p.row()}", flush=True),
        )  # fmt: skip
        all_points[name] = points
        md += [
            f"## {task.name}, {name}: gen length {args.gen_length}, {len(prompts)} held-out "
            f"prompts ({len(set(prompts))} distinct), greedy",
            "",
            table(points),
            "",
        ]
    (out / "frontier.md").write_text("\n".join(md))
    meta = dict(ckpt=str(b.path), step=b.step, task=task.name, gen_length=args.gen_length)
    modes_json = {k: json.loads(to_json(v, meta)) for k, v in all_points.items()}
    (out / "frontier.json").write_text(json.dumps(modes_json, indent=1) + "\n")
    plot_frontier(all_points, out / "frontier.png", f"{task.name}, gen length {args.gen_length}")
    print(f"wrote {out}/frontier.md, frontier.json, frontier.png")
    return 0


def plot_frontier(all_points: dict, path: Path, title: str) -> None:
    """Accuracy (95% interval bars) vs mean NFE, one panel per mode, one colour per strategy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = dict(zip(["confidence", "margin", "threshold", "entropy", "policy"], "bgrmk"))
    fig, axes = plt.subplots(1, len(all_points), figsize=(5 * len(all_points), 4), squeeze=False)
    for ax, (mode, points) in zip(axes[0], all_points.items()):
        for strategy in dict.fromkeys(p.strategy for p in points):
            ps = sorted((p for p in points if p.strategy == strategy), key=lambda p: p.nfe)
            x = [p.nfe for p in ps]
            y = [p.accuracy for p in ps]
            err = [[p.accuracy - p.low for p in ps], [p.high - p.accuracy for p in ps]]
            c = colours.get(strategy, "c")
            fmt = "o" if strategy == "policy" else "o-"  # policies: separate runs, no line
            ax.errorbar(x, y, yerr=err, fmt=fmt, color=c, label=strategy, ms=3, capsize=2)
            if strategy == "policy":  # which policy is which (their folders' names)
                for q in ps:
                    name = Path(q.label.removeprefix("policy ")).name
                    ax.annotate(name, (q.nfe, q.accuracy), fontsize=6, xytext=(4, -8),
                                textcoords="offset points")  # fmt: skip
        ax.set_xlabel("mean NFE per sample")
        ax.set_ylabel("accuracy (95% Wilson interval)")
        ax.set_title(f"{title}: {mode}", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def demo_scores(args: argparse.Namespace) -> int:
    """``megadiff demo``'s closing self-score (t2i, t2s, sums) of every checkpoint of a run."""
    from megadiff.checkpoint_files import list_checkpoints
    from megadiff.demo.evaluate import score_checkpoint

    root = Path(args.ckpt)
    root = root / "checkpoints" if (root / "checkpoints").is_dir() else root
    for step, path in list_checkpoints(root):
        s = score_checkpoint(path)
        print(f"step {step}: {s.line()} ({s.seconds:.0f}s)", flush=True)
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--ckpt", required=True, help="a checkpoint, a run's checkpoints/ or a run dir")
    p.add_argument(
        "--out", default="runs/eval_sampling", help="results.json, tables.md, plot, defaults.json"
    )
    p.add_argument("--tasks", default="arith,lookup,t2i,t2s", help=", ".join(GEN_TASK))
    p.add_argument("--n", type=int, default=64, help="prompts (t2i: half, t2s: a quarter)")
    p.add_argument("--gen-length", type=int, default=4, help="generated tokens (arith)")
    p.add_argument("--seed", type=int, default=1234, help="prompt seed (held fixed)")
    p.add_argument("--tolerance", type=float, default=0.02, help="score slack for the proposal")
    p.add_argument(
        "--min-score", type=float, default=0.5, help="adopt a proposal only at this score or above"
    )
    p.add_argument("--quick", action="store_true", help="tiny grid (smoke test)")
    p.add_argument("--budget", action="store_true", help="accuracy of every checkpoint of a run")
    p.add_argument("--replot", action="store_true", help="redraw --out's plot from results.json")
    p.add_argument("--caches", help="compare these block KV caches (e.g. none,prefix,dual)")
    p.add_argument("--cache-block", type=int, default=2, help="block length for --caches")
    p.add_argument(
        "--demo-scores",
        action="store_true",
        help="the demo's self-score (t2i, t2s, single-digit sums) of every checkpoint of a run",
    )
    p.add_argument(
        "--frontier",
        metavar="TASK",
        help="accuracy vs NFE of the heuristics on a policy task's held-out prompts (arith, "
        "lookup, sums, pick, FILE.jsonl): full diffusion and --blocks, Wilson intervals",
    )
    p.add_argument(
        "--blocks", default="", help="block lengths for --frontier besides full diffusion (4,8)"
    )
    p.add_argument(
        "--policy",
        action="append",
        help="--frontier: also a trained policy (folder or policy run; repeat for several)",
    )
    args = p.parse_args()
    if args.frontier:
        return frontier_sweep(args)
    if args.budget:
        return budget(args)
    if args.caches:
        return cache_compare(args)
    if args.demo_scores:
        return demo_scores(args)
    if args.replot:
        plot(
            json.loads((Path(args.out) / "results.json").read_text())["results"],
            Path(args.out) / "score_vs_nfe.png",
        )
        return 0
    t_start = time.time()
    b = load_for_generation(args.ckpt)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results, proposals = {}, {}
    tasks = args.tasks.split(",")
    bad = [t for t in tasks if t not in GEN_TASK]
    if bad:
        p.error(f"unknown task(s) {', '.join(bad)} (known: {', '.join(GEN_TASK)})")
    for task in tasks:
        n = {"t2i": max(4, args.n // 2), "t2s": max(4, args.n // 4)}.get(task, args.n)
        ev = Evaluator(b, task, n, args.gen_length, args.seed)
        rows = []
        for c in settings((QUICK if args.quick else GRIDS)[task]):
            r = ev.run(c)
            rows.append(r)
            more = f"  digits {r['digit_acc']:.3f}" if "digit_acc" in r else ""
            print(
                f"{task:6s} {label(r):40s} score {r['score']:.3f}  NFE {r['nfe']:5.1f}{more}",
                flush=True,
            )
        results[task] = rows
        proposals[task] = propose(rows, args.tolerance)
    meta = dict(
        ckpt=str(b.path),
        step=b.step,
        command="python tools/eval_sampling.py " + " ".join(sys.argv[1:]),
        seconds=time.time() - t_start,
        date=time.strftime("%Y-%m-%d"),
    )
    defaults = builtin_defaults()
    # a task too weak to tell settings apart keeps its shipped default
    kept = [t for t, r in proposals.items() if r["score"] < args.min_score and t in DEFAULTS_FROM]
    defaults.update(
        {
            DEFAULTS_FROM[t]: to_defaults(r)
            for t, r in proposals.items()
            if t in DEFAULTS_FROM and t not in kept
        }
    )
    meta["kept_defaults"] = {
        t: f"best score {proposals[t]['score']:.3f} < {args.min_score}" for t in kept
    }
    defaults["_source"] = f"tools/eval_sampling.py on {b.path} ({meta['date']})"
    (out / "defaults.json").write_text(json.dumps(defaults, indent=1) + "\n")
    reductions = {
        t: [x for k in METRICS.get(t, ["score"]) for x in nfe_reduction(rows, key=k)]
        for t, rows in results.items()
    }
    tree = dict(meta=meta, results=results, proposals=proposals, nfe_reduction=reductions)
    (out / "results.json").write_text(json.dumps(tree, indent=1) + "\n")
    (out / "tables.md").write_text(tables(results, proposals, meta))
    plot(results, out / "score_vs_nfe.png")
    print(f"wrote {out}/results.json, tables.md, score_vs_nfe.png, defaults.json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
