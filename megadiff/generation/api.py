"""Generation as a library: :func:`generate`, prompt files, :func:`write_outputs`.
``megadiff generate`` (:mod:`megadiff.generation.cli`) is a command line over these;
``tools/eval_sampling.py`` uses them directly. The sampler settings per task are merged by
:mod:`megadiff.generation.settings`.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from megadiff.diffusion.sampling import SamplerConfig, sample
from megadiff.diffusion.strategies import PolicyFn
from megadiff.generation.load import GenerationBundle
from megadiff.generation.tasks import (
    DEFAULT_GEN_LENGTH,
    Request,
    TaskError,
    batch_requests,
    build_request,
    decode,
    sampling_ranges,
)


def read_prompts(path: str | Path) -> list[str]:
    """The prompts of a file: one per non-empty line (stripped), or for ``*.jsonl`` one JSON
    string per non-empty line (prompts with newlines)."""
    path = Path(path)
    if not path.is_file():
        raise TaskError(f"prompts file '{path}' does not exist")
    lines = [(i, line) for i, line in enumerate(path.read_text().splitlines(), 1)]
    if path.suffix != ".jsonl":
        return [line.strip() for _, line in lines if line.strip()]
    prompts = []
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
    return prompts


def generate(
    bundle: GenerationBundle,
    task: str,
    prompts: list[str],
    cfg: SamplerConfig,
    seeds: list[int],
    batch_size: int = 16,
    gen_length: int = DEFAULT_GEN_LENGTH,
    audio_frames: int | None = None,
    progress: Callable[[int], object] | None = None,
    policy: PolicyFn | None = None,
) -> list[dict]:
    """Sample one output per (prompt, seed) pair; returns decoded records in order.
    ``progress(n)`` after each batch of ``n`` samples; ``policy``: strategy policy's callable."""
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
            bundle.logits_fn, tok, mod, ranges, v.mask_id, cfg, cond, seeds[s : s + batch_size],
            policy,
        )  # fmt: skip
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


def write_outputs(records: list[dict], out: Path, cfg: SamplerConfig, sample_rate: int) -> None:
    """``out/samples.jsonl`` (one line per record, with the settings ``cfg``) and each record's
    file: ``NNNN.png`` (image), ``NNNN.wav`` (speech at ``sample_rate``), ``NNNN.txt`` (text)."""
    from megadiff.data.tokenizers.audio import write_wav
    from megadiff.training.metrics import json_line

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
            f.write(json_line(row))  # strict JSON: a non-finite number is written as null
