"""``megadiff generate``: sample text, images (PNG) or speech (WAV) from a training checkpoint.

Writes the decoded samples to ``--out`` and one JSON line per sample to ``samples.jsonl``
(prompt, settings, NFE, timing). Sampler settings come from, in order of precedence: the
command line, ``--defaults FILE`` (as written by ``tools/eval_sampling.py``), the checkpoint's
``sampling`` config section, the package's ``megadiff/generation/defaults.json``
(:mod:`megadiff.generation.settings`). The work is done by :mod:`megadiff.generation.api`; this
module is its command line.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

from megadiff.config import Range
from megadiff.data.names import TASKS
from megadiff.diffusion.block_cache import CACHES
from megadiff.diffusion.sampling import SamplingError
from megadiff.diffusion.strategies import STRATEGIES
from megadiff.flags import AT_LEAST_1, NON_NEGATIVE, number
from megadiff.generation.api import generate, read_prompts, write_outputs
from megadiff.generation.load import CheckpointError, GenerationBundle, load_for_generation
from megadiff.generation.settings import BUFFER_KEYS, TaskSettings, read_defaults, task_settings
from megadiff.generation.tasks import TaskError
from megadiff.policy.network import PolicyError

UNIT_OPEN_LOW = Range(0, 1, lo_open=True)  # (0, 1]: --threshold, --top-p
POSITIVE = Range(0, lo_open=True)

FLAG_KEYS = {  # flag (argparse dest) -> SamplerConfig field
    "strategy": "strategy",
    "steps": "steps",
    "threshold": "threshold",
    "block_length": "block_length",
    "cfg": "cfg_scale",
    "temperature": "temperature",
    "top_k": "top_k",
    "top_p": "top_p",
    "entropy_bound": "entropy_bound",
    "cache": "cache",
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--ckpt", required=True, help="checkpoint: step_N dir, a run's checkpoints/ or a run dir"
    )
    p.add_argument("--task", required=True, help=f"one of {', '.join(TASKS)}")
    p.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    p.add_argument(
        "--prompts",
        help="file with one prompt per line; FILE.jsonl: one JSON string per line (prompts "
        "with newlines)",
    )
    p.add_argument(
        "--num-samples",
        type=number(int, AT_LEAST_1),
        default=1,
        help="samples per prompt (sample i uses seed + i; they differ only when the sampler "
        "draws at random: --temperature > 0 or --strategy random)",
    )
    p.add_argument(
        "--strategy",
        choices=STRATEGIES,
        help="which masked positions to commit per step (default: the task's, defaults.json; "
        "policy: a trained unmasking policy, --policy)",
    )
    p.add_argument(
        "--policy",
        help="strategy policy: a policy folder (model.safetensors + policy.json) or a "
        "`megadiff policy train` run directory (its latest checkpoint)",
    )
    p.add_argument(
        "--policy-temperature",
        type=number(float, POSITIVE),
        default=1.0,
        help="strategy policy: temperature tau of its Bernoulli actions (an empty action "
        "commits the position of the largest policy logit)",
    )
    p.add_argument(
        "--steps", type=number(int, AT_LEAST_1), help="sampler steps (cap for adaptive strategies)"
    )
    p.add_argument(
        "--threshold", type=number(float, UNIT_OPEN_LOW), help="confidence threshold tau in (0, 1]"
    )
    p.add_argument(
        "--block-length",
        type=number(int, NON_NEGATIVE),
        help="semi-autoregressive block length (0 = one block)",
    )
    p.add_argument(
        "--cfg", type=number(float, NON_NEGATIVE), help="classifier-free guidance scale (0 = off)"
    )
    p.add_argument(
        "--temperature", type=number(float, NON_NEGATIVE), help="sampling temperature (0 = greedy)"
    )
    p.add_argument("--top-k", type=number(int, NON_NEGATIVE), help="top-k filtering (0 = off)")
    p.add_argument("--top-p", type=number(float, UNIT_OPEN_LOW), help="nucleus filtering (1 = off)")
    p.add_argument(
        "--entropy-bound",
        type=number(float, NON_NEGATIVE),
        help="EB-sampler gamma (strategy entropy)",
    )
    p.add_argument(
        "--cache",
        choices=CACHES,
        help="block KV cache: none (exact), prefix, dual (approximate; need --block-length)",
    )
    p.add_argument(
        "--gen-length",
        type=number(int, AT_LEAST_1),
        help="tokens generated for text, caption and asr (default: the checkpoint's "
        "sampling.TASK.gen_length, else 32)",
    )
    p.add_argument(
        "--audio-frames",
        type=number(int, AT_LEAST_1),
        help="t2s frames (default: the checkpoint's sampling.t2s.audio_frames, else from the "
        "text length)",
    )
    p.add_argument(
        "--batch-size",
        type=number(int, AT_LEAST_1),
        default=16,
        help="samples decoded together per forward pass (memory vs speed)",
    )
    p.add_argument(
        "--seed", type=number(int, NON_NEGATIVE), default=0, help="sample i uses seed + i"
    )
    p.add_argument("--defaults", help="JSON of per-task sampler settings")
    p.add_argument("--out", default="samples", help="output directory")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def flag_settings(args: argparse.Namespace) -> dict:
    """The settings given as flags, by :class:`SamplerConfig` field or buffer-length name
    (``--block-length 0``: one block, ``block_length=None``)."""
    settings = {}
    for flag, key in {**FLAG_KEYS, **{k: k for k in BUFFER_KEYS}}.items():
        v = getattr(args, flag, None)
        if flag == "block_length" and v == 0:
            settings[key] = None  # full diffusion
        elif v is not None:
            settings[key] = v
    return settings


def checkpoint_settings(
    bundle: GenerationBundle, task: str, flags: dict, defaults: dict | None
) -> TaskSettings:
    """The task's settings with the checkpoint's ``sampling`` section as a layer (said on
    stdout when it has one for ``task``)."""
    run = bundle.cfg.sampling if bundle.cfg is not None else {}
    try:
        settings = task_settings(task, flags, defaults, run)
    except (TaskError, SamplingError) as e:
        raise CheckpointError(f"checkpoint {bundle.path}: config.yaml: {e}") from e
    if run.get(task):
        given = ", ".join(f"{k}={v}" for k, v in run[task].items())
        print(f"the checkpoint's sampling.{task}: {given} (flags and --defaults take precedence)")
    return settings


def _prompts(args: argparse.Namespace) -> list[str]:
    """``--prompt``s, then the prompts of ``--prompts FILE``."""
    prompts = list(args.prompt)
    for i, p in enumerate(prompts, 1):
        if not p.strip():
            raise TaskError(f"--prompt number {i} is empty: give the text (or file) to start from")
    if args.prompts:
        from_file = read_prompts(args.prompts)
        if not from_file:
            raise TaskError(f"prompts file '{args.prompts}' has no prompts (all lines are empty)")
        prompts += from_file
    if not prompts:
        raise TaskError("no prompt: give --prompt TEXT or --prompts FILE")
    return prompts


def _policy(args: argparse.Namespace, strategy: str):
    """The ``--policy`` as the sampler's callable (strategy policy only)."""
    if strategy != "policy":
        if args.policy:
            raise TaskError(f"--policy is for --strategy policy (the strategy is '{strategy}')")
        return None
    if not args.policy:
        raise TaskError("--strategy policy needs --policy PATH (a trained policy folder or run)")
    from megadiff.policy.network import load_policy
    from megadiff.policy.sampler import PolicySampler

    return PolicySampler(load_policy(args.policy), tau=args.policy_temperature)


def warn_identical_samples(cfg, num_samples: int) -> None:
    """Say so on stderr when ``--num-samples > 1`` would give identical samples per prompt."""
    if num_samples > 1 and cfg.deterministic:
        print(
            f"megadiff generate: warning: --num-samples {num_samples} with a deterministic "
            f"sampler (strategy {cfg.strategy}, temperature 0) gives {num_samples} identical "
            "samples per prompt; add --temperature 1 (or --strategy random) for different ones",
            file=sys.stderr,
        )


def run(args: argparse.Namespace) -> int:
    def fail(msg: str) -> int:
        print(f"megadiff generate: error: {msg}", file=sys.stderr)
        return 2

    try:
        if args.task not in TASKS:
            raise TaskError(f"unknown task '{args.task}' (known: {', '.join(TASKS)})")
        prompts = _prompts(args)
        defaults = read_defaults(args.defaults) if args.defaults else None
        flags = flag_settings(args)
        for key, tasks in BUFFER_KEYS.items():
            if key in flags and args.task not in tasks:
                flag = "--" + key.replace("_", "-")
                raise TaskError(f"{flag} is for task {' or '.join(tasks)}, not {args.task}")
        # bad flags, defaults or policy fail before the checkpoint is read
        strategy = task_settings(args.task, flags, defaults).sampler.strategy
        policy = _policy(args, strategy)
        t0 = time.time()
        bundle = load_for_generation(args.ckpt)
        bundle.require(args.task)
        settings = checkpoint_settings(bundle, args.task, flags, defaults)
        cfg = settings.sampler
        if cfg.strategy != strategy:  # chosen by the checkpoint's sampling section
            policy = _policy(args, cfg.strategy)
        warn_identical_samples(cfg, args.num_samples)
        expanded = [p for p in prompts for _ in range(args.num_samples)]
        seeds = [args.seed + i for i in range(len(expanded))]
        bar = None
        if not args.no_progress:
            from tqdm import tqdm

            bar = tqdm(total=len(expanded), desc=f"generate {args.task}", unit="sample")
        records = generate(
            bundle, args.task, expanded, cfg, seeds, args.batch_size, settings.gen_length,
            settings.audio_frames, progress=bar.update if bar else None, policy=policy,
        )  # fmt: skip
        if bar:
            bar.close()
    except (TaskError, SamplingError, CheckpointError, PolicyError, ValueError) as e:
        return fail(str(e))
    sr = bundle.tokenizers["audio"].sample_rate if "audio" in bundle.tokenizers else 16000
    out = Path(args.out)
    write_outputs(records, out, cfg, sr)
    nfe = np.mean([r["nfe"] for r in records])
    print(
        f"generated {len(records)} {args.task} sample(s) in {time.time() - t0:.1f}s "
        f"(mean NFE {nfe:.1f}) -> {out / 'samples.jsonl'}"
    )
    for r in records[:8]:
        if "text" in r:
            print(f"  {r['prompt']!r} -> {r['text']!r}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m megadiff.generation.cli`` (the same as ``megadiff generate``)."""
    p = argparse.ArgumentParser(prog="megadiff generate", description=__doc__.split("\n")[0])
    add_arguments(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
