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


def record_noise(overrides: list[str], run_dir: str) -> dict:
    """Run one step and return this rank's DP rank and the masked inputs it computed."""
    from megadiff.config import load_config, validate
    from megadiff.parallel.state import destroy_distributed
    from megadiff.training.trainer import Trainer

    world = int(os.environ["WORLD_SIZE"])
    cfg = validate(load_config(None, [*TINY, f"run.dir={run_dir}", *overrides]), world)
    trainer = Trainer(cfg)
    seen = []
    corrupt = trainer.objective.corrupt

    def spy(tokens, modality, gen):
        out = corrupt(tokens, modality, gen)
        seen.append(out.inputs.clone())
        return out

    trainer.objective.corrupt = spy
    trainer.train_step()
    ranks = trainer.ranks
    destroy_distributed()
    return {"dp": ranks.dp_rank, "tp": ranks.tp_rank, "pp": ranks.pp_rank, "inputs": seen}
