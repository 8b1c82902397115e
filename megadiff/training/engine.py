"""The engine contract: what the training loop (:mod:`megadiff.training.trainer`) asks of the
machinery that runs forward/backward passes and updates the weights.

Two engines implement it: megatron-core (TP/PP/DP, distributed optimizer;
:mod:`megadiff.training.megatron_engine`) and DeepSpeed ZeRO (data parallel;
:mod:`megadiff.training.deepspeed_engine`). Everything else — data, masking noise, the loss,
the lr schedule, signals, time budget, non-finite policy, checkpoint cadence and contents,
metrics — is the loop's, written once.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, Protocol

import torch

# (model chunk, micro-batch) -> (output, loss_fn); loss_fn(output) -> (loss, {"stats": stats})
StepFn = Callable[[torch.nn.Module, dict[str, Any]], tuple[Any, Callable]]


class Engine(Protocol):
    """One training engine. Collective methods must be called on every rank."""

    name: str  # "megatron" | "deepspeed": recorded in checkpoints
    model: list[torch.nn.Module]  # the model chunks the step function runs
    optimizer: Any  # exposes ``param_groups`` (the lr scheduler sets lr/wd there)
    optimizer_needs_same_layout: bool  # its saved optimizer state loads only at its layout()

    def describe(self) -> str:
        """The layout, for the start-up line (e.g. ``TP 2 x PP 2 x DP 1``)."""

    def parameter_count(self) -> int:
        """Collective: the model's total parameters over all ranks."""

    def set_training(self, training: bool) -> None:
        """Switch the model chunks between train and eval mode."""

    def forward_backward(
        self, microbatches: Iterable[dict[str, Any]], step_fn: StepFn, forward_only: bool
    ) -> torch.Tensor | None:
        """Collective: run every micro-batch of one step (with backward unless
        ``forward_only``); returns the DP-summed loss statistics on the loss ranks, else None.
        Gradients are left reduced and ready for :meth:`apply_update`."""

    def zero_grads(self) -> None:
        """Clear gradients before a step."""

    def local_grads(self) -> list[torch.Tensor]:
        """This rank's gradient tensors after :meth:`forward_backward` (non-finite check)."""

    def apply_update(self) -> tuple[float | None, bool]:
        """Collective: the optimizer step; returns ``(grad_norm, applied)``."""

    def discard_update(self) -> None:
        """Collective: end the step without changing weights or optimizer state."""

    def layout(self) -> dict[str, int]:
        """What a checkpoint must match for its optimizer state to load (world, DP, ...)."""

    def full_weights(self, modify: bool) -> contextlib.AbstractContextManager:
        """A context in which each rank's weights are what :meth:`sharded_state` describes
        (ZeRO-3 gathers its slices; ``modify``: rank 0's values are kept on exit)."""

    def sharded_state(self, is_loading: bool, optimizer: bool) -> dict[str, Any]:
        """The engine's part of the ``dist_checkpointing`` state: model chunks (+ optimizer)."""

    def load_sharded_state(self, state: dict[str, Any], optimizer: bool) -> None:
        """Restore what :meth:`sharded_state` described (``dist_checkpointing``-loaded)."""

    def save_files(self, directory: Path) -> None:
        """Collective: state the engine keeps in files of its own (may write nothing)."""

    def load_files(self, directory: Path, optimizer: bool) -> None:
        """Collective: restore what :meth:`save_files` wrote."""

    def close(self) -> None:
        """Release engine resources."""
