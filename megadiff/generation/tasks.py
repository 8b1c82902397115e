"""Task buffers (what is fixed, what is generated) and decoding, in the training row formats::

    text:     prompt MASK...                                   (packed text rows)
    t2i/t2s:  <task> prompt <boi|boa> MASK... <eoi|eoa>        (codes generated)
    caption:  <caption> <boi> codes <eoi> MASK...               (text generated, cut at <eot>)
    asr:      <asr> <boa> codes <eoa> MASK...

Generated code positions get their own narrow logit ranges (image codebook; audio codebook k at
stream position ``f*K + k``), so every sample decodes. The condition (CFG drops it) is the text
prompt for t2i/t2s/text and the media codes for caption/asr.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from megadiff.data.names import TASK_IO, TASKS
from megadiff.data.vocab import AUDIO, IMAGE, MODALITY_PAD, TEXT, VocabLayout

IMAGE_CODES = 4  # extra modality rows used while sampling
AUDIO_CODE0 = 5


DEFAULT_GEN_LENGTH = 32  # generated tokens of a task that writes text, unless set


class TaskError(ValueError):
    """An unknown task or a prompt that does not fit."""


@dataclass
class Request:
    task: str
    prompt: str
    tokens: np.ndarray  # [n] int64, MASK where generated
    modality: np.ndarray  # [n] sampling modality rows (see ``sampling_ranges``)
    cond: np.ndarray  # [n] bool: replaced by MASK in the unconditional CFG pass
    meta: dict = field(default_factory=dict)


def sampling_ranges(vocab: VocabLayout) -> torch.Tensor:
    """``ranges_array()`` plus rows for image codes and each audio codebook."""
    rows = vocab.ranges_array().tolist()
    rows.append([vocab.image_start, vocab.image_start + vocab.image_codebook_size])
    C = vocab.audio_codebook_size
    for k in range(vocab.audio_num_codebooks):
        rows.append([vocab.audio_start + k * C, vocab.audio_start + (k + 1) * C])
    return torch.tensor(rows, dtype=torch.long)


def audio_frames_for(text: str, frame_rate: float) -> int:
    """Frames to generate for a transcript (espeak-ng speaks ~0.047 s per character)."""
    return max(1, round(frame_rate * (0.1 + 0.047 * len(text))))


def build_request(
    task: str,
    prompt: str,
    vocab: VocabLayout,
    tokenizers: dict,
    context: int,
    gen_length: int = DEFAULT_GEN_LENGTH,
    audio_frames: int | None = None,
) -> Request:
    """The buffer for one prompt (a text, or an image/WAV path for caption/asr)."""
    if task not in TASKS:
        raise TaskError(f"unknown task '{task}' (known: {', '.join(TASKS)})")
    sp, M = vocab.specials, vocab.mask_id
    parts: list[tuple[np.ndarray, int, bool]] = []  # (ids, modality row, is condition)
    meta: dict = {}

    def add(ids, mod: int, cond: bool) -> None:
        parts.append((np.asarray(ids, np.int64).reshape(-1), mod, cond))

    if task == "text":
        add(tokenizers["text"].encode(prompt), TEXT, True)
        add(np.full(gen_length, M), TEXT, False)
    elif task in ("t2i", "t2s"):
        add([vocab.task_id(task)], TEXT, True)
        add(tokenizers["text"].encode(prompt), TEXT, True)
        if task == "t2i":
            n = tokenizers["image"].tokens_per_item
            add([sp["<boi>"]], IMAGE, False)
            add(np.full(n, M), IMAGE_CODES, False)
            add([sp["<eoi>"]], IMAGE, False)
        else:
            aud = tokenizers["audio"]
            frames = audio_frames or audio_frames_for(prompt, aud.frame_rate)
            K = vocab.audio_num_codebooks
            meta["audio_frames"] = frames
            add([sp["<boa>"]], AUDIO, False)
            parts.append(
                (np.full(frames * K, M), np.tile(AUDIO_CODE0 + np.arange(K), frames), False)
            )
            add([sp["<eoa>"]], AUDIO, False)
    else:  # caption / asr: the prompt is a media file
        add([vocab.task_id(task)], TEXT, False)
        if task == "caption":
            codes = tokenizers["image"].encode(load_image(prompt, tokenizers["image"].image_size))
            add([sp["<boi>"]], IMAGE, False)
            add(vocab.image_tokens(codes), IMAGE, True)
            add([sp["<eoi>"]], IMAGE, False)
        else:
            aud = tokenizers["audio"]
            codes = aud.encode(load_wav(prompt, aud.sample_rate))
            add([sp["<boa>"]], AUDIO, False)
            add(vocab.audio_tokens(codes), AUDIO, True)
            add([sp["<eoa>"]], AUDIO, False)
        add(np.full(gen_length, M), TEXT, False)
    if TASK_IO[task][1] == "text":
        meta["gen_length"] = gen_length

    tokens = np.concatenate([p[0] for p in parts])
    modality = np.concatenate([np.broadcast_to(np.asarray(p[1]), p[0].shape) for p in parts])
    cond = np.concatenate([np.full(p[0].shape, p[2]) for p in parts])
    if len(tokens) > context:
        raise TaskError(
            f"prompt {prompt[:40]!r}: the {task} buffer has {len(tokens)} tokens, longer than "
            f"the model's context {context} (shorten the prompt or --gen-length/--audio-frames)"
        )
    return Request(task, prompt, tokens, modality.astype(np.int64), cond, meta)


def batch_requests(reqs: list[Request], pad_id: int) -> tuple[torch.Tensor, ...]:
    """Right-pad to a common length: tokens, modality, cond ``[B, L]``."""
    L = max(len(r.tokens) for r in reqs)
    tok = torch.full((len(reqs), L), pad_id, dtype=torch.long)
    mod = torch.full((len(reqs), L), MODALITY_PAD, dtype=torch.long)
    cond = torch.zeros((len(reqs), L), dtype=torch.bool)
    for i, r in enumerate(reqs):
        n = len(r.tokens)
        tok[i, :n] = torch.from_numpy(r.tokens)
        mod[i, :n] = torch.from_numpy(r.modality)
        cond[i, :n] = torch.from_numpy(r.cond)
    return tok, mod, cond


def decode(req: Request, out: np.ndarray, vocab: VocabLayout, tokenizers: dict) -> dict:
    """The generated part of ``out`` (one row) as ``text`` / ``image`` (uint8 HxWx3) / ``wav``."""
    gen = out[: len(req.tokens)][req.tokens == vocab.mask_id]
    if TASK_IO[req.task][1] == "text":
        stop = np.flatnonzero(gen >= vocab.text_size)  # <eot> or any special ends the text
        ids = gen[: stop[0]] if len(stop) else gen
        return {"text": tokenizers["text"].decode(ids.tolist())}
    if req.task == "t2i":
        codes = (gen - vocab.image_start).reshape(tokenizers["image"].grid)
        return {"image": tokenizers["image"].decode(codes)[0], "codes": codes}
    K, C = vocab.audio_num_codebooks, vocab.audio_codebook_size
    codes = (gen - vocab.audio_start).reshape(-1, K) - np.arange(K) * C
    return {"wav": tokenizers["audio"].decode(codes), "codes": codes}


def load_wav(path: str, sample_rate: int) -> np.ndarray:
    """A 16-bit PCM WAV file as a mono wave at ``sample_rate`` (:class:`TaskError` names the
    file when it is missing, not a WAV, or holds no audio)."""
    import struct
    import wave

    from megadiff.data.tokenizers.audio import read_wav, resample

    try:
        x, sr = read_wav(path)
    except (OSError, EOFError, ValueError, RuntimeError, struct.error, wave.Error) as e:
        why = str(e) or type(e).__name__
        raise TaskError(f"cannot read WAV '{path}': {why} (expected a 16-bit PCM WAV file)") from e
    if len(x) == 0 or sr <= 0:
        raise TaskError(f"WAV '{path}' holds no audio ({len(x)} samples at {sr} Hz)")
    return resample(x, sr, sample_rate)


def load_image(path: str, size: int) -> np.ndarray:
    from PIL import Image

    try:
        img = Image.open(path).convert("RGB")
    except (OSError, ValueError) as e:
        raise TaskError(f"cannot read image '{path}': {e}") from e
    if img.size != (size, size):
        img = img.resize((size, size))
    return np.asarray(img, np.uint8)
