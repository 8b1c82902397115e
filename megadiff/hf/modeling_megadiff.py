"""Hugging Face modeling code of an exported megadiff model (self-contained: torch +
``transformers`` and the two files beside it; copied next to the weights and loaded with
``trust_remote_code=True``).

The network is ``network_megadiff.py`` (megadiff's own plain-PyTorch twin of its megatron-core
model), with the same parameter names as megadiff's full tensors: pre-norm transformer,
**bidirectional** attention (padding-only mask), RoPE (non-interleaved halves), optional
QK-norm, GQA, SwiGLU.

Padded vocabulary: embedding and output keep megadiff's padded rows, and logit columns
``>= config.vocab_size`` are -inf, so logits equal megadiff's over every column.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import PreTrainedModel
from transformers.modeling_outputs import MaskedLMOutput

from .configuration_megadiff import MegadiffConfig
from .network_megadiff import Arch, Network, span_positions


def arch(cfg: MegadiffConfig) -> Arch:
    """The network's shape from the Hugging Face config (names differ, values are the same)."""
    return Arch(
        num_layers=cfg.num_hidden_layers,
        hidden_size=cfg.hidden_size,
        num_attention_heads=cfg.num_attention_heads,
        num_query_groups=cfg.num_key_value_heads,
        ffn_hidden_size=cfg.intermediate_size,
        vocab_size=cfg.vocab_size,
        padded_vocab_size=cfg.padded_vocab_size,
        qk_layernorm=cfg.qk_layernorm,
        rotary_base=cfg.rope_theta,
        norm_epsilon=cfg.norm_eps,
        normalization=cfg.normalization,
        residual_scale=cfg.residual_scale,
    )


class MegadiffForMaskedDiffusion(PreTrainedModel, Network):
    """``input_ids [b, s]`` (+ ``attention_mask [b, s]``, 1 = token, 0 = padding) ->
    ``MaskedLMOutput(logits [b, s, padded_vocab_size])``; no causal mask."""

    config_class = MegadiffConfig
    base_model_prefix = "megadiff"
    _no_split_modules = ["Layer"]

    def __init__(self, config: MegadiffConfig) -> None:
        super().__init__(config)
        self.build_network(arch(config))
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=std)
        elif isinstance(module, (nn.RMSNorm, nn.LayerNorm)):
            nn.init.ones_(module.weight)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)

    def get_input_embeddings(self) -> nn.Module:
        return self.embedding.word_embeddings

    def get_output_embeddings(self) -> nn.Module:
        return self.output_layer

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        labels: Tensor | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> MaskedLMOutput | tuple:
        attend = None
        if attention_mask is not None:
            attend = attention_mask.bool()[:, None, None, :]  # True = attend to this key
        logits = self.logits(input_ids, attend)
        loss = None
        if labels is not None:  # plain masked-LM loss on labels != -100 (no ELBO weighting)
            loss = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), -100)
        if return_dict is False:
            return (logits,) if loss is None else (loss, logits)
        return MaskedLMOutput(loss=loss, logits=logits)

    @torch.no_grad()
    def generate(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        steps: int | None = None,
        modality: str | None = None,
        token_range: tuple[int, int] | None = None,
        temperature: float = 0.0,
        generator: torch.Generator | None = None,
        block_length: int | None = None,
        strategy: str = "confidence",
        threshold: float = 0.9,
        cache: str = "none",
    ) -> Tensor:
        """Fill the MASK positions of ``input_ids`` (megadiff's sampler without guidance).

        Each row's masked positions are filled block by block: ``block_length`` consecutive
        masked positions at a time (``None``: one block of all of them). Every step restricts
        the block's logits to ``token_range`` or ``config.modality_ranges[modality]`` (default:
        the real vocabulary), picks a token per masked position (argmax, or Gumbel-max at
        ``temperature > 0``) and commits by ``strategy``:

        * ``confidence``: the most probable picks (LLaDA's low-confidence remasking), ``margin``:
          the largest p1 - p2; each commits the block's masked positions split evenly over its
          steps (``steps`` split evenly over the blocks, the first ones one more; default one
          step per position);
        * ``threshold``: every pick with probability >= ``threshold`` and at least the most
          probable one (Fast-dLLM); the block ends when it is filled (``steps``: a cap).

        ``cache`` ``prefix`` / ``dual`` (needs ``block_length``): a block KV cache. A block's
        first step runs the whole sequence and keeps every layer's keys/values; its other steps
        run only the block and what follows (``prefix``) or the block alone (``dual``) against
        them. Approximate (keys/values outside that span are those of the block's first step);
        ``none`` is exact. Returns the filled ids (other positions unchanged).
        """
        c = self.config
        if c.mask_token_id is None:
            raise ValueError("config.mask_token_id is not set")
        _check_settings(steps, block_length, strategy, threshold, cache)
        if token_range is None:
            token_range = c.modality_ranges[modality] if modality else (0, c.vocab_size)
        x = input_ids.clone()
        masked = x == c.mask_token_id
        attend = None
        if attention_mask is not None:
            masked &= attention_mask.bool()
            attend = attention_mask.bool()[:, None, None, :]
        blocks = _Blocks.of(masked, block_length)
        kv = _KV(cache, attend, x.shape[1])
        block = torch.zeros_like(blocks.count)
        step = torch.zeros_like(blocks.count)
        while True:
            rows = (block < blocks.count).nonzero(as_tuple=True)[0]
            if len(rows) == 0:
                return x
            positions, in_block, size = blocks.window(rows, block[rows])
            candidate = in_block & (x[rows].gather(1, positions) == c.mask_token_id)
            budget = size if steps is None else blocks.steps_of(rows, block[rows], steps)
            logits = kv.logits(self, x, rows, positions, in_block, step[rows] == 0, token_range)
            k = _commit_count(strategy, candidate.sum(1), step[rows], size, budget)
            chosen, token = _commit(
                logits, candidate, k, strategy, threshold, temperature, generator
            )
            r, j = chosen.nonzero(as_tuple=True)
            x[rows[r], positions[r, j]] = token_range[0] + token[r, j]
            done = chosen.sum(1) == candidate.sum(1)
            block[rows] += done.long()
            step[rows] = torch.where(done, 0, step[rows] + 1)


STRATEGIES = ("confidence", "margin", "threshold")
CACHES = ("none", "prefix", "dual")


def _check_settings(
    steps: int | None, block_length: int | None, strategy: str, threshold: float, cache: str
) -> None:
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {', '.join(STRATEGIES)}, got '{strategy}'")
    if cache not in CACHES:
        raise ValueError(f"cache must be one of {', '.join(CACHES)}, got '{cache}'")
    if cache != "none" and block_length is None:
        raise ValueError(
            f"cache '{cache}' needs blocks (set block_length, e.g. 32): with one block it is "
            "never refreshed"
        )
    for name, value in (("steps", steps), ("block_length", block_length)):
        if value is not None and value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"threshold must be in (0, 1], got {threshold}")


class _Blocks:
    """Each row's masked positions in order, cut into blocks."""

    def __init__(self, order: Tensor, n: Tensor, length: Tensor) -> None:
        self.order, self.n, self.length = order, n, length  # [b, M], [b], [b]
        self.count = (n + length - 1) // length  # [b] blocks per row

    @staticmethod
    def of(masked: Tensor, block_length: int | None) -> _Blocks:
        n = masked.sum(1)
        s = masked.shape[1]
        ids = torch.arange(s, device=masked.device)
        order = torch.where(masked, ids, s + ids).argsort(1)[:, : max(int(n.max()), 1)]
        length = n.clone() if block_length is None else torch.full_like(n, block_length)
        return _Blocks(order, n, length.clamp(min=1))

    def window(self, rows: Tensor, block: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``[r, W]`` positions of the rows' blocks (0 where ``in_block`` is False), ``in_block``
        and ``[r]`` the blocks' sizes."""
        length, n = self.length[rows], self.n[rows]
        slot = torch.arange(int(self.length.max()), device=n.device)
        rank = block[:, None] * length[:, None] + slot
        in_block = (slot < length[:, None]) & (rank < n[:, None])
        rank = rank.clamp(max=self.order.shape[1] - 1)
        positions = self.order[rows].gather(1, rank) * in_block
        return positions, in_block, torch.minimum(length, n - block * length)

    def steps_of(self, rows: Tensor, block: Tensor, steps: int) -> Tensor:
        """``[r]`` steps of the rows' blocks: ``steps`` split evenly, the first blocks one more."""
        count = self.count[rows]
        return (steps // count + (block < steps % count).long()).clamp(min=1)


class _KV:
    """The logits of a step's blocks, through a block KV cache (``mode`` prefix / dual) or not:
    rows at their block's first step run whole (and refill their cache rows), the others run
    their span against their cache rows."""

    def __init__(self, mode: str, attend: Tensor | None, seq_len: int) -> None:
        self.mode, self.attend, self.s = mode, attend, seq_len
        self.past: list[Tensor] = []  # per layer [b, 2, groups, s + 1, head_dim]

    def logits(
        self,
        net: Network,
        x: Tensor,
        rows: Tensor,
        positions: Tensor,
        in_block: Tensor,
        first: Tensor,
        columns: tuple[int, int],
    ) -> Tensor:
        """``[r, W, hi - lo]`` logits at ``positions`` of ``x[rows]``."""
        if self.mode == "none":
            return net.logits(x[rows], self._attend(rows), positions, columns)
        out = None
        for sel, whole in ((first, True), (~first, False)):
            if not bool(sel.any()):
                continue
            r, pos = rows[sel], positions[sel]
            if whole:
                kv: list[Tensor] = []
                part = net.logits(x[r], self._attend(r), pos, columns, kv_out=kv)
                if not self.past:
                    self.past = [t.new_zeros(len(x), *t.shape[1:]) for t in kv]
                for mine, new in zip(self.past, kv):
                    mine[r] = new
            else:
                ib = in_block[sel]
                start = pos.masked_fill(~ib, self.s).amin(1)
                end = pos.masked_fill(~ib, -1).amax(1) + 1 if self.mode == "dual" else self.s
                span = span_positions(start, end - start, self.s)
                at = (pos - start[:, None]).clamp(0, span.shape[1] - 1)
                past = [t[r] for t in self.past]
                part = net.logits(x[r], self._attend(r), at, columns, past=past, span=span)
            if sel.all():
                return part
            if out is None:
                out = part.new_empty(len(rows), *part.shape[1:])
            out[sel] = part
        return out

    def _attend(self, rows: Tensor) -> Tensor | None:
        return None if self.attend is None else self.attend[rows]


def _commit_count(strategy: str, n: Tensor, step: Tensor, size: Tensor, budget: Tensor) -> Tensor:
    """``[r]`` positions to commit (``threshold``: at least) of ``n`` candidates at ``step``
    of blocks of ``size`` positions and ``budget`` steps."""
    if strategy == "threshold":  # enough to fill the block within its step cap
        return (-(-n // (budget - step).clamp(min=1))).clamp(min=1)
    k = size // budget + (step < size % budget).long()  # split evenly, the last step fills
    return torch.where(step >= budget - 1, n, k)


def _commit(
    logits: Tensor,
    candidate: Tensor,
    k: Tensor,
    strategy: str,
    threshold: float,
    temperature: float,
    generator: torch.Generator | None,
) -> tuple[Tensor, Tensor]:
    """``[r, W]`` the candidates to commit this step (the ``k`` best by ``strategy``'s score,
    ties to the first; ``threshold`` adds every confident one) and each position's token (a
    column of ``logits``)."""
    prob = logits.softmax(-1)
    confidence, token = prob.max(-1)
    if temperature > 0:
        u = torch.rand(logits.shape, generator=generator, dtype=torch.float64)
        noisy = logits.double() / temperature - torch.log(-torch.log(u.clamp_min(1e-300)))
        token = noisy.to(logits.device).argmax(-1)
        confidence = prob.gather(-1, token[..., None]).squeeze(-1)
    score = confidence
    if strategy == "margin":
        top2 = prob.topk(min(2, prob.shape[-1]), dim=-1).values
        score = top2[..., 0] - top2[..., -1]
    order = score.masked_fill(~candidate, float("-inf")).argsort(
        dim=1, descending=True, stable=True
    )
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(order.shape[1], device=order.device).expand_as(order))
    chosen = candidate & (rank < k[:, None])
    if strategy == "threshold":
        chosen |= candidate & (confidence >= threshold)
    return chosen, token


MegadiffModel = MegadiffForMaskedDiffusion
