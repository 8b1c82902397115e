"""megatron-core 0.16.1 workarounds for its optimizer state without Transformer Engine / apex.

Without a fused Adam from TE or apex (CPU boxes, plain GPU installs) megatron-core's
distributed optimizer wraps torch's Adam, whose state it does not fully initialise or restore.
:func:`init_optimizer_state` and :func:`keep_adam_step` fill those gaps; the checkpointing code
of the megatron-core engine uses them and nothing else does.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch


def _torch_optimizers(optimizer: Any) -> list[torch.optim.Optimizer]:
    chained = getattr(optimizer, "chained_optimizers", [optimizer])
    return [o.optimizer for o in chained]


@torch.no_grad()
def init_optimizer_state(optimizer: Any) -> None:
    """Give every parameter Adam's state (zeros, step 0) so a fresh optimizer can be loaded into.

    megatron-core's own init hook leaves out ``step``, which torch's Adam needs when neither
    Transformer Engine nor apex provides a fused Adam (CPU boxes).
    """
    for opt in _torch_optimizers(optimizer):
        if not isinstance(opt, (torch.optim.Adam, torch.optim.AdamW)):
            continue  # fused Adams (TE/apex) keep their step elsewhere; megatron-core inits them
        for group in opt.param_groups:
            for p in group["params"]:
                st = opt.state[p]
                if len(st) == 0:
                    st["step"] = torch.zeros((), dtype=torch.float32)
                    st["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    st["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)


@contextlib.contextmanager
def keep_adam_step(optimizer: Any):
    """Work around megatron-core 0.16.1 loading ``fully_reshardable`` state into torch's Adam.

    Without Transformer Engine / apex, the distributed optimizer restores Adam's ``step`` from
    the param groups as *one* tensor shared by every parameter (torch's Adam then increments it
    once per parameter per step), and then copies every per-parameter state key, ``step``
    included, from a source that has none (KeyError). Here a missing ``step`` is copied onto
    itself, and each parameter gets its own ``step`` tensor afterwards.
    """
    patched = []
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        setter = getattr(opt, "_set_main_param_and_optimizer_states", None)
        if setter is None:
            continue

        def fixed(model_param, tensors, _opt=opt, _orig=setter):
            if "step" not in tensors:
                gi, go = _opt.model_param_group_index_map[model_param]
                st = _opt.optimizer.state[_opt.optimizer.param_groups[gi]["params"][go]]
                if "step" in st:
                    tensors = {**tensors, "step": st["step"].clone()}
            _orig(model_param, tensors)

        opt._set_main_param_and_optimizer_states = fixed
        patched.append(opt)
    try:
        yield
    finally:
        for opt in patched:
            del opt._set_main_param_and_optimizer_states
        for opt in _torch_optimizers(optimizer):
            for st in opt.state.values():
                if "step" in st:
                    st["step"] = st["step"].detach().clone()
