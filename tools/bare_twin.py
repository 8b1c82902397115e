"""The bare PyTorch twin of a megadiff run, for the speed benchmarks (bench_step, bench_mfu).

The twin is the plain-PyTorch model (megadiff.model.reference) loaded with the trainer's
weights, trained on the trainer's own batches and masking noise with an ELBO-weighted
``F.cross_entropy``, ``torch.optim.AdamW`` (fused on CUDA) and gradient clipping, with the same
micro-batch accumulation: what a researcher would write by hand. On a GPU it runs under bf16
autocast over fp32 weights (the usual bare-PyTorch mixed precision) when the trainer is bf16/fp8.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from megadiff.diffusion.objective import noise_generator
from megadiff.model.gather import full_tensors
from megadiff.model.reference import ReferenceConfig, ReferenceModel


def trainer_weights(trainer) -> dict[str, torch.Tensor]:
    """The trainer's full (unsharded) weights as fp32 CPU tensors, in the twin's names."""
    return {k: v.detach().float().cpu() for k, v in full_tensors(trainer.model).items()}


def build_twin(trainer, weights: dict | None = None, compile_model: bool = False):
    """(model, optimizer, autocast dtype or None) with ``weights`` (default: the trainer's
    current ones); ``compile_model``: wrapped in ``torch.compile``."""
    cfg = trainer.cfg
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = ReferenceModel(ReferenceConfig.from_model_config(cfg.model))
    model.load_state_dict(weights if weights is not None else trainer_weights(trainer))
    model.to(device)
    o = cfg.optim
    opt = torch.optim.AdamW(
        model.parameters(),
        lr=o.lr,
        betas=(o.beta1, o.beta2),
        eps=o.eps,
        weight_decay=0.0,
        fused=device == "cuda",
    )
    half = next(trainer.model[0].parameters()).dtype == torch.bfloat16
    if compile_model:
        model = torch.compile(model)
    return model, opt, torch.bfloat16 if half else None


def bare_step(model, opt, trainer, step: int, autocast: torch.dtype | None = None) -> float:
    """One optimizer step of the twin on the trainer's batches of ``step``; returns the loss."""
    cfg = trainer.cfg
    n_micro = trainer.plan.n_micro
    device = next(model.parameters()).device
    opt.zero_grad(set_to_none=True)
    mbs = trainer.source.microbatches(
        step, cfg.train.global_batch, cfg.train.micro_batch, 0, n_micro
    )
    total = torch.zeros((), device=device)
    for mb in mbs:
        gen = noise_generator(cfg.train.seed, step, 0, mb["microbatch"], n_micro)
        c = trainer.objective.corrupt(mb["tokens"], mb["modality"], gen)
        pad = None if c.attention_mask is None else (~c.valid).to(device)
        cast = (
            torch.autocast(device.type, dtype=autocast)
            if autocast is not None
            else contextlib.nullcontext()
        )
        with cast:
            logits = model(c.inputs.to(device), pad)
        ce = F.cross_entropy(
            logits.flatten(0, 1).float(), c.targets.to(device).flatten(), reduction="none"
        ).view_as(c.weight)
        loss = (ce * c.weight.to(device)).sum() / ce.numel() / n_micro
        loss.backward()
        total += loss.detach()
    if cfg.optim.clip_grad > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.clip_grad)
    opt.step()
    return float(total)
