"""The learned unmasking policy: one DiT-style transformer block over the generation buffer.

Per generated position it reads the frozen dLLM's features (top-1 confidence; optionally margin,
entropy, top-k probabilities), the mask bit and the step fraction, and returns an unmask logit.
The mask bit and a sinusoidal embedding of the step fraction condition the block through
adaLN-Zero modulation. A trained policy is a folder: ``model.safetensors`` + ``policy.json``.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from megadiff.diffusion.strategies import TOPK_FEATURES
from megadiff.hf.network_megadiff import apply_rope, rope_cos_sin

FORMAT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "policy.json"
FEATURE_WIDTH = {"confidence": 1, "margin": 1, "entropy": 1, "topk": TOPK_FEATURES}


class PolicyError(ValueError):
    """A bad policy folder or policy settings (the command line exits 2)."""


@dataclass
class PolicyConfig:
    hidden: int = 128
    heads: int = 2
    ffn: int = 512
    features: tuple[str, ...] = ("confidence",)  # per-position inputs; FEATURE_WIDTH's keys
    init_bias: float = -2.0  # output bias: initial unmask probability sigmoid(-2) ~ 0.12
    time_period: float = 1.0  # max period of the step fraction's sinusoidal embedding

    def validate(self) -> PolicyConfig:
        self.features = tuple(self.features)
        unknown = [f for f in self.features if f not in FEATURE_WIDTH]
        if unknown or not self.features or len(set(self.features)) != len(self.features):
            raise PolicyError(
                f"policy features {list(self.features)}: give distinct names from "
                f"{', '.join(FEATURE_WIDTH)}"
            )
        for name in ("hidden", "heads", "ffn"):
            if getattr(self, name) < 1:
                raise PolicyError(f"policy {name} must be >= 1, got {getattr(self, name)}")
        if self.hidden % self.heads or (self.hidden // self.heads) % 2:
            raise PolicyError(
                f"policy hidden {self.hidden} must split into {self.heads} heads of even size"
            )
        if self.time_period <= 0:
            raise PolicyError(f"policy time_period must be > 0, got {self.time_period}")
        return self

    @property
    def n_features(self) -> int:
        return sum(FEATURE_WIDTH[f] for f in self.features)


def timestep_embedding(t: Tensor, dim: int, max_period: float) -> Tensor:
    """DiT's sinusoidal embedding ``[B] -> [B, dim]``: cos then sin of ``t * freqs``."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    return x * (1 + scale) + shift


class PolicyBlock(nn.Module):
    """Pre-norm transformer block (RoPE, bidirectional attention, GELU FFN) with adaLN-Zero."""

    def __init__(self, c: PolicyConfig) -> None:
        super().__init__()
        self.heads = c.heads
        self.norm1 = nn.LayerNorm(c.hidden)
        self.qkv = nn.Linear(c.hidden, 3 * c.hidden)
        self.proj = nn.Linear(c.hidden, c.hidden)
        self.norm2 = nn.LayerNorm(c.hidden)
        self.ffn = nn.Sequential(
            nn.Linear(c.hidden, c.ffn), nn.GELU(approximate="tanh"), nn.Linear(c.ffn, c.hidden)
        )
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(c.hidden, 6 * c.hidden))
        nn.init.zeros_(self.ada[1].weight)
        nn.init.zeros_(self.ada[1].bias)

    def attention(self, x: Tensor, pad: Tensor | None) -> Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        cos, sin = rope_cos_sin(n, d // self.heads, 10000.0, x.device)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        mask = None if pad is None else ~pad[:, None, None, :]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.proj(out.transpose(1, 2).reshape(b, n, d))

    def forward(self, x: Tensor, cond: Tensor, pad: Tensor | None) -> Tensor:
        shift1, scale1, gate1, shift2, scale2, gate2 = self.ada(cond).chunk(6, dim=-1)
        x = x + gate1 * self.attention(modulate(self.norm1(x), shift1, scale1), pad)
        return x + gate2 * self.ffn(modulate(self.norm2(x), shift2, scale2))


class UnmaskingPolicy(nn.Module):
    """``(features [B, L, F], masked [B, L], step_frac [B]) -> unmask logits [B, L]``."""

    def __init__(self, config: PolicyConfig | None = None) -> None:
        super().__init__()
        self.config = c = (config or PolicyConfig()).validate()
        self.time_mlp = nn.Sequential(
            nn.Linear(c.hidden, c.hidden), nn.SiLU(), nn.Linear(c.hidden, c.hidden)
        )
        self.feature_proj = nn.Linear(c.n_features, c.hidden)
        self.mask_embed = nn.Embedding(2, c.hidden)
        self.block = PolicyBlock(c)
        self.final_norm = nn.LayerNorm(c.hidden)
        self.head = nn.Linear(c.hidden, 1)
        nn.init.zeros_(self.head.weight)
        nn.init.constant_(self.head.bias, c.init_bias)

    @property
    def features(self) -> tuple[str, ...]:
        return self.config.features

    def forward(
        self, features: Tensor, masked: Tensor, step_frac: Tensor, pad: Tensor | None = None
    ) -> Tensor:
        """``pad`` ``[B, L]`` bool: padding positions (no attention to them; logits ignored)."""
        c = self.config
        if features.shape[-1] != c.n_features:
            raise PolicyError(
                f"policy reads {c.n_features} feature column(s) {list(c.features)}, "
                f"got {features.shape[-1]}"
            )
        t = self.time_mlp(timestep_embedding(step_frac, c.hidden, c.time_period))
        cond = self.mask_embed(masked.long()) + t[:, None, :]
        x = self.feature_proj(features.float())
        x = self.block(x, cond, pad)
        return self.head(self.final_norm(x)).squeeze(-1)


def save_policy(policy: UnmaskingPolicy, folder: str | Path) -> Path:
    """Write ``model.safetensors`` + ``policy.json`` into ``folder`` (each file atomically)."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in policy.state_dict().items()}
    tmp = folder / f".{WEIGHTS_FILE}.tmp"
    save_file(state, str(tmp))
    tmp.replace(folder / WEIGHTS_FILE)
    meta = {"format_version": FORMAT_VERSION, "config": asdict(policy.config)}
    tmp = folder / f".{CONFIG_FILE}.tmp"
    tmp.write_text(json.dumps(meta, indent=1) + "\n")
    tmp.replace(folder / CONFIG_FILE)
    return folder


def policy_folder(path: str | Path) -> Path:
    """The policy folder of ``path``: the folder itself, or a policy run directory's latest
    checkpoint (``checkpoints/step_N/policy``)."""
    from megadiff.checkpoint_files import list_checkpoints

    path = Path(path)
    if (path / CONFIG_FILE).is_file():
        return path
    for root in (path / "checkpoints", path):
        found = list_checkpoints(root) if root.is_dir() else []
        for _, ckpt in reversed(found):
            if (ckpt / "policy" / CONFIG_FILE).is_file():
                return ckpt / "policy"
    raise PolicyError(
        f"policy '{path}': no {CONFIG_FILE} there nor in a checkpoint of a policy run "
        "(give a policy folder or a `megadiff policy train` run directory)"
    )


def read_policy_config(folder: Path) -> PolicyConfig:
    """The :class:`PolicyConfig` of a policy folder's ``policy.json``."""
    f = folder / CONFIG_FILE
    try:
        meta = json.loads(f.read_text())
    except (OSError, ValueError) as e:
        raise PolicyError(f"policy '{f}': not readable JSON ({e})") from e
    if not isinstance(meta, dict) or meta.get("format_version") != FORMAT_VERSION:
        raise PolicyError(f"policy '{f}': format_version must be {FORMAT_VERSION}")
    raw = meta.get("config")
    known = {x.name for x in fields(PolicyConfig)}
    if not isinstance(raw, dict) or set(raw) - known:
        raise PolicyError(f"policy '{f}': config must be an object with keys from {sorted(known)}")
    return PolicyConfig(**raw).validate()


def load_policy(path: str | Path, expect: PolicyConfig | None = None) -> UnmaskingPolicy:
    """The policy of a folder or a policy run directory (its latest checkpoint). ``expect``: the
    shape and feature set the caller needs; another one is a :class:`PolicyError`."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    folder = policy_folder(path)
    config = read_policy_config(folder)
    if expect is not None and asdict(expect.validate()) != asdict(config):
        diff = {
            k: (v, getattr(config, k)) for k, v in asdict(expect).items() if getattr(config, k) != v
        }
        raise PolicyError(
            f"policy '{folder}' has another shape or feature set than required: "
            + ", ".join(f"{k} {have!r} (need {want!r})" for k, (want, have) in diff.items())
        )
    policy = UnmaskingPolicy(config)
    try:
        state = load_file(str(folder / WEIGHTS_FILE))
    except (OSError, SafetensorError) as e:
        raise PolicyError(f"policy '{folder}': cannot read {WEIGHTS_FILE} ({e})") from e
    want = {k: tuple(v.shape) for k, v in policy.state_dict().items()}
    have = {k: tuple(v.shape) for k, v in state.items()}
    if want != have:
        bad = sorted(set(want) ^ set(have)) or [k for k in want if want[k] != have[k]]
        raise PolicyError(
            f"policy '{folder}': {WEIGHTS_FILE} does not match policy.json's shape "
            f"(features {list(config.features)}, hidden {config.hidden}); differing: "
            + ", ".join(bad[:4])
        )
    policy.load_state_dict(state)
    return policy.eval()
