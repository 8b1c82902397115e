"""One dataclass tree for every setting, loaded from YAML with dotted ``key=value`` overrides.

``load_config`` parses and type-checks; :func:`check_sections` checks each section's own
values. The rules between sections and the values derived from them (DP size, vocabulary, the
optimizer recipe, tokens per step) are :mod:`megadiff.plan`'s. All raise :class:`ConfigError`
naming the offending key, before any process group or model is built.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from megadiff.data.names import MODALITIES as _MODALITIES
from megadiff.data.names import TASKS as _TASKS


class ConfigError(ValueError):
    """A configuration problem; the message names the key and says what to do."""


@dataclass(frozen=True)
class Range:
    """The allowed values of a numeric key: ``lo``/``hi`` bounds, each open or closed."""

    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False

    def contains(self, value: float) -> bool:
        above = self.lo is None or (value > self.lo if self.lo_open else value >= self.lo)
        below = self.hi is None or (value < self.hi if self.hi_open else value <= self.hi)
        return above and below

    def describe(self) -> str:
        if self.hi is None:
            return f"{'>' if self.lo_open else '>='} {self.lo:g}"
        if self.lo is None:
            return f"{'<' if self.hi_open else '<='} {self.hi:g}"
        left, right = "(" if self.lo_open else "[", ")" if self.hi_open else "]"
        return f"in {left}{self.lo:g}, {self.hi:g}{right}"


def ranged(default: Any, rng: Range) -> Any:
    """A dataclass field whose numeric value (unless null) must lie in ``rng``."""
    return field(default=default, metadata={"range": rng})


POSITIVE = Range(0, lo_open=True)
NON_NEGATIVE = Range(0)
AT_LEAST_1 = Range(1)
UNIT = Range(0, 1)  # [0, 1]
OPEN_UNIT = Range(0, 1, lo_open=True, hi_open=True)  # (0, 1)
DROPOUT = Range(0, 1, hi_open=True)  # [0, 1)


@dataclass
class ModelConfig:
    """Transformer shape; names follow megatron-core's ``TransformerConfig`` where one exists."""

    num_layers: int = ranged(2, AT_LEAST_1)
    hidden_size: int = ranged(64, AT_LEAST_1)
    num_attention_heads: int = ranged(4, AT_LEAST_1)
    num_query_groups: int | None = ranged(None, AT_LEAST_1)  # None = multi-head attention (no GQA)
    # None = SwiGLU default: 8/3 * hidden, rounded up to 64
    ffn_hidden_size: int | None = ranged(None, AT_LEAST_1)
    # None = the data's vocabulary layout (synthetic: 512)
    vocab_size: int | None = ranged(None, AT_LEAST_1)
    # embedding/output rows are padded to a multiple of this
    vocab_pad_multiple: int = ranged(64, AT_LEAST_1)
    seq_length: int = ranged(128, AT_LEAST_1)
    qk_layernorm: bool = False
    rotary_base: int = ranged(10000, AT_LEAST_1)
    normalization: str = "RMSNorm"  # RMSNorm | LayerNorm
    norm_epsilon: float = ranged(1e-5, POSITIVE)
    init_method_std: float = ranged(0.02, POSITIVE)
    embedding_init_std: float | None = ranged(None, POSITIVE)  # None = init_method_std
    hidden_dropout: float = ranged(0.0, DROPOUT)
    attention_dropout: float = ranged(0.0, DROPOUT)
    transformer_impl: str = "auto"  # auto | local | transformer_engine
    parameterization: str = "standard"  # standard | completep (depth/width transfer)
    # completep: base width (None = hidden_size)
    base_hidden_size: int | None = ranged(None, AT_LEAST_1)
    # completep: base depth (None = num_layers)
    base_num_layers: int | None = ranged(None, AT_LEAST_1)
    depth_alpha: float = ranged(1.0, UNIT)  # completep: residual branches x (layers/base)^-alpha
    recompute: str = "none"  # none | selective (core attention) | full (whole layers)
    recompute_method: str = "uniform"  # full: uniform (groups of N layers) | block (first N)
    # full: layers per recomputed group (uniform) or recomputed layers per model chunk (block)
    recompute_num_layers: int = ranged(1, AT_LEAST_1)

    @property
    def ffn_size(self) -> int:
        if self.ffn_hidden_size is not None:
            return self.ffn_hidden_size
        return -(-int(self.hidden_size * 8 / 3) // 64) * 64

    def padded_vocab_size(self) -> int:
        m = self.vocab_pad_multiple
        return -(-self.vocab_size // m) * m

    def parameter_count(self) -> int:
        """Parameters of this shape (untied embedding and output layer, SwiGLU, no linear
        biases; norms have a weight, and a bias with LayerNorm), from the config alone
        (``vocab_size`` must be resolved)."""
        h = self.hidden_size
        return (
            2 * self.padded_vocab_size() * h
            + self.num_layers * self.layer_parameter_count()
            + self.norm_parameter_count(h)
        )

    def norm_parameter_count(self, width: int) -> int:
        """One norm over ``width`` values: RMSNorm has a weight, LayerNorm a weight and bias."""
        return width * (2 if self.normalization == "LayerNorm" else 1)

    def layer_parameter_count(self) -> int:
        """Parameters of one transformer layer: QKV, output projection, SwiGLU, norms (the
        two pre-norms, and per-head q/k norms with QK-norm)."""
        h, f = self.hidden_size, self.ffn_size
        kv = (self.num_query_groups or self.num_attention_heads) * (h // self.num_attention_heads)
        return h * (h + 2 * kv) + h * h + 3 * h * f + self.layer_norm_parameter_count()

    def layer_norm_parameter_count(self) -> int:
        """The norms of one layer (replicated over TP ranks, not sharded)."""
        norms = 2 * self.norm_parameter_count(self.hidden_size)
        if self.qk_layernorm:
            norms += 2 * self.norm_parameter_count(self.hidden_size // self.num_attention_heads)
        return norms

    def validate(self) -> None:
        """This section's own rules (:class:`ConfigError` names the key)."""
        check(
            self.hidden_size % self.num_attention_heads == 0,
            "model.hidden_size",
            f"{self.hidden_size} is not divisible by "
            f"model.num_attention_heads={self.num_attention_heads}",
        )
        head_dim = self.hidden_size // self.num_attention_heads
        check(head_dim % 2 == 0, "model.hidden_size", f"head dim {head_dim} must be even for RoPE")
        groups = self.num_query_groups or self.num_attention_heads
        check(
            self.num_attention_heads % groups == 0,
            "model.num_query_groups",
            f"{groups} must divide model.num_attention_heads={self.num_attention_heads}",
        )
        check(
            self.recompute != "selective" or self.attention_dropout > 0,
            "model.recompute",
            "selective recomputes core attention only, and with model.attention_dropout=0 the "
            "fused attention kernel keeps no [seq x seq] scores, so it would save nothing; use "
            "model.recompute=full (whole layers), or none",
        )


@dataclass
class ParallelConfig:
    tensor_parallel: int = ranged(1, AT_LEAST_1)
    pipeline_parallel: int = ranged(1, AT_LEAST_1)
    # model chunks per pipeline rank (interleaved 1F1B)
    virtual_pipeline: int | None = ranged(None, AT_LEAST_1)
    data_parallel: int | None = ranged(None, AT_LEAST_1)  # None = world_size / (TP*PP)
    sequence_parallel: bool = False  # needs Transformer Engine or apex norms (GPU)
    distributed_optimizer: bool = True  # ZeRO-1 sharding of optimizer state over DP
    overlap_grad_reduce: bool = False
    backend: str = "auto"  # auto (nccl with CUDA, gloo without) | gloo | nccl

    def validate(self) -> None:
        """This section's own rules (:class:`ConfigError` names the key)."""
        if self.virtual_pipeline is not None:
            check(
                self.pipeline_parallel > 1 or self.virtual_pipeline == 1,
                "parallel.virtual_pipeline",
                "needs parallel.pipeline_parallel > 1",
            )
        if self.sequence_parallel:
            check(
                self.tensor_parallel > 1,
                "parallel.sequence_parallel",
                "needs parallel.tensor_parallel > 1",
            )


@dataclass
class DiffusionConfig:
    schedule: str = "linear"  # linear | cosine | polynomial | loglinear
    schedule_exponent: float = ranged(2.0, POSITIVE)  # polynomial: alpha = 1 - t**exponent
    modality_schedules: dict[str, str] = field(default_factory=dict)  # e.g. {image: cosine}
    t_sampling: str = "antithetic"  # antithetic | stratified | uniform
    t_min: float = ranged(1e-3, OPEN_UNIT)  # t ~ [t_min, 1]: keeps the 1/t weight finite
    loss_weighting: str = "elbo"  # elbo (-alpha'/(1-alpha)) | uniform
    random_length_prob: float = ranged(0.01, UNIT)  # fraction of sequences cut to a random length
    # fraction of paired sequences with one modality fully masked
    modality_mask_prob: float = ranged(0.0, UNIT)
    # fraction of sequences whose prompt stays unmasked (paired rows: all before the generated
    # modality; text rows: a random prefix)
    clean_prompt_prob: float = ranged(0.0, UNIT)
    restrict_loss_to_modality: bool = False  # -inf logits outside a position's modality range

    def validate(self) -> None:
        """This section's own rules (:class:`ConfigError` names the key)."""
        for mod, sched in self.modality_schedules.items():
            check(
                mod in _MODALITIES,
                f"diffusion.modality_schedules.{mod}",
                f"'{mod}' is not a modality (one of {', '.join(_MODALITIES)})",
            )
            check(
                sched in CHOICES["diffusion.schedule"],
                f"diffusion.modality_schedules.{mod}",
                f"'{sched}' is not one of {', '.join(CHOICES['diffusion.schedule'])}",
            )


@dataclass
class LogicalRecipeConfig:
    """SDE batch rescaling: ``optim.lr/beta1/beta2/eps/weight_decay`` are the values
    tuned at ``ref_batch`` sequences over ``ref_tokens`` tokens; the trainer runs them rescaled
    to the physical batch ``train.global_batch`` and horizon ``train.steps`` batches."""

    ref_batch: int | None = ranged(None, AT_LEAST_1)  # B0, sequences (required)
    # D0, tokens; None = the physical horizon (batch-only rule)
    ref_tokens: int | None = ranged(None, AT_LEAST_1)
    gamma: float = ranged(0.44, NON_NEGATIVE)  # horizon exponent (fit); 0 = square-root rule
    # critical steps estimate: warn when B > D / (L * s_crit)
    s_crit: float | None = ranged(None, POSITIVE)
    enabled: bool = True  # false = use optim.* as physical values (keeps the section)


@dataclass
class OptimConfig:
    lr: float = ranged(3e-4, POSITIVE)
    min_lr_ratio: float = ranged(0.1, UNIT)  # final lr = lr * min_lr_ratio
    beta1: float = ranged(0.9, OPEN_UNIT)
    beta2: float = ranged(0.95, OPEN_UNIT)
    eps: float = ranged(1e-8, POSITIVE)
    weight_decay: float = ranged(0.1, NON_NEGATIVE)
    clip_grad: float = ranged(1.0, NON_NEGATIVE)  # 0 disables clipping
    schedule: str = "cosine"  # cosine | wsd | constant
    warmup_tokens: int = ranged(0, NON_NEGATIVE)  # in tokens, so it survives a change of batch size
    # wsd: length of the final decay (default 20% of training)
    decay_tokens: int | None = ranged(None, AT_LEAST_1)
    logical: LogicalRecipeConfig | None = None  # set: lr/betas/eps/wd are logical (rescaled)

    def validate(self) -> None:
        """This section's own rules (:class:`ConfigError` names the key)."""
        lg = self.logical
        if lg is not None and lg.enabled:
            check(lg.ref_batch is not None, "optim.logical.ref_batch", "is required (sequences)")


@dataclass
class StreamConfig:
    name: str = ""
    path: str = ""  # MDS directory written by `megadiff preprocess` (has manifest.json)
    proportion: float = 1.0  # share of sequences (rows); normalised over all streams
    tasks: list[str] = field(default_factory=list)  # [] = kind's defaults (t2i+caption, t2s+asr)
    pack: bool = True  # text: pack documents into rows; false = one document per row, padded
    eos_fill: bool = False  # with pack: false: fill the row after its document with <eot>
    # with eos_fill: <eot> tokens after the document (its end marker included), the rest padded
    # (left out of attention); 0 = fill to the end of the row
    eos_fill_length: int = ranged(0, NON_NEGATIVE)
    prompt_end: str = ""  # with pack: false: a row's prompt ends at this text (e.g. "=")
    loss_weight: float = ranged(1.0, POSITIVE)  # multiplies the training loss of this stream's rows
    val_path: str | None = None  # held-out MDS directory; None = the val/ split in its manifest


@dataclass
class DataConfig:
    source: str = "synthetic"  # synthetic (built-in learnable token source) | mds
    streams: list[StreamConfig] = field(default_factory=list)
    vocab: str | None = None  # vocab layout JSON; None = merged from the streams' manifests
    seed: int | None = None  # shuffle/mixing seed; None = train.seed
    shuffle: bool = True  # shuffle shards and samples each epoch
    on_bad_sample: str = "stop"  # a sample that fails to decode: stop (named error) | skip (count)

    def validate(self) -> None:
        """This section's own rules (:class:`ConfigError` names the key)."""
        if self.source != "mds":
            return
        check(bool(self.streams), "data.streams", "data.source=mds needs at least one stream")
        names = [s.name for s in self.streams]
        for i, s in enumerate(self.streams):
            key = f"data.streams[{i}]"
            check(bool(s.name), f"{key}.name", "every stream needs a name")
            check(names.count(s.name) == 1, f"{key}.name", f"'{s.name}' is used twice")
            check(bool(s.path), f"{key}.path", f"stream '{s.name}' needs an MDS directory")
            check(
                s.val_path is None or bool(s.val_path),
                f"{key}.val_path",
                "must be an MDS directory (or null for the stream's own val/ split)",
            )
            check(
                s.proportion >= 0 and s.proportion == s.proportion,
                f"{key}.proportion",
                f"{s.proportion} must be >= 0",
            )
            check(
                not (s.eos_fill and s.pack),
                f"{key}.eos_fill",
                "needs pack: false (one document per row, the rest filled with <eot>)",
            )
            check(
                not (s.eos_fill_length and not s.eos_fill),
                f"{key}.eos_fill_length",
                "needs eos_fill: true (the number of <eot> tokens that fill the row)",
            )
            check(
                not (s.prompt_end and s.pack),
                f"{key}.prompt_end",
                "needs pack: false (one problem per row: its prompt, then its answer)",
            )
            for t in s.tasks:
                check(t in _TASKS, f"{key}.tasks", f"'{t}' is not one of {', '.join(_TASKS)}")
        check(
            sum(s.proportion for s in self.streams) > 0,
            "data.streams",
            "stream proportions sum to zero",
        )


@dataclass
class TrainConfig:
    steps: int = ranged(100, AT_LEAST_1)
    seed: int = ranged(1234, NON_NEGATIVE)
    micro_batch: int = ranged(4, AT_LEAST_1)
    global_batch: int = ranged(8, AT_LEAST_1)
    precision: str = "auto"  # auto (bf16 on GPU, fp32 on CPU) | fp32 | bf16 | fp8
    engine: str = "megatron"  # megatron | deepspeed
    # wall-clock budget: save and exit 75 (requeue)
    exit_after_minutes: float | None = ranged(None, POSITIVE)
    nonfinite: str = "skip"  # non-finite loss/grad: skip (count, no update) | stop (save, exit 3)
    # nonfinite=skip: stop (save, exit 3) after this many skipped steps in a row; 0 = never
    max_nonfinite_streak: int = ranged(10, NON_NEGATIVE)


@dataclass
class DeepSpeedConfig:
    """``train.engine: deepspeed``: data-parallel ZeRO from the same model, data and optim."""

    zero_stage: int = 2  # 0 (plain DP) | 1 (optimizer states) | 2 (+ grads) | 3 (+ params)
    overlap_comm: bool = False
    bucket_size: int = ranged(50_000_000, AT_LEAST_1)  # elements per reduce / all-gather bucket
    extra: dict[str, Any] = field(default_factory=dict)  # raw keys merged into the DS config

    def validate(self) -> None:
        """This section's own rules (:class:`ConfigError` names the key)."""
        check(self.zero_stage in (0, 1, 2, 3), "deepspeed.zero_stage", "must be 0, 1, 2 or 3")


@dataclass
class CheckpointConfig:
    every: int = ranged(0, NON_NEGATIVE)  # steps; 0 = only at the end
    keep: int = ranged(2, AT_LEAST_1)
    load: str | None = None  # another run's checkpoint to start from
    dir: str | None = None  # None = <run.dir>/checkpoints
    resume: bool = True  # continue from the newest valid checkpoint in dir
    load_optimizer: bool = True  # checkpoint.load: also restore optimizer state
    reset_step: bool = False  # checkpoint.load: start at step 0 (weights only progress)
    checksums: bool = True  # SHA-256 every file on save; verify on load (sizes always)
    save_on_exit: bool = True  # save when training ends (done, signal, budget, non-finite)
    async_save: bool = False  # write tensor files in a background process while training goes on

    def validate(self) -> None:
        """This section's own rules (:class:`ConfigError` names the key)."""
        check(
            self.dir is None or bool(self.dir),
            "checkpoint.dir",
            "must be a directory path (or null for <run.dir>/checkpoints)",
        )


@dataclass
class EvalConfig:
    """Held-out evaluation in the training loop (:mod:`megadiff.training.evaluation`)."""

    every: int = ranged(0, NON_NEGATIVE)  # steps between evals (also at step 0, the end); 0 = off
    batches: int = ranged(8, AT_LEAST_1)  # held-out set: batches x batch_size sequences per stream
    batch_size: int = ranged(16, AT_LEAST_1)  # sequences per eval batch
    t_points: int = ranged(2, AT_LEAST_1)  # masking levels (t) per sequence, stratified grid
    seed: int = ranged(0, NON_NEGATIVE)  # the held-out noise (level offsets, masks)


@dataclass
class WandbConfig:
    """Weights & Biases (``pip install megadiff[wandb]``): on when ``project`` is set and
    ``mode`` is not ``disabled``."""

    project: str | None = None
    mode: str = "disabled"  # online | offline (no network; `wandb sync` later) | disabled
    entity: str | None = None  # team or user; None = the logged-in default


@dataclass
class LoggingConfig:
    every: int = ranged(1, AT_LEAST_1)  # progress line every N steps
    progress: bool = True  # one-line progress display on the terminal
    tensorboard: bool = True  # TensorBoard events under <run.dir>/tensorboard/
    wandb: WandbConfig = field(default_factory=WandbConfig)

    def validate(self) -> None:
        """This section's own rules (:class:`ConfigError` names the key)."""
        w = self.wandb
        check(
            w.project is None or bool(w.project.strip()),
            "logging.wandb.project",
            "must be a project name (or null for no W&B)",
        )
        check(
            w.mode == "disabled" or w.project is not None,
            "logging.wandb.mode",
            f"'{w.mode}' needs logging.wandb.project (the W&B project to log to)",
        )


POLICY_FEATURES = ("confidence", "margin", "entropy", "topk")
POLICY_ACTIONS = ("bernoulli", "dpls")
POLICY_REWARDS = ("multiplicative", "additive")


@dataclass
class PolicyTrainConfig:
    """``megadiff policy train``: GRPO for an unmasking policy over a frozen dLLM."""

    ckpt: str | None = None  # the frozen dLLM: a checkpoint (any layout) or its run directory
    task: str | None = None  # built-in task name, or module:function (a verifier)
    prompts: str | None = None  # JSONL of prompts (one JSON string per line); None = the task's
    gen_length: int = ranged(32, AT_LEAST_1)  # generated positions per rollout
    block_length: int | None = ranged(None, AT_LEAST_1)  # None = full diffusion (one block)
    sampler_steps: int | None = ranged(None, AT_LEAST_1)  # step cap; None = one per position
    cfg_scale: float = ranged(0.0, NON_NEGATIVE)  # classifier-free guidance (2 NFE a step)
    features: list[str] = field(default_factory=lambda: ["confidence"])
    action: str = "bernoulli"  # bernoulli | dpls (training actions)
    tau: float = ranged(1.0, POSITIVE)  # policy temperature
    group_size: int = ranged(8, AT_LEAST_1)  # rollouts per prompt (G)
    prompts_per_step: int = ranged(2, AT_LEAST_1)  # over all ranks; divisible by the world size
    clip_eps: float = ranged(0.5, POSITIVE)
    inner_iters: int = ranged(2, AT_LEAST_1)  # optimizer steps per batch of rollouts (mu)
    kl: float = ranged(0.0, NON_NEGATIVE)  # KL penalty to the initial policy; 0 = off
    lr: float = ranged(3e-5, POSITIVE)
    weight_decay: float = ranged(0.1, NON_NEGATIVE)
    grad_clip: float = ranged(0.2, NON_NEGATIVE)  # 0 = off
    alpha: float = ranged(1.0, NON_NEGATIVE)  # reward = correct * (1 - NFE/T)^alpha
    reward: str = "multiplicative"  # multiplicative | additive (collapses)
    std_normalize: bool = False  # divide advantages by the group's std
    steps: int = ranged(100, AT_LEAST_1)  # policy updates (generation rounds)
    seed: int = ranged(123, NON_NEGATIVE)

    def validate(self) -> None:
        """This section's own rules (:class:`ConfigError` names the key)."""
        bad = [f for f in self.features if f not in POLICY_FEATURES]
        check(
            bool(self.features) and not bad and len(set(self.features)) == len(self.features),
            "policy.features",
            f"must be distinct names from {list(POLICY_FEATURES)}, got {self.features}",
        )
        check(self.action in POLICY_ACTIONS, "policy.action", f"must be one of {POLICY_ACTIONS}")
        check(self.reward in POLICY_REWARDS, "policy.reward", f"must be one of {POLICY_REWARDS}")
        if self.block_length is not None and self.block_length > self.gen_length:
            raise ConfigError(
                f"config key 'policy.block_length': {self.block_length} > policy.gen_length "
                f"{self.gen_length}; use null for full diffusion"
            )


@dataclass
class RunConfig:
    dir: str = "runs/default"
    name: str = ""


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    policy: PolicyTrainConfig = field(default_factory=PolicyTrainConfig)
    run: RunConfig = field(default_factory=RunConfig)
    # task -> sampler settings `megadiff generate` uses for this run's checkpoints, e.g.
    # {text: {gen_length: 5}} (megadiff.generation.settings; flags take precedence)
    sampling: dict[str, dict[str, Any]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


CHOICES: dict[str, tuple[str, ...]] = {
    "model.normalization": ("RMSNorm", "LayerNorm"),
    "model.transformer_impl": ("auto", "local", "transformer_engine"),
    "model.parameterization": ("standard", "completep"),
    "model.recompute": ("none", "selective", "full"),
    "model.recompute_method": ("uniform", "block"),
    "parallel.backend": ("auto", "gloo", "nccl"),
    "diffusion.schedule": ("linear", "cosine", "polynomial", "loglinear"),
    "diffusion.t_sampling": ("antithetic", "stratified", "uniform"),
    "diffusion.loss_weighting": ("elbo", "uniform"),
    "optim.schedule": ("cosine", "wsd", "constant"),
    "data.source": ("synthetic", "mds"),
    "data.on_bad_sample": ("stop", "skip"),
    "train.precision": ("auto", "fp32", "bf16", "fp8"),
    "train.engine": ("megatron", "deepspeed"),
    "train.nonfinite": ("skip", "stop"),
    "logging.wandb.mode": ("online", "offline", "disabled"),
}


# ----------------------------------------------------------------------------- parsing


def _unknown_key(key: str, valid: list[str]) -> ConfigError:
    close = difflib.get_close_matches(key.rsplit(".", 1)[-1], [v.rsplit(".", 1)[-1] for v in valid])
    prefix = key.rsplit(".", 1)[0] + "." if "." in key else ""
    hint = f"; did you mean '{prefix}{close[0]}'?" if close else ""
    return ConfigError(f"unknown config key '{key}'{hint} (valid here: {', '.join(valid)})")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check/convert one YAML value against a dataclass field type."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        real = [a for a in args if a is not type(None)]
        if len(real) == 1:  # Optional[X]: X's own message names the exact (nested) key
            return _coerce(value, real[0], key)
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError:
                pass
        raise ConfigError(f"config key '{key}': {value!r} is not a valid {tp}")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{key}' must be a mapping, got {value!r}")
        return _build(tp, value, key)
    if origin is list:
        (item,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(f"config key '{key}' must be a list, got {value!r}")
        return [_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        kt, vt = typing.get_args(tp)
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{key}' must be a mapping, got {value!r}")
        return {_coerce(k, kt, key): _coerce(v, vt, f"{key}.{k}") for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"config key '{key}' must be true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"config key '{key}' must be an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads "1e-3" (no dot) as a string
            with contextlib.suppress(ValueError):
                value = float(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"config key '{key}' must be a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"config key '{key}' must be a string, got {value!r}")
        value = str(value)
        if key in CHOICES and value not in CHOICES[key]:
            close = difflib.get_close_matches(value, CHOICES[key], n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise ConfigError(
                f"config key '{key}': '{value}' is not one of {', '.join(CHOICES[key])}{hint}"
            )
        return value
    return value


def _build(cls: type, values: dict[str, Any], prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for k, v in values.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if k not in names:
            raise _unknown_key(key, [f"{prefix}.{n}" if prefix else n for n in names])
        kwargs[k] = _coerce(v, hints[k], key)
    return cls(**kwargs)


def set_dotted(tree: dict[str, Any], key: str, value: Any) -> None:
    """Set ``tree[a][b][c] = value`` for the dotted ``key`` ``a.b.c``, creating sections."""
    parts = key.split(".")
    node = tree
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override '{key}': '{p}' is not a section")
    node[parts[-1]] = value


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """``["train.steps=10", "model.qk_layernorm=true"]`` -> nested dict (values parsed as YAML)."""
    tree: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' must look like key=value (e.g. train.steps=10)")
        key, raw = item.split("=", 1)
        key = key.strip()
        if not key:
            raise ConfigError(f"override '{item}' has an empty key")
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError as e:
            raise ConfigError(f"override '{item}': value is not valid YAML ({e})") from e
        set_dotted(tree, key, value)
    return tree


def merge_dicts(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """``over`` merged into ``base``, recursively for nested mappings (a new dict)."""
    out = dict(base)
    for k, v in over.items():
        out[k] = (
            merge_dicts(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
        )
    return out


class DuplicateKeyError(yaml.MarkedYAMLError):
    """A mapping key given twice in one YAML mapping."""

    def __init__(self, key: Any, first_line: int, mark: yaml.Mark) -> None:
        super().__init__(problem=f"key '{key}' is given twice", problem_mark=mark)
        self.key, self.first_line = key, first_line


class UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses duplicate keys in a mapping (instead of the last one
    silently winning); ``<<`` merge keys may still be overridden."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        first: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=deep)
            with contextlib.suppress(TypeError):  # unhashable keys are refused by SafeLoader
                if key in first:
                    raise DuplicateKeyError(key, first[key], key_node.start_mark)
                first[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep)


def read_yaml_mapping(path: str | os.PathLike, what: str = "config file") -> dict[str, Any]:
    """A YAML file's top-level mapping ({} when empty); :class:`ConfigError` names the file (and
    line) when it is missing, a directory, unreadable, not UTF-8, not YAML, has a key twice or
    is not a mapping."""
    p = Path(path)
    if p.is_dir():
        raise ConfigError(f"{what} '{p}' is a directory, not a YAML file")
    if not p.exists():
        raise ConfigError(f"{what} '{p}' does not exist (see examples/ for templates)")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(
            f"{what} '{p}' is not UTF-8 text (byte {e.start}: {e.reason}); is it a YAML file?"
        ) from e
    except OSError as e:
        raise ConfigError(f"{what} '{p}' cannot be read: {e}") from e
    loader = None
    try:
        loader = UniqueKeyLoader(text)
        loader.name = str(p)  # error marks name the file
        tree = loader.get_single_data()
    except DuplicateKeyError as e:
        raise ConfigError(
            f"{what} '{p}', line {e.problem_mark.line + 1}: key '{e.key}' is given twice (first "
            f"on line {e.first_line}); keep one"
        ) from e
    except yaml.YAMLError as e:
        raise ConfigError(f"{what} '{p}' is not valid YAML: {e}") from e
    finally:
        if loader is not None:
            loader.dispose()
    if tree is None:
        return {}
    if not isinstance(tree, dict):
        raise ConfigError(f"{what} '{p}' must contain a mapping of sections")
    return tree


def load_config(path: str | os.PathLike | None, overrides: list[str] | None = None) -> Config:
    """Read YAML (or nothing), apply dotted overrides, return a type-checked ``Config``."""
    tree = read_yaml_mapping(path) if path is not None else {}
    tree = merge_dicts(tree, parse_overrides(overrides or []))
    return _build(Config, tree)


def config_from_dict(tree: dict[str, Any]) -> Config:
    return _build(Config, tree)


# ----------------------------------------------------------------------------- validation


def check(cond: bool, key: str, msg: str) -> None:
    """Raise :class:`ConfigError` naming ``key`` unless ``cond``."""
    if not cond:
        raise ConfigError(f"config key '{key}': {msg}")


def check_ranges(node: Any, prefix: str = "") -> None:
    """Every number in the tree below ``node`` is finite and inside its field's :class:`Range`."""
    for f in dataclasses.fields(node):
        key, value = f"{prefix}{f.name}", getattr(node, f.name)
        if dataclasses.is_dataclass(value):
            check_ranges(value, f"{key}.")
        elif isinstance(value, list):
            for i, item in enumerate(value):
                if dataclasses.is_dataclass(item):
                    check_ranges(item, f"{key}[{i}].")
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            check(math.isfinite(value), key, f"must be a finite number, got {value}")
            rng = f.metadata.get("range")
            if rng is not None and not rng.contains(value):
                raise ConfigError(f"config key '{key}': must be {rng.describe()}, got {value}")


def check_sections(cfg: Config) -> None:
    """Every number's range, then each section's own rules (no cross-section rules, no disk)."""
    check_ranges(cfg)
    c = cfg
    sections = (c.model, c.parallel, c.diffusion, c.optim, c.data, c.deepspeed, c.checkpoint)
    for section in (*sections, c.logging, c.policy):
        section.validate()
    check(bool(cfg.run.dir), "run.dir", "must be a directory path")
    if cfg.sampling:
        check_sampling(cfg.sampling)


def check_sampling(tree: dict[str, dict[str, Any]]) -> None:
    """The ``sampling`` section gives every task it names valid sampler settings."""
    from megadiff.generation.settings import check_run_sampling

    try:
        check_run_sampling(tree)
    except ValueError as e:  # TaskError, SamplingError: "sampling.TASK[.KEY]: what is wrong"
        key, _, msg = str(e).partition(": ")
        raise ConfigError(f"config key '{key}': {msg}") from e


def dump_config(cfg: Config) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
