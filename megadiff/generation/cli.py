"""``megadiff generate``: sample text, images (PNG) or speech (WAV) from a training checkpoint.

Writes the decoded samples to ``--out`` and one JSON line per sample to ``samples.jsonl``
(prompt, settings, NFE, timing). Sampler settings come from, in order of precedence: the
command line, ``--defaults FILE`` (as written by ``tools/eval_sampling.py``), the package's
``megadiff/generation/defaults.json`` (:func:`builtin_defaults`).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from megadiff.data.vocab import TASKS
from megadiff.diffusion.sampling import SamplerConfig, SamplingError, sample
from megadiff.diffusion.strategies import STRATEGIES
from megadiff.generation.load import CheckpointError, GenerationBundle, load_for_generation
from megadiff.generation.tasks import (
    Request,
    TaskError,
    batch_requests,
    build_request,
    decode,
    sampling_ranges,
)

DEFAULTS_FILE = Path(__file__).with_name("defaults.json")
FLAG_KEYS = {
    "strategy": "strategy",
    "steps": "steps",
    "threshold": "threshold",
    "block_length": "block_length",
    "cfg": "cfg_scale",
    "temperature": "temperature",
    "top_k": "top_k",
    "top_p": "top_p",
    "entropy_bound": "entropy_bound",
}


def builtin_defaults() -> dict[str, dict]:
    """Per-task sampler settings shipped with the package (proposed by tools/eval_sampling.py)."""
    tree = json.loads(DEFAULTS_FILE.read_text())
    return {k: v for k, v in tree.items() if k in TASKS}


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
    p.add_argument("--num-samples", type=int, default=1, help="samples per prompt")
    p.add_argument("--strategy", help=f"one of {', '.join(STRATEGIES)}")
    p.add_argument("--steps", type=int, help="sampler steps (cap for adaptive strategies)")
    p.add_argument("--threshold", type=float, help="confidence threshold tau in (0, 1]")
    p.add_argument(
        "--block-length", type=int, help="semi-autoregressive block length (0 = one block)"
    )
    p.add_argument("--cfg", type=float, help="classifier-free guidance scale (0 = off)")
    p.add_argument("--temperature", type=float, help="sampling temperature (0 = greedy)")
    p.add_argument("--top-k", type=int, help="top-k filtering (0 = off)")
    p.add_argument("--top-p", type=float, help="nucleus filtering (1 = off)")
    p.add_argument("--entropy-bound", type=float, help="EB-sampler gamma (strategy entropy)")
    p.add_argument("--gen-length", type=int, default=32, help="tokens generated for text tasks")
    p.add_argument("--audio-frames", type=int, help="t2s frames (default: from the text length)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seed", type=int, default=0, help="sample i uses seed + i")
    p.add_argument("--defaults", help="JSON of per-task sampler settings")
    p.add_argument("--out", default="samples", help="output directory")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def sampler_config(
    task: str, args: argparse.Namespace | None = None, defaults: dict | None = None
) -> SamplerConfig:
    """Package defaults < ``defaults`` (a defaults file's tree) < command line flags."""
    if task not in TASKS:
        raise TaskError(f"unknown task '{task}' (known: {', '.join(TASKS)})")
    fields = set(SamplerConfig.__dataclass_fields__)
    c = SamplerConfig()
    for tree in (builtin_defaults(), defaults or {}):
        unknown = set(tree.get(task, {})) - fields
        if unknown:
            names = ", ".join(sorted(unknown))
            raise TaskError(f"defaults for '{task}': unknown setting(s) {names}")
        c = replace(c, **tree.get(task, {}))
    if args is not None:
        for flag, key in FLAG_KEYS.items():
            v = getattr(args, flag, None)
            if flag == "block_length" and v == 0:
                c = replace(c, block_length=None)  # full diffusion
            elif v is not None:
                c = replace(c, **{key: v})
    if c.strategy in ("random", "confidence", "margin") and c.steps is None:
        c = replace(c, steps=16)
    if c.strategy == "policy":
        raise TaskError("strategy 'policy' needs a trained unmasking policy (library use only)")
    return c.validate()


def generate(
    bundle: GenerationBundle,
    task: str,
    prompts: list[str],
    cfg: SamplerConfig,
    seeds: list[int],
    batch_size: int = 16,
    gen_length: int = 32,
    audio_frames: int | None = None,
    progress=None,
) -> list[dict]:
    """Sample one output per (prompt, seed) pair; returns decoded records in order."""
    cfg.validate()
    bundle.require(task)
    v, toks = bundle.vocab, bundle.tokenizers
    context = bundle.cfg.model.seq_length if bundle.cfg is not None else 1 << 30
    reqs: list[Request] = [
        build_request(task, p, v, toks, context, gen_length, audio_frames) for p in prompts
    ]
    ranges = sampling_ranges(v)
    records = []
    for s in range(0, len(reqs), batch_size):
        part = reqs[s : s + batch_size]
        tok, mod, cond = batch_requests(part, v.pad_id)
        out = sample(
            bundle.logits_fn, tok, mod, ranges, v.mask_id, cfg, cond, seeds[s : s + batch_size]
        )
        for i, r in enumerate(part):
            rec = decode(r, out.tokens[i].numpy(), v, toks)
            rec.update(
                task=task,
                prompt=r.prompt,
                seed=seeds[s + i],
                nfe=int(out.nfe[i]),
                steps=int(out.steps[i]),
                seconds=out.seconds / len(part),
                batch_seconds=out.seconds,
                model_seconds=out.model_seconds / len(part),
                **r.meta,
            )
            records.append(rec)
        if progress is not None:
            progress(len(part))
    return records


def _prompts(args: argparse.Namespace) -> list[str]:
    prompts = list(args.prompt)
    if args.prompts:
        path = Path(args.prompts)
        if not path.is_file():
            raise TaskError(f"prompts file '{path}' does not exist")
        lines = [(i, line) for i, line in enumerate(path.read_text().splitlines(), 1)]
        if path.suffix == ".jsonl":
            for i, line in lines:
                if not line.strip():
                    continue
                try:
                    p = json.loads(line)
                except ValueError as e:
                    raise TaskError(f"{path}:{i}: not a JSON string ({e})") from e
                if not isinstance(p, str) or not p:
                    raise TaskError(f"{path}:{i}: expected a non-empty JSON string, got {line!r}")
                prompts.append(p)
        else:
            prompts += [line.strip() for _, line in lines if line.strip()]
    if not prompts:
        raise TaskError("no prompt: give --prompt TEXT or --prompts FILE")
    return prompts


def write_outputs(records: list[dict], out: Path, cfg: SamplerConfig, sample_rate: int) -> None:
    from megadiff.data.tokenizers.audio import write_wav

    out.mkdir(parents=True, exist_ok=True)
    with open(out / "samples.jsonl", "w") as f:
        for i, rec in enumerate(records):
            row = {k: v for k, v in rec.items() if k not in ("image", "wav", "codes")}
            if "image" in rec:
                from PIL import Image

                name = f"{i:04d}.png"
                Image.fromarray(rec["image"]).save(out / name)
                row["file"] = name
            if "wav" in rec:
                name = f"{i:04d}.wav"
                write_wav(out / name, rec["wav"], sample_rate)
                row["file"] = name
            if "text" in rec:
                (out / f"{i:04d}.txt").write_text(rec["text"])
            row["settings"] = cfg.to_dict()
            f.write(json.dumps(row) + "\n")


def run(args: argparse.Namespace) -> int:
    def fail(msg: str) -> int:
        print(f"megadiff generate: error: {msg}", file=sys.stderr)
        return 2

    try:
        if args.task not in TASKS:
            raise TaskError(f"unknown task '{args.task}' (known: {', '.join(TASKS)})")
        if args.num_samples < 1 or args.batch_size < 1:
            raise TaskError("--num-samples and --batch-size must be >= 1")
        prompts = _prompts(args)
        defaults = None
        if args.defaults:
            dpath = Path(args.defaults)
            if not dpath.is_file():
                raise TaskError(f"defaults file '{dpath}' does not exist")
            try:
                defaults = json.loads(dpath.read_text())
            except json.JSONDecodeError as e:
                raise TaskError(f"defaults file '{dpath}' is not valid JSON: {e}") from e
        cfg = sampler_config(args.task, args, defaults)
        t0 = time.time()
        bundle = load_for_generation(args.ckpt)
        bundle.require(args.task)
        expanded = [p for p in prompts for _ in range(args.num_samples)]
        seeds = [args.seed + i for i in range(len(expanded))]
        bar = None
        if not args.no_progress:
            from tqdm import tqdm

            bar = tqdm(total=len(expanded), desc=f"generate {args.task}", unit="sample")
        records = generate(
            bundle, args.task, expanded, cfg, seeds, args.batch_size, args.gen_length,
            args.audio_frames, progress=bar.update if bar else None,
        )  # fmt: skip
        if bar:
            bar.close()
    except (TaskError, SamplingError, CheckpointError, ValueError) as e:
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
