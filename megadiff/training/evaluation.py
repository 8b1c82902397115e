"""Held-out evaluation in the training loop: a fixed set of sequences with fixed masking noise,
scored with a low-variance estimate of the ELBO.

The held-out set is ``eval.batches * eval.batch_size`` sequences per stream: each MDS stream's
held-out split (``val_path``, default its ``val/`` split; read in order, unshuffled) or the
synthetic source's held-out generator. It is read once, on global rank 0, and broadcast.

Estimator: the masked-diffusion ELBO in its count form. With masking probability
``s = 1 - alpha(t)``, the continuous-time bound ``int w(t) E[sum over masked tokens of CE] dt``
(``w = -alpha'/(1 - alpha)``) becomes ``int_0^1 (1/s) E_s[...] ds`` for every schedule, and
integrating the Binomial number of masked tokens out of it gives, for a sequence of ``n`` valid
tokens, ``E_{c ~ U{1..n}} [(n / c) * sum of CE over a uniform subset of c masked tokens]``. That
form has no 1/t weight on a handful of tokens masked at small t, the heavy tail that makes the
per-t form noisy. Every sequence ``i`` is scored at ``K = eval.t_points`` masking levels on a
stratified grid, ``c_ik = 1 + floor(n_i (k + u_i) / K)`` for ``k = 0..K-1`` (``c/n`` plays the
role of t: one level in each 1/K of ``[0, 1]``), with one uniform offset ``u_i`` per sequence
and a uniform subset per row. It is the bound of the continuous-time process, whatever
``diffusion.schedule``, ``t_min`` and ``loss_weighting`` say (all tokens of a row masked at the
same rate; no random-length cut or whole-modality masking), so runs that differ in those are
comparable. ``u_i`` and the subsets come from a generator seeded by ``(eval.seed, i)``, never
by a rank, a step or the batch layout: the same rows and noise at every step,
``train.global_batch`` and TP/PP/DP layout.

Record (a ``metrics.jsonl`` line beside the training records, same ``step``/``tokens``):
``val_loss`` = the ELBO-weighted loss per held-out token (summed over rows, divided by their
valid-token count; PAD is not a token), ``val_loss_<modality>``, ``val_loss_stream_<name>``
(MDS streams) and ``val_ppl = exp(val_loss)``, the perplexity bound.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from megadiff.data.names import MODALITIES
from megadiff.diffusion.objective import Corrupted, MaskingObjective, noise_seed

M = len(MODALITIES)


@dataclass
class HeldOut:
    """The held-out sequences: ``tokens``/``modality`` ``[N, L]``, ``stream`` ``[N]`` (index into
    ``names``)."""

    tokens: Tensor
    modality: Tensor
    stream: Tensor
    names: list[str]


def synthetic_held_out(source: Any, n: int) -> HeldOut:
    b = source.held_out(n)
    return HeldOut(b["tokens"], b["modality"], torch.zeros(n, dtype=torch.long), ["synthetic"])


def mds_held_out(cfg: Any, vocab: Any, n: int) -> HeldOut:
    """The first ``n`` rows of each stream's held-out split, built like training rows."""
    from megadiff.data.checks import val_spec
    from megadiff.data.loader import MixtureLoader

    tokens, modality, stream = [], [], []
    for sid, s in enumerate(cfg.data.streams):
        spec = val_spec(sid, s)
        # seed 0, unshuffled: the rows (and a pair's task) do not depend on eval.seed or the run
        with MixtureLoader([spec], cfg.model.seq_length, n, vocab=vocab, shuffle=False) as loader:
            batch = next(loader)
        tokens.append(batch["tokens"])
        modality.append(batch["modality"])
        stream.append(torch.full((n,), sid, dtype=torch.long))
    names = [s.name for s in cfg.data.streams]
    return HeldOut(torch.cat(tokens), torch.cat(modality), torch.cat(stream), names)


def stratified_noise(
    objective: MaskingObjective, held: HeldOut, t_points: int, seed: int
) -> tuple[Corrupted, Tensor]:
    """Every held-out sequence at ``t_points`` masking levels on a stratified grid (rows
    ``i * K + k``) with its fixed masks; returns the noised rows and each row's stream index."""
    k = t_points
    valid = (held.tokens != objective.pad_id).sum(1)
    counts, scores = [], []
    for i in range(len(held.tokens)):
        gen = torch.Generator().manual_seed(noise_seed(seed, 0, i))
        offset = torch.rand(1, generator=gen, dtype=torch.float64)
        grid = (torch.arange(k, dtype=torch.float64) + offset) / k  # one point per 1/K stratum
        n = int(valid[i])
        counts.append((1 + (grid * n).floor().long()).clamp(max=n))
        scores.append(torch.rand(k, held.tokens.shape[1], generator=gen))
    rows = torch.arange(len(held.tokens)).repeat_interleave(k)
    noised = objective.mask_exactly(
        held.tokens[rows], held.modality[rows], torch.cat(counts), torch.cat(scores)
    )
    return noised, held.stream[rows]


def _rows(noised: Corrupted, idx: Tensor) -> Corrupted:
    valid = noised.valid[idx]
    attn = None if bool(valid.all()) else ~valid[:, None, None, :]
    return Corrupted(
        noised.inputs[idx],
        noised.targets[idx],
        noised.weight[idx],
        valid,
        noised.modality[idx],
        noised.t[idx],
        attn,
    )


class Evaluator:
    """The run's held-out set and noise, and the collective that scores the model on it."""

    def __init__(self, trainer: Any) -> None:
        cfg = trainer.cfg
        self.trainer = trainer
        self.objective: MaskingObjective = trainer.objective
        n = cfg.eval.batches * cfg.eval.batch_size
        held = self._read(cfg, trainer.source, n)
        self.names = held.names
        self.noised, self.stream = stratified_noise(
            self.objective, held, cfg.eval.t_points, cfg.eval.seed
        )
        self.per_stream = cfg.data.source == "mds"

    @staticmethod
    def _read(cfg: Any, source: Any, n: int) -> HeldOut:
        """Read on global rank 0, broadcast to every rank (all of them score rows)."""
        if cfg.data.source == "synthetic":
            return synthetic_held_out(source, n)
        names = [s.name for s in cfg.data.streams]
        shape = (n * len(names), cfg.model.seq_length)
        held = mds_held_out(cfg, source.vocab, n) if dist.get_rank() == 0 else None
        where = "cuda" if dist.get_backend() == "nccl" else "cpu"
        parts = [
            torch.empty(shape, dtype=torch.long) if held is None else held.tokens,
            torch.empty(shape, dtype=torch.long) if held is None else held.modality,
            torch.empty(shape[0], dtype=torch.long) if held is None else held.stream,
        ]
        parts = [p.to(where) for p in parts]
        for p in parts:
            dist.broadcast(p, 0)
        tokens, modality, stream = (p.cpu() for p in parts)
        return HeldOut(tokens, modality, stream, names)

    # ------------------------------------------------------------------ scoring

    def microbatches(self, call: int) -> list[dict[str, Any]]:
        """This DP rank's micro-batches of eval call ``call``: ``train.micro_batch`` rows each,
        rows past the end are repeats of row 0 that count for nothing."""
        t, plan, ranks = self.trainer.cfg.train, self.trainer.plan, self.trainer.ranks
        total = len(self.stream)
        out = []
        for mb in range(plan.n_micro):
            start = call * t.global_batch + (ranks.dp_rank * plan.n_micro + mb) * t.micro_batch
            idx = torch.arange(start, start + t.micro_batch)
            live = idx < total
            idx = torch.where(live, idx, torch.zeros_like(idx))
            out.append(
                {
                    "noised": _rows(self.noised, idx),
                    "stream": self.stream[idx],
                    "live": live,
                    "rows": idx,
                }
            )
        return out

    def calls(self) -> int:
        return -(-len(self.stream) // self.trainer.cfg.train.global_batch)

    def forward(self, model: torch.nn.Module, batch: dict[str, Any]):
        noised = batch["noised"]
        mask = noised.attention_mask
        device = self.trainer.device
        out = model(noised.inputs.to(device), None if mask is None else mask.to(device))
        return out, partial(self._loss, batch)

    def _loss(self, batch: dict[str, Any], output: Tensor):
        """Summed weighted cross entropy and valid-token counts per (stream, modality)."""
        noised = batch["noised"]
        per_tok = self.objective.weighted_ce(output, noised).double()
        dev = per_tok.device
        key = batch["stream"].to(dev)[:, None] * M + noised.modality.to(dev).clamp(0, M - 1)
        keep = noised.valid.to(dev) & batch["live"].to(dev)[:, None]
        onehot = F.one_hot(key.flatten(), len(self.names) * M).double() * keep.flatten()[:, None]
        sums, counts = per_tok.flatten() @ onehot, onehot.sum(0)
        loss = (per_tok * keep).sum() / keep.sum().clamp(min=1)  # what the schedule reports
        return loss, {"stats": torch.cat([sums, counts])}

    @torch.no_grad()
    def run(self) -> dict[str, float] | None:
        """Collective: the eval record's values (and ``val_time``, seconds) on the last
        pipeline stage, None elsewhere."""
        t0 = time.perf_counter()
        engine = self.trainer.engine
        engine.set_training(False)
        total = None
        try:
            for call in range(self.calls()):
                stats = engine.forward_backward(self.microbatches(call), self.forward, True)
                if stats is not None:
                    total = stats.cpu() if total is None else total + stats.cpu()
        finally:
            engine.set_training(True)
        if total is None:
            return None
        values = eval_values(total, self.names, self.per_stream)
        return {**values, "val_time": time.perf_counter() - t0}


def eval_values(stats: Tensor, names: list[str], per_stream: bool) -> dict[str, float]:
    """``val_loss``, ``val_loss_<modality>``, ``val_loss_stream_<name>``, ``val_ppl`` from the
    summed stats (sums then counts, each ``[stream, modality]``)."""
    s = len(names)
    sums, counts = stats[: s * M].view(s, M), stats[s * M :].view(s, M)
    loss = float(sums.sum() / counts.sum().clamp(min=1))
    out = {"val_loss": loss}
    for m, name in enumerate(MODALITIES):
        if counts[:, m].sum() > 0:
            out[f"val_loss_{name}"] = float(sums[:, m].sum() / counts[:, m].sum())
    if per_stream:
        for i, name in enumerate(names):
            out[f"val_loss_stream_{name}"] = float(sums[i].sum() / counts[i].sum().clamp(min=1))
    out["val_ppl"] = math.exp(min(loss, 700.0))
    return out
