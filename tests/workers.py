"""Module-level functions run inside gloo worlds by the distributed tests."""

from __future__ import annotations

import os

# a tiny model that every tested layout can split: 4 layers (PP2 x VPP2), 4 heads (TP2)
TINY = [
    "model.num_layers=4",
    "model.hidden_size=32",
    "model.num_attention_heads=4",
    "model.ffn_hidden_size=64",
    "model.vocab_size=120",
    "model.seq_length=16",
    "train.micro_batch=2",
    "train.global_batch=4",
    "optim.lr=1e-3",
    "optim.warmup_tokens=16",
    "diffusion.random_length_prob=0.25",
    "diffusion.modality_mask_prob=0.25",
    "logging.progress=false",
]


def train_capture(overrides: list[str], steps: int, run_dir: str) -> dict:
    """Train ``steps`` steps; return per-step losses, first-step full grads and final params."""
    from megadiff.config import load_config, validate
    from megadiff.model.gather import full_tensors
    from megadiff.parallel.state import destroy_distributed
    from megadiff.training.trainer import Trainer

    world = int(os.environ["WORLD_SIZE"])
    cfg = validate(load_config(None, [*TINY, f"run.dir={run_dir}", *overrides]), world)
    trainer = Trainer(cfg)
    captured: dict = {}

    def grab(t: Trainer) -> None:
        captured["grads"] = full_tensors(t.model, "grad")

    losses = []
    for s in range(steps):
        rec = trainer.train_step(on_grads=grab if s == 0 else None)
        losses.append(rec.get("loss"))
    params = full_tensors(trainer.model, "param")
    rank = trainer.ranks.rank
    destroy_distributed()
    out = {"losses": losses if losses[0] is not None else None}
    if rank == 0:
        out.update(grads=captured["grads"], params=params)
    return out


def _trainer(overrides: list[str], run_dir: str):
    from megadiff.config import load_config, validate
    from megadiff.training.trainer import Trainer

    world = int(os.environ["WORLD_SIZE"])
    cfg = validate(load_config(None, [*TINY, f"run.dir={run_dir}", *overrides]), world)
    return Trainer(cfg)


def final_params(overrides: list[str], run_dir: str) -> dict:
    """Build a trainer on ``run_dir`` (auto-resume) and return its step and full parameters."""
    from megadiff.model.gather import full_tensors
    from megadiff.parallel.state import destroy_distributed

    trainer = _trainer(overrides, run_dir)
    params = full_tensors(trainer.model, "param")
    out = {"step": trainer.step, "params": params if trainer.ranks.rank == 0 else None}
    destroy_distributed()
    return out


def session(overrides: list[str], run_dir: str, pre: int, save: bool, post: int) -> dict:
    """Build a trainer (fresh, resumed or ``checkpoint.load``), train ``pre`` steps, optionally
    save, evaluate, train ``post`` steps."""
    from megadiff.parallel.state import destroy_distributed

    trainer = _trainer(overrides, run_dir)
    start = trainer.step
    for _ in range(pre):
        trainer.train_step()
    if save:
        trainer.save_checkpoint()
    ev = trainer.evaluate()
    losses = [trainer.train_step().get("loss") for _ in range(post)]
    destroy_distributed()
    return {"start": start, "eval": ev, "losses": losses if losses[0] is not None else None}


def faults_run(overrides: list[str], run_dir: str, nan_steps: list[int]) -> dict:
    """``fit()`` with the loss made NaN at ``nan_steps`` (1-based); report what happened."""
    import json

    from megadiff.model.gather import full_tensors
    from megadiff.parallel.state import destroy_distributed

    trainer = _trainer(overrides, run_dir)
    loss_fn = trainer.objective.loss
    snapshots: dict[int, dict] = {}

    def loss(output, noised):
        value, stats = loss_fn(output, noised)
        if trainer.step + 1 in nan_steps:
            value, stats = value * float("nan"), stats * float("nan")
        return value, stats

    trainer.objective.loss = loss
    original_step = trainer.train_step

    def train_step(on_grads=None):
        snapshots[trainer.step] = full_tensors(trainer.model, "param")
        return original_step(on_grads)

    trainer.train_step = train_step
    history = trainer.fit()
    snapshots[trainer.step] = full_tensors(trainer.model, "param")
    metrics = [json.loads(x) for x in open(os.path.join(run_dir, "metrics.jsonl"))]
    out = {
        "exit_code": trainer.exit_code,
        "step": trainer.step,
        "history": history,
        "metrics": metrics,
        "snapshots": snapshots,
        "nonfinite_steps": trainer.nonfinite_steps,
    }
    destroy_distributed()
    return out


def fit_run(overrides: list[str], run_dir: str) -> dict:
    """``fit()``; return the per-step losses (last stage) and the exit code."""
    from megadiff.parallel.state import destroy_distributed

    trainer = _trainer(overrides, run_dir)
    history = trainer.fit()
    destroy_distributed()
    losses = [r.get("loss") for r in history]
    if not losses or losses[0] is None:
        losses = None
    return {"losses": losses, "exit": trainer.exit_code}
