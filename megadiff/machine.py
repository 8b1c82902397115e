"""A resolved config checked against the machine this rank runs on, before any process group or
model exists: settings that need a GPU (or Transformer Engine) and a rough memory estimate.

:func:`check_machine` raises :class:`~megadiff.config.ConfigError` naming the key, so
``megadiff train`` exits 2 instead of failing while building the model, allocating terabytes or
swapping for minutes. The estimate (weights, gradients, Adam state, the activations of the
micro-batches in flight, the runtime) was calibrated against measured CPU peaks
(docs/benchmarks.md); ``megadiff plan`` prints it by part.
"""

from __future__ import annotations

import copy
import importlib.util
import os
from dataclasses import dataclass

from megadiff.config import Config, ConfigError, check

GIB = 1024**3


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def transformer_engine_available() -> bool:
    """True when Transformer Engine imports and CUDA is present (never on CPU boxes)."""
    if not cuda_available() or importlib.util.find_spec("transformer_engine") is None:
        return False
    try:
        import transformer_engine.pytorch  # noqa: F401
    except Exception:
        return False
    return True


def check_gpu_settings(cfg: Config) -> None:
    """Settings that need CUDA or Transformer Engine, refused on a machine without them."""
    on_gpu = cuda_available()
    prec = cfg.train.precision
    check(
        on_gpu or prec != "bf16",
        "train.precision",
        "bf16 needs a CUDA GPU and this machine has none; use train.precision=fp32 "
        "(or auto: bf16 on GPU, fp32 on CPU)",
    )
    impl = cfg.model.transformer_impl
    if impl == "transformer_engine":
        check(
            transformer_engine_available(),
            "model.transformer_impl",
            f"model.transformer_impl={impl} needs CUDA and Transformer Engine (pip install -e "
            "'.[gpu]' on a GPU box); use model.transformer_impl=local (or auto) on CPU",
        )
    if prec == "fp8" and (impl == "local" or impl == "auto" and not transformer_engine_available()):
        check_local_fp8(cfg, on_gpu)  # the local spec runs (specs.resolve_impl's rule)
    if cfg.model.recompute == "selective" and impl != "local":
        check(
            not transformer_engine_available(),
            "model.recompute",
            "selective recomputes core attention, and Transformer Engine's fused attention "
            "keeps no attention scores, so it would save nothing; use model.recompute=full",
        )
    check(
        on_gpu or cfg.parallel.backend != "nccl",
        "parallel.backend",
        "nccl needs CUDA GPUs; use parallel.backend=gloo (or auto) on CPU",
    )


def check_local_fp8(cfg: Config, on_gpu: bool) -> None:
    """megadiff's own FP8 GEMMs (``torch._scaled_mm``) need an sm_89+ GPU (or emulate on CPU)
    and every GEMM dimension, the tokens of a micro-batch included, divisible by 16."""
    import torch

    from megadiff.model.fp8 import GEMM_MULTIPLE as k

    if on_gpu:
        cap = torch.cuda.get_device_capability()
        check(
            cap >= (8, 9),
            "train.precision",
            f"fp8 GEMMs need compute capability 8.9+ (Ada, Hopper or later); this GPU is "
            f"{cap[0]}.{cap[1]}; use train.precision=bf16",
        )
    m, tp = cfg.model, cfg.parallel.tensor_parallel
    head = m.hidden_size // m.num_attention_heads
    groups = m.num_query_groups or m.num_attention_heads
    dims = {
        "model.hidden_size": m.hidden_size,
        "model.ffn_hidden_size (per tensor-parallel rank)": m.ffn_size // tp,
        "model.num_attention_heads (x head size per tensor-parallel rank)": (
            m.num_attention_heads * head // tp
        ),
        "model.num_query_groups (q, k, v columns per tensor-parallel rank)": (
            (m.num_attention_heads + 2 * groups) * head // tp
        ),
        "train.micro_batch (x model.seq_length: tokens per micro-batch)": (
            cfg.train.micro_batch * m.seq_length
        ),
    }
    for what, n in dims.items():
        check(
            n % k == 0,
            what.split(" ")[0],
            f"train.precision=fp8 needs every GEMM dimension divisible by {k}; {what} is {n}",
        )


# Per-layer activations relative to ``tokens x (10 h + 3 ffn)`` values: Transformer Engine's
# fused norms, RoPE and SwiGLU keep about that many (Korthikanti et al. 2022); the local spec's
# unfused ones keep about twice as many (measured on CPU, docs/benchmarks.md).
ACTIVATION_FACTOR = {"transformer_engine": 1.0, "local": 2.07}
# What the process holds besides the model: Python, torch, megatron-core (measured on CPU:
# peak RSS of a 1-layer, width-64 run), and on a GPU the CUDA context, cuBLAS and NCCL
# workspaces (assumed, not measured)
RUNTIME_BYTES = {"cpu": int(0.40 * GIB), "gpu": int(1.5 * GIB)}


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes one rank needs, by part (``activations``: every micro-batch in flight)."""

    weights: int
    gradients: int
    optimizer: int
    activations: int
    runtime: int = 0

    @property
    def total(self) -> int:
        return self.weights + self.gradients + self.optimizer + self.activations + self.runtime

    def describe(self) -> str:
        parts = ("weights", "gradients", "optimizer", "activations", "runtime")
        inner = ", ".join(f"{p} {getattr(self, p) / GIB:.1f}" for p in parts)
        return f"{self.total / GIB:.1f} GiB ({inner} GiB)"


def parameters_per_rank(cfg: Config) -> int:
    """Parameters held by the rank with the most: a TP shard of the last pipeline stage (its
    layers' and the output layer's matrices are sharded, the norms replicated)."""
    m, p = cfg.model, cfg.parallel
    embeddings = m.padded_vocab_size() * m.hidden_size * (2 if p.pipeline_parallel == 1 else 1)
    layers = m.num_layers // p.pipeline_parallel
    norms = m.layer_norm_parameter_count()
    sharded = (m.layer_parameter_count() - norms) * layers + embeddings
    return sharded // p.tensor_parallel + norms * layers + m.norm_parameter_count(m.hidden_size)


def is_half(cfg: Config, on_gpu: bool) -> bool:
    t = cfg.train
    return t.precision == "bf16" or (t.precision in ("fp8", "auto") and on_gpu)


def optimizer_bytes(cfg: Config, on_gpu: bool, distributed: bool) -> int:
    """Adam's moments (+ fp32 main weights with bf16) of one rank, sharded over DP with the
    distributed optimizer."""
    shards = (cfg.parallel.data_parallel or 1) if distributed else 1
    return (12 if is_half(cfg, on_gpu) else 8) * parameters_per_rank(cfg) // shards


def micro_batch_activations(cfg: Config, on_gpu: bool, recompute: str | None = None) -> int:
    """Bytes one micro-batch's forward keeps for its backward on the first pipeline stage (its
    layers, scaled by :data:`ACTIVATION_FACTOR`) plus the fp32 logits and their gradients on
    the last; ``recompute`` overrides ``model.recompute`` (``full``: every layer)."""
    m, p, t = cfg.model, cfg.parallel, cfg.train
    if recompute is not None and recompute != m.recompute:
        cfg = copy.deepcopy(cfg)
        cfg.model.recompute = recompute
        if recompute == "full":
            cfg.model.recompute_method, cfg.model.recompute_num_layers = "uniform", 1
    act = 2 if is_half(cfg, on_gpu) else 4
    impl = m.transformer_impl
    if impl == "auto":
        impl = "transformer_engine" if on_gpu else "local"
    layers = int(layer_activations(cfg, act) * ACTIVATION_FACTOR[impl])
    tokens = t.micro_batch * m.seq_length
    logits = 3 * tokens * m.padded_vocab_size() * 4 // p.tensor_parallel  # fp32 logits, grads
    return layers + (logits if p.pipeline_parallel == 1 else 0)


def micro_batches_in_flight(cfg: Config, n_micro: int) -> int:
    """Micro-batches whose activations the first pipeline stage holds at once (1F1B: up to PP;
    interleaved: up to ``(PP - 1) x 2 + (VPP - 1) x PP + 1`` model chunks' worth, over VPP)."""
    p = cfg.parallel
    pp, vpp = p.pipeline_parallel, p.virtual_pipeline or 1
    if pp == 1:
        return 1
    if vpp == 1:
        return min(pp, n_micro)
    chunks = min(n_micro * vpp, (pp - 1) * 2 + (vpp - 1) * pp + 1)
    return -(-chunks // vpp)


def estimate_memory(cfg: Config, on_gpu: bool) -> MemoryEstimate:
    """One rank's training memory for a resolved ``cfg``: weights, gradients, Adam state,
    the activations of every micro-batch in flight and the runtime (calibrated on CPU,
    docs/benchmarks.md)."""
    p, t = cfg.parallel, cfg.train
    n = parameters_per_rank(cfg)
    n_micro = t.global_batch // (t.micro_batch * (p.data_parallel or 1))
    return MemoryEstimate(
        weights=n * (2 if is_half(cfg, on_gpu) else 4),
        gradients=n * 4,
        optimizer=optimizer_bytes(cfg, on_gpu, p.distributed_optimizer),
        activations=micro_batch_activations(cfg, on_gpu) * micro_batches_in_flight(cfg, n_micro),
        runtime=RUNTIME_BYTES["gpu" if on_gpu else "cpu"],
    )


def layer_activations(cfg: Config, act: int) -> int:
    """Values the transformer layers of one pipeline stage keep for one micro-batch's backward,
    in bytes of ``act`` per value.

    A layer keeps ``tokens x (10 h + 3 ffn)`` values (TP-sharded), plus its ``[seq x seq]``
    attention scores when attention dropout runs the unfused kernel. ``model.recompute``:

    * ``selective``: no layer keeps scores; the one being recomputed in backward holds them;
    * ``full``, ``uniform`` (N): each group of N layers keeps only its input (``tokens x h``),
      and one group's activations are rebuilt at a time in backward (plus half a layer of
      gradients while it is);
    * ``full``, ``block`` (N): the first N layers of each model chunk keep only their input,
      the others keep everything; the peak is the larger of the end of forward and the
      rebuilding of one layer (1.5 layers).
    """
    m, p, t = cfg.model, cfg.parallel, cfg.train
    tokens = t.micro_batch * m.seq_length
    dense = tokens * (10 * m.hidden_size + 3 * m.ffn_size) * act // p.tensor_parallel
    scores = 0
    if m.attention_dropout > 0:  # attention dropout runs the unfused kernel: scores are kept
        heads = m.num_attention_heads // p.tensor_parallel
        scores = 2 * t.micro_batch * heads * m.seq_length**2 * act
    per_layer = dense + scores
    layers = m.num_layers // p.pipeline_parallel
    chunks = (p.virtual_pipeline or 1) if p.pipeline_parallel > 1 else 1
    layer_input = tokens * m.hidden_size * act
    n = m.recompute_num_layers
    if m.recompute == "selective":
        return layers * dense + scores
    # a group rebuilt in backward holds its activations and, for one layer at a time, their
    # gradients: about half a layer more (calibrated on CPU, docs/benchmarks.md)
    rebuilding = per_layer // 2
    if m.recompute == "full" and m.recompute_method == "uniform":
        return (layers // n) * layer_input + n * per_layer + rebuilding
    if m.recompute == "full":  # block: the peak is at the end of forward or while rebuilding
        kept = n * chunks
        return kept * layer_input + max((layers - kept) * per_layer, per_layer + rebuilding)
    return layers * per_layer


def ranks_on_this_node() -> int:
    """Ranks sharing this machine's memory (torchrun's LOCAL_WORLD_SIZE, Slurm's tasks per
    node; 1 otherwise)."""
    for var in ("LOCAL_WORLD_SIZE", "SLURM_NTASKS_PER_NODE"):
        value = os.environ.get(var, "")
        if value.isdigit() and int(value) > 0:
            return int(value)
    return 1


def available_memory(on_gpu: bool) -> tuple[int, str]:
    """Bytes this rank may use and where they are: free GPU memory of its device on CUDA, else
    its share of the host's available RAM (psutil, or /proc/meminfo)."""
    if on_gpu:
        import torch

        from megadiff.parallel.env import read_launch_env

        index = read_launch_env().local_rank % torch.cuda.device_count()  # as init_distributed
        free, _ = torch.cuda.mem_get_info(index)
        return free, "free GPU memory"
    try:
        import psutil

        total = psutil.virtual_memory().available
    except ImportError:
        total = _meminfo_available()
    share = ranks_on_this_node()
    where = "available RAM" + (f" / {share} ranks on this node" if share > 1 else "")
    return total // share, where


def _meminfo_available() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    raise OSError("/proc/meminfo has no MemAvailable")


def check_memory(cfg: Config, on_gpu: bool) -> None:
    """Refuse a shape whose estimated memory per rank exceeds what this rank has."""
    need = estimate_memory(cfg, on_gpu)
    try:
        have, where = available_memory(on_gpu)
    except (OSError, RuntimeError):
        return  # nothing to compare with: let the run try
    if need.total > have:
        m, t = cfg.model, cfg.train
        raise ConfigError(
            f"config key 'model': this shape needs at least {need.describe()} per rank, but "
            f"this machine has {have / GIB:.1f} GiB ({where}); model.hidden_size="
            f"{m.hidden_size}, model.num_layers={m.num_layers}, model.seq_length={m.seq_length}, "
            f"train.micro_batch={t.micro_batch}: make the model or micro-batch smaller, or use "
            "more ranks (parallel.tensor_parallel / pipeline_parallel, data parallel shards "
            "the optimizer state)"
        )


def check_machine(cfg: Config) -> None:
    """A resolved config against this machine: GPU-only settings, the logging packages, then
    memory."""
    from megadiff.training.sinks import check_logging

    check_gpu_settings(cfg)
    check_logging(cfg)
    check_memory(cfg, cuda_available())
