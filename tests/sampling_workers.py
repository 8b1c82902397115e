"""Module-level functions run inside gloo worlds by the sampling tests."""

from __future__ import annotations

import os

TINY_DEMO = [
    "model.num_layers=2",
    "model.hidden_size=32",
    "model.num_attention_heads=4",
    "model.ffn_hidden_size=64",
    "model.seq_length=160",
    "data.source=mds",
    "train.micro_batch=4",
    "train.global_batch=4",
    "optim.lr=1e-3",
    "optim.warmup_tokens=16",
    "logging.progress=false",
]


def train_and_logits(overrides: list[str], run_dir: str, tokens) -> dict:
    """Train one step, save the run's distributed checkpoint, return the TP-gathered logits."""
    import torch

    from megadiff.config import load_config
    from megadiff.generation.adapters import megatron_logits_fn
    from megadiff.parallel.state import destroy_distributed
    from megadiff.plan import resolve
    from megadiff.training.trainer import Trainer

    world = int(os.environ["WORLD_SIZE"])
    plan = resolve(load_config(None, [*TINY_DEMO, f"run.dir={run_dir}", *overrides]), world)
    trainer = Trainer(plan)
    cfg = plan.cfg
    trainer.train_step()
    trainer.save_checkpoint()
    fn = megatron_logits_fn(trainer.model, trainer.source.pad_id, cfg.model.vocab_size)
    logits = fn(tokens)
    at = torch.tensor([[5, 0, 23], [11, 11, 2]])  # some positions and columns only
    part = fn(tokens, positions=at, columns=(7, 300))
    destroy_distributed()
    return {"logits": logits, "part": part, "at": at}
