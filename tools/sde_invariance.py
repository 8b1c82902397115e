"""Does the SDE batch rescaling rule keep training dynamics invariant to the batch size?

    python tools/sde_invariance.py [--out runs/sde_invariance] [--steps-at-max 100] [--seeds 3]

Trains the tiny model (examples/tiny_cpu.yaml, scaled down) at B0, 4*B0 and 16*B0 sequences per
step over the same number of tokens D, once with the hyper-parameters rescaled by the rule
(``optim.logical`` at ref_batch = B0, ref_tokens = D, so kappa = B / B0) and once naively (the
B0 values unchanged). Every run is evaluated on the same held-out set with the same masking
noise. Writes ``curves.png`` (eval loss vs tokens), ``results.json`` and prints the final-loss
gaps to the B0 run. Gradient clipping is off (it is not part of the SDE rule).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megadiff.parallel.launch import run_world  # noqa: E402

MODEL = [
    "model.num_layers=2",
    "model.hidden_size=64",
    "model.num_attention_heads=4",
    "model.ffn_hidden_size=192",
    "model.vocab_size=512",
    "model.seq_length=32",
    "optim.beta1=0.9",
    "optim.beta2=0.95",
    "optim.eps=1e-8",
    "optim.weight_decay=0.0",
    "optim.clip_grad=0",
    "optim.schedule=cosine",
    "logging.progress=false",
]


@torch.no_grad()
def eval_loss(trainer, n_batches: int, batch: int) -> float:
    """ELBO loss on a fixed held-out set with fixed noise (the same for every run)."""
    from megadiff.model.gather import unwrap

    model = unwrap(trainer.model[0])
    model.eval()
    total = torch.zeros(2)
    for i in range(n_batches):
        data = trainer.source.batch(10**9 + i * batch, batch)
        gen = torch.Generator().manual_seed(4242 + i)
        noised = trainer.objective.corrupt(data["tokens"], data["modality"], gen)
        _, stats = trainer.objective.loss(model(noised.inputs, noised.attention_mask), noised)
        total += stats[:2].cpu()
    model.train()
    return float(total[0] / total[1])


def train_one(overrides: list[str], run_dir: str, templates: int, evals: int) -> dict:
    """One run (a 1-rank world): per-step train loss and ``evals`` eval points."""
    from megadiff.config import load_config
    from megadiff.data.synthetic import SyntheticSource
    from megadiff.parallel.state import destroy_distributed
    from megadiff.plan import resolve
    from megadiff.training.trainer import Trainer

    plan = resolve(load_config(None, [*MODEL, f"run.dir={run_dir}", *overrides]), 1)
    trainer = Trainer(plan)
    cfg = plan.cfg
    m = cfg.model
    trainer.source = SyntheticSource(m.vocab_size, m.seq_length, cfg.train.seed, templates)
    at = {round(k * cfg.train.steps / evals) for k in range(1, evals + 1)}
    train, ev = [], [(0, eval_loss(trainer, 8, 32))]
    t0 = time.perf_counter()
    while trainer.step < cfg.train.steps:
        rec = trainer.train_step()
        train.append((rec["tokens"], rec["loss"]))
        if trainer.step in at:
            ev.append((rec["tokens"], eval_loss(trainer, 8, 32)))
    hp = trainer.optimizer.param_groups[0]
    out = {
        "train": train,
        "eval": ev,
        "seconds": time.perf_counter() - t0,
        "betas": list(hp["betas"]),
        "eps": hp["eps"],
        "max_lr": trainer.scheduler.max_lr,
    }
    destroy_distributed()
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/sde_invariance", help="runs and results.json")
    p.add_argument("--ref-batch", type=int, default=8, help="B0, sequences")
    p.add_argument("--lr", type=float, default=1e-3, help="logical lr at B0")
    p.add_argument("--steps-at-max", type=int, default=100, help="steps of the 16*B0 run")
    p.add_argument("--seeds", type=int, default=3, help="runs per batch size and mode")
    p.add_argument("--templates", type=int, default=256, help="synthetic documents")
    p.add_argument("--evals", type=int, default=12, help="eval points per run")
    args = p.parse_args()
    os.makedirs(args.out, exist_ok=True)
    b0, seq = args.ref_batch, 32
    tokens = args.steps_at_max * 16 * b0 * seq
    runs: dict[str, list[dict]] = {}
    for seed in range(args.seeds):
        for mult in (1, 4, 16):
            batch = b0 * mult
            for mode in ("rescaled", "naive") if mult > 1 else ("reference",):
                common = [
                    f"train.seed={1234 + seed}",
                    f"train.global_batch={batch}",
                    f"train.micro_batch={min(batch, 32)}",
                    f"train.steps={tokens // (batch * seq)}",
                    f"optim.lr={args.lr}",
                    f"optim.warmup_tokens={tokens // 20}",
                ]
                if mode == "rescaled":
                    common += [
                        f"optim.logical.ref_batch={b0}",
                        f"optim.logical.ref_tokens={tokens}",
                    ]
                name = f"B={batch} {mode}"
                run_dir = os.path.join(args.out, f"s{seed}_b{batch}_{mode}")
                r = run_world(train_one, 1, (common, run_dir, args.templates, args.evals))[0]
                runs.setdefault(name, []).append(r)
                print(
                    f"seed {seed} {name:>16}: final eval {r['eval'][-1][1]:.4f}  "
                    f"(lr {r['max_lr']:.3g}, betas {r['betas'][0]:.4g}/{r['betas'][1]:.4g}, "
                    f"{r['seconds']:.0f}s)",
                    flush=True,
                )
    summary = report(runs, args.seeds)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump({"args": vars(args), "tokens": tokens, "runs": runs, "summary": summary}, f)
    plot(runs, os.path.join(args.out, "curves.png"), b0, tokens)


def report(runs: dict[str, list[dict]], seeds: int) -> dict[str, float]:
    """Final eval loss gap of each run to the B0 reference, averaged over seeds."""
    ref = [r["eval"][-1][1] for r in runs[next(k for k in runs if "reference" in k)]]
    out = {}
    print(f"\nfinal eval loss (mean of {seeds} seed(s)) and gap to the B0 reference:")
    for name, rs in runs.items():
        final = [r["eval"][-1][1] for r in rs]
        gaps = [f - g for f, g in zip(final, ref)]
        mean, gap = sum(final) / len(final), sum(gaps) / len(gaps)
        spread = f" (per seed: {', '.join(f'{g:+.4f}' for g in gaps)})" if seeds > 1 else ""
        print(f"  {name:>16}: {mean:.4f}  gap {gap:+.4f}{spread}")
        out[name] = gap
    return out


def plot(runs: dict[str, list[dict]], path: str, b0: int, tokens: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    colors = {1: "black", 4: "tab:blue", 16: "tab:red"}
    for name, rs in runs.items():
        batch = int(name.split()[0][2:])
        style = "--" if "naive" in name else "-"
        for i, r in enumerate(rs):
            x, y = zip(*r["eval"])
            kw = dict(color=colors[batch // b0], ls=style, alpha=1.0 if i == 0 else 0.4)
            axes[0].plot(x, y, label=name if i == 0 else None, marker="o", ms=3, **kw)
            tx, ty = zip(*r["train"])
            k = max(1, len(ty) // 30)  # smooth the train loss over ~30 windows
            sm = [sum(ty[j : j + k]) / len(ty[j : j + k]) for j in range(0, len(ty), k)]
            axes[1].plot(tx[k - 1 :: k][: len(sm)], sm[: len(tx[k - 1 :: k])], **kw)
    axes[0].set(xlabel="tokens", ylabel="held-out ELBO loss (fixed noise)", title="eval")
    axes[1].set(xlabel="tokens", ylabel="train loss (window mean)", title="train")
    for ax in axes:
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.suptitle(
        f"SDE rescaling (solid) vs naive (dashed): B0={b0}, 4*B0, 16*B0 over {tokens:,} tokens"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
