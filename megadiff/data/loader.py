"""Mixture loader over MDS shards: one streaming ``StreamingDataset`` per source, partitioned
by data-parallel rank, mixed by proportion.

Within each DP replica exactly one process reads (model-parallel rank 0: TP rank 0 and PP rank
0) and its batches go to the replica's other ranks over the model-parallel group
(:func:`model_parallel_batch`); DP replicas read disjoint samples that together cover each
stream once per epoch. Each stream is a :class:`~megadiff.data.mds.LocalStream`: a
``StreamingDataset`` whose world is the DP view (rank = DP rank, world = DP size), built without
touching ``torch.distributed`` (see :mod:`megadiff.data.mds` for why).

Order: streaming partitions each stream's epoch over the DP ranks (``relaxed``, explicit by DP
rank, no ``replication``) and shuffles it (``py1e``, ``shuffle_seed`` derived from
``(seed, stream)``, streaming adds the epoch); the loader walks this rank's sample ids with a
per-stream cursor ``(epoch, position)`` and reads each sample with ``dataset[id]``. Streams are
mixed per sequence (row) by deterministic weighted round robin, so proportions are exact over
any window. Text documents are packed into rows of
``seq_length`` tokens separated by ``<eot>`` (a stream with ``pack=False`` gives each document
its own padded row, e.g. for short question/answer documents); image/audio pairs become one
padded row each::

    t2i / t2s:      <task> text <boi|boa> codes <eoi|eoa> PAD...
    caption / asr:  <task> <boi|boa> codes <eoi|eoa> text <eot> PAD...

Batches are dicts of CPU tensors: ``tokens`` [B, L] and ``modality`` [B, L] (int64; PAD positions
have modality ``MODALITY_PAD``), ``source`` [B] (stream index), ``prompt`` [B] (prompt length of
a one-problem row of a stream with ``prompt_end``, else 0). :meth:`state_dict` /
:meth:`load_state_dict` resume the exact batch sequence.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from megadiff.data.checks import DataError, check_streams
from megadiff.data.mds import LocalStream, SampleError
from megadiff.data.vocab import (
    AUDIO,
    IMAGE,
    MODALITY_PAD,
    TEXT,
    VocabError,
    VocabLayout,
)

STATE_VERSION = 2  # loader states of another version are refused
BAD_SAMPLE_POLICIES = ("stop", "skip")
# what one bad sample raises (a missing or resized shard file is a ShardError: always fatal)
SAMPLE_ERRORS = (SampleError, VocabError)

__all__ = ["DataError", "MixtureLoader", "StreamSpec", "from_config"]


@dataclass
class StreamSpec:
    name: str
    path: str
    proportion: float = 1.0
    tasks: list[str] = field(default_factory=list)  # [] = the kind's defaults
    pack: bool = True  # text: pack documents into rows; False = one document per row, padded
    eos_fill: bool = False  # unpacked text: fill the row after the document with <eot>
    prompt_end: str = ""  # unpacked text: the prompt ends at this text's first occurrence
    eos_fill_length: int = 0  # eos_fill: <eot> tokens after the document (0 = to the row end)


def check_proportions(specs: list[StreamSpec]) -> np.ndarray:
    if not specs:
        raise DataError("data.streams: no streams configured")
    p = np.array([s.proportion for s in specs], np.float64)
    for s in specs:
        if not np.isfinite(s.proportion) or s.proportion < 0:
            raise DataError(f"data.streams '{s.name}': proportion {s.proportion} must be >= 0")
    if p.sum() <= 0:
        raise DataError("data.streams: proportions sum to zero")
    return p / p.sum()


def _stderr(msg: str) -> None:
    print(f"megadiff: {msg}", file=sys.stderr, flush=True)


def _mix(a: int, b: int) -> int:
    """splitmix64-style hash of two ints (deterministic task choice without RNG state)."""
    z = (a * 0x9E3779B97F4A7C15 + b + 0x632BE59BD9B4E019) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return z ^ (z >> 31)


def _check_text(ids: np.ndarray, text_size: int, where: str) -> None:
    """Stored text ids must be BPE ids: integers in ``[0, text_size)`` (specials are added here)."""
    if not np.issubdtype(ids.dtype, np.integer):
        raise VocabError(f"{where}: ids must be integers, got dtype {ids.dtype}")
    if ids.size and int(ids.max()) >= text_size:
        raise VocabError(
            f"{where}: token id {int(ids.max())} is outside the text BPE range [0, {text_size})"
        )


class _Cursor:
    """This DP rank's walk through one stream: epoch ``epoch``, position ``k`` in the sample ids
    that streaming assigns to this rank for that epoch (:meth:`LocalStream.epoch_ids`)."""

    def __init__(self, stream: LocalStream):
        self.s = stream
        self.epoch, self.k = 0, 0

    def next(self) -> tuple[dict, str]:
        ids = self.s.epoch_ids(self.epoch)
        if self.k >= len(ids):
            self.epoch, self.k = self.epoch + 1, 0
            ids = self.s.epoch_ids(self.epoch)
        i = int(ids[self.k])
        self.k += 1  # past this sample even when it cannot be read (on_bad_sample=skip)
        sample, shard, j = self.s.read(i)
        return sample, self.s.where(shard, j)

    def state(self) -> list[int]:
        return [self.epoch, self.k]

    def set(self, st: list[int]) -> None:
        self.epoch, self.k = int(st[0]), int(st[1])


class MixtureLoader:
    """Infinite iterator of micro-batches for one DP rank (see the module docstring)."""

    def __init__(
        self,
        streams: list[StreamSpec],
        seq_length: int,
        micro_batch: int,
        dp_rank: int = 0,
        dp_size: int = 1,
        seed: int = 0,
        vocab: VocabLayout | None = None,
        shuffle: bool = True,
        check_ids: bool = True,
        on_bad_sample: str = "stop",
        warn: Callable[[str], None] | None = None,
    ):
        if not 0 <= dp_rank < dp_size:
            raise DataError(f"dp_rank {dp_rank} is not in [0, dp_size={dp_size})")
        if seq_length < 8 or micro_batch < 1:
            raise DataError(f"seq_length ({seq_length}) must be >= 8, micro_batch >= 1")
        self.specs = streams
        self.props = check_proportions(streams)
        self.L, self.B, self.dp_rank, self.dp_size = seq_length, micro_batch, dp_rank, dp_size
        self.seed, self.check = seed, check_ids
        if on_bad_sample not in BAD_SAMPLE_POLICIES:
            raise DataError(f"on_bad_sample '{on_bad_sample}' is not one of stop, skip")
        self.on_bad_sample = on_bad_sample
        self.warn = warn or _stderr
        self.skipped = 0  # bad samples skipped so far (on_bad_sample=skip), part of the state
        names = [s.name for s in streams]
        if len(set(names)) != len(names):
            raise DataError(f"data.streams: duplicate stream names {names}")
        self.vocab, checked = check_streams(streams, seq_length, dp_size, vocab)
        self.kinds = [c.kind for c in checked]
        self.tasks = [c.tasks for c in checked]
        self.prompt_end = [_prompt_end_ids(s, c) for s, c in zip(streams, checked)]
        self._sp = self.vocab.specials
        self.streams: list[LocalStream] = []
        try:
            for sid, s in enumerate(streams):
                self.streams.append(
                    LocalStream(
                        s.path,
                        s.name,
                        dp_rank=dp_rank,
                        dp_size=dp_size,
                        shuffle=shuffle,
                        shuffle_seed=_mix(seed, sid) % (1 << 31),
                    )
                )
        except BaseException:
            self.close()
            raise
        self.cursors = [_Cursor(ls) for ls in self.streams]
        self.counts = np.zeros(len(streams), np.int64)
        self._pack: dict[int, list] = {}  # sid -> [cursor state of current doc, offset, doc]
        self.batches = 0

    # ------------------------------------------------------------------ rows
    def _pick(self) -> int:
        total = self.counts.sum() + 1
        return int(np.argmax(self.props * total - self.counts))

    def _next_valid(self, sid: int, validate: Callable[[dict, str, list[int]], Any]) -> Any:
        """``validate(sample, where, cursor state before it)`` of the next sample of stream
        ``sid`` that is valid; bad ones stop the run or are skipped (``on_bad_sample``)."""
        cur = self.cursors[sid]
        for _ in range(len(cur.s.epoch_ids(cur.epoch)) + 1):
            before = cur.state()
            try:
                sample, where = cur.next()
                return validate(sample, where, before)
            except SAMPLE_ERRORS as e:
                self._bad_sample(e)
        raise DataError(
            f"stream '{self.specs[sid].name}': every sample of this rank's epoch is bad "
            f"(skipped {self.skipped}); re-run `megadiff preprocess` for it"
        )

    def _bad_sample(self, e: Exception) -> None:
        """Stop with the named error, or count it and go on (deterministic: the same samples
        are skipped on every run and after a resume)."""
        if self.on_bad_sample == "stop":
            raise type(e)(
                f"{e} (data.on_bad_sample=stop: fix or re-create the stream, check it with "
                "`megadiff data verify`, or set data.on_bad_sample=skip)"
            ) from e
        self.skipped += 1
        self.warn(f"skipping bad sample ({self.skipped} so far): {e}")

    def _text_doc(self, sid: int) -> np.ndarray:
        doc, st = self._next_valid(sid, self._valid_text)
        self._pack[sid] = [st, 0, doc]
        return doc

    def _valid_text(self, sample: dict, where: str, before: list[int]) -> tuple:
        if "tokens" not in sample:
            raise SampleError(f"{where}: no 'tokens' column (not a text stream)")
        doc = sample["tokens"]
        if doc.ndim != 1:
            raise SampleError(f"{where}: tokens must be 1-D, got shape {doc.shape}")
        if self.check and len(doc):
            _check_text(doc, self.vocab.text_size, where)
        return doc, before

    def _valid_pair(self, sid: int) -> Callable[[dict, str, list[int]], tuple]:
        """Validator of a paired sample of stream ``sid``: its row parts."""

        def validate(sample: dict, where: str, before: list[int]) -> tuple:
            kind = self.kinds[sid]
            if "text" not in sample or "codes" not in sample:
                raise SampleError(f"{where}: needs 'text' and 'codes' columns ({kind} stream)")
            text, codes = sample["text"], sample["codes"]
            v = self.vocab
            if self.check:
                _check_text(text, v.text_size, where)
                cb = v.image_codebook_size if kind == "image" else v.audio_codebook_size
                if codes.size and (int(codes.max()) >= cb):
                    raise VocabError(
                        f"{where}: code {int(codes.max())} is outside the {kind} codebook [0, {cb})"
                    )
            if kind == "image":
                ctoks, m = v.image_tokens(codes), IMAGE
                bo, eo = self._sp["<boi>"], self._sp["<eoi>"]
            else:
                if codes.ndim != 2 or codes.shape[1] != v.audio_num_codebooks:
                    raise SampleError(
                        f"{where}: audio codes shape {codes.shape}, expected "
                        f"[frames, {v.audio_num_codebooks}]"
                    )
                ctoks, m = v.audio_tokens(codes), AUDIO
                bo, eo = self._sp["<boa>"], self._sp["<eoa>"]
            tasks = self.tasks[sid]
            epoch, k = before
            task = tasks[_mix(self.seed * 1000003 + epoch, k * 131 + self.dp_rank) % len(tasks)]
            room = self.L - len(ctoks) - 3 - (1 if task in ("caption", "asr") else 0)
            if room < 1:
                raise SampleError(
                    f"{where}: {len(ctoks)} {kind} tokens do not fit seq_length "
                    f"{self.L} (raise model.seq_length or shorten clips)"
                )
            return task, text[:room].astype(np.int64), ctoks, m, bo, eo

        return validate

    def _pair_row(self, sid: int, tok: np.ndarray, mod: np.ndarray) -> None:
        task, text, ctoks, m, bo, eo = self._next_valid(sid, self._valid_pair(sid))
        v = self.vocab
        if task in ("t2i", "t2s"):
            parts = [([v.task_id(task)], TEXT), (text, TEXT), ([bo], m), (ctoks, m), ([eo], m)]
        else:
            parts = [
                ([v.task_id(task)], TEXT),
                ([bo], m),
                (ctoks, m),
                ([eo], m),
                (text, TEXT),
                ([self._sp["<eot>"]], TEXT),
            ]
        pos = 0
        for arr, mm in parts:
            n = len(arr)
            tok[pos : pos + n] = arr
            mod[pos : pos + n] = mm
            pos += n
        tok[pos:] = v.pad_id
        mod[pos:] = MODALITY_PAD

    # ------------------------------------------------------------------ iteration
    def __iter__(self) -> MixtureLoader:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        tok = np.empty((self.B, self.L), np.int64)
        mod = np.empty((self.B, self.L), np.int64)
        src = np.empty(self.B, np.int64)
        prompt = np.zeros(self.B, np.int64)
        for b in range(self.B):
            sid = self._pick()
            self.counts[sid] += 1
            src[b] = sid
            if self.kinds[sid] == "text":
                prompt[b] = self._text_row(sid, tok[b], mod[b])
            else:
                self._pair_row(sid, tok[b], mod[b])
        self.batches += 1
        return {
            "tokens": torch.from_numpy(tok),
            "modality": torch.from_numpy(mod),
            "source": torch.from_numpy(src),
            "prompt": torch.from_numpy(prompt),
        }

    def _text_row(self, sid: int, tok: np.ndarray, mod: np.ndarray) -> int:
        """Pack documents (each followed by ``<eot>``) into one row; remainders carry over.

        An unpacked stream (``pack=False``) ends the row after one document (or one
        ``seq_length`` piece of a longer one) and pads the rest, or with ``eos_fill`` fills it
        with ``<eot>`` (valid tokens, so the model learns to end: LLaDA's EOS fill), to the end of
        the row or ``eos_fill_length`` of them (the document's own ``<eot>`` included), then pads.
        Returns the row's prompt length: that of a document starting the row in a stream with
        ``prompt_end`` (0 otherwise, or when the document does not contain it).
        """
        eot, pos, L = self._sp["<eot>"], 0, self.L
        pack = self.specs[sid].pack
        mod[:] = TEXT
        prompt = 0
        while pos < L:
            if sid not in self._pack:
                self._text_doc(sid)
            st = self._pack[sid]
            off, doc = st[1], st[2]
            if pos == 0 and off == 0 and self.prompt_end[sid]:
                prompt = prompt_length(doc, self.prompt_end[sid])
            n = min(len(doc) - off, L - pos)
            if n > 0:
                tok[pos : pos + n] = doc[off : off + n]
                pos += n
                off += n
            st[1] = off
            if off >= len(doc) and pos < L:  # document done: its separator fits here
                tok[pos] = eot
                pos += 1
                del self._pack[sid]
                if not pack:
                    break
        spec = self.specs[sid]
        if spec.eos_fill:
            end = L if not spec.eos_fill_length else min(L, pos + spec.eos_fill_length - 1)
            tok[pos:end] = eot
            pos = end
        tok[pos:] = self.vocab.pad_id
        mod[pos:] = MODALITY_PAD
        return prompt

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        return {
            "version": STATE_VERSION,
            "dp_rank": self.dp_rank,
            "dp_size": self.dp_size,
            "seed": self.seed,
            "streams": [s.name for s in self.specs],
            "counts": self.counts.tolist(),
            "cursors": [c.state() for c in self.cursors],
            "pack": {str(sid): [p[0], p[1]] for sid, p in self._pack.items()},
            "batches": self.batches,
            "skipped": self.skipped,
        }

    def load_state_dict(self, st: dict) -> None:
        if st.get("version") != STATE_VERSION:
            raise DataError(
                f"loader state: version {st.get('version')!r}, this loader writes "
                f"{STATE_VERSION} (a state of another sample order cannot be resumed exactly)"
            )
        for key in ("dp_rank", "dp_size", "seed", "streams"):
            mine = self.state_dict()[key]
            if st.get(key) != mine:
                raise DataError(
                    f"loader state: {key}={st.get(key)!r} but this loader has "
                    f"{mine!r} (resuming with a different data layout)"
                )
        self.counts = np.array(st["counts"], np.int64)
        for c, cs in zip(self.cursors, st["cursors"], strict=True):
            c.set(cs)
        self._pack = {}
        for sid_s, (doc_state, off) in st["pack"].items():
            sid = int(sid_s)
            after = self.cursors[sid].state()
            self.cursors[sid].set(doc_state)
            self._text_doc(sid)
            self._pack[sid][1] = off
            self.cursors[sid].set(after)
        self.batches = int(st["batches"])
        self.skipped = int(st.get("skipped", 0))

    def close(self) -> None:
        """Release the streams' shared memory and caches (also done at GC / interpreter exit)."""
        for ls in getattr(self, "streams", []):
            ls.close()

    def __enter__(self) -> MixtureLoader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _prompt_end_ids(spec: StreamSpec, info: Any) -> np.ndarray | None:
    """The token ids of ``spec.prompt_end`` in the stream's own text tokenizer (its manifest)."""
    if not getattr(spec, "prompt_end", ""):
        return None
    from megadiff.data.tokenizers.files import resolve_tokenizer_path
    from megadiff.data.tokenizers.text import STANDARD, TokenizerError, load_text_tokenizer

    where = f"data.streams '{spec.name}' prompt_end"
    path = info.manifest.get("text_tokenizer")
    if info.kind != "text" or not path:
        raise DataError(f"{where}: needs a text stream written with a text tokenizer")
    if path not in STANDARD:  # a file: as written, else found beside the stream's manifest
        path = str(resolve_tokenizer_path(path, Path(spec.path) / "manifest.json") or path)
    try:
        ids = load_text_tokenizer(path).encode(spec.prompt_end)
    except TokenizerError as e:
        raise DataError(f"{where}: cannot load the stream's text tokenizer: {e}") from e
    return ids


def prompt_length(doc: np.ndarray, end: np.ndarray) -> int:
    """Tokens of ``doc`` up to and including the first occurrence of ``end`` (0: none)."""
    n = len(end)
    for i in range(len(doc) - n + 1):
        if np.array_equal(doc[i : i + n], end):
            return i + n
    return 0


def from_config(
    data_cfg: Any, seq_length: int, micro_batch: int, dp_rank: int, dp_size: int, seed: int
) -> MixtureLoader:
    """Build the loader from ``cfg.data`` (``DataConfig``) for one DP rank."""
    specs = [
        StreamSpec(
            s.name,
            s.path,
            s.proportion,
            list(getattr(s, "tasks", []) or []),
            bool(getattr(s, "pack", True)),
            bool(getattr(s, "eos_fill", False)),
            str(getattr(s, "prompt_end", "") or ""),
            int(getattr(s, "eos_fill_length", 0) or 0),
        )
        for s in data_cfg.streams
    ]
    vocab = VocabLayout.from_json(data_cfg.vocab) if getattr(data_cfg, "vocab", None) else None
    return MixtureLoader(
        specs,
        seq_length,
        micro_batch,
        dp_rank,
        dp_size,
        seed=getattr(data_cfg, "seed", None) or seed,
        vocab=vocab,
        shuffle=getattr(data_cfg, "shuffle", True),
        on_bad_sample=getattr(data_cfg, "on_bad_sample", "stop"),
    )


def broadcast_batch(
    batch: dict[str, torch.Tensor] | None,
    micro_batch: int,
    seq_length: int,
    src: int,
    group: Any = None,
    device: torch.device | str = "cpu",
) -> dict[str, torch.Tensor]:
    """Send the batch read on global rank ``src`` to the other ranks of ``group`` (e.g. the TP
    group: read on TP-rank 0 only). ``device``: where the tensors travel (CUDA for NCCL)."""
    import torch.distributed as dist

    if batch is None:
        batch = {
            "tokens": torch.empty(micro_batch, seq_length, dtype=torch.int64, device=device),
            "modality": torch.empty(micro_batch, seq_length, dtype=torch.int64, device=device),
            "source": torch.empty(micro_batch, dtype=torch.int64, device=device),
            "prompt": torch.empty(micro_batch, dtype=torch.int64, device=device),
        }
    else:
        batch = {k: v.to(device) for k, v in batch.items()}
    for key in ("tokens", "modality", "source", "prompt"):
        dist.broadcast(batch[key], src, group=group)
    return batch


def model_parallel_batch(
    loader: MixtureLoader | None,
    micro_batch: int,
    seq_length: int,
    device: torch.device | str = "cpu",
) -> dict[str, torch.Tensor]:
    """This rank's next batch: read by model-parallel rank 0 of its DP replica (the only rank
    that builds a loader; pass ``None`` elsewhere) and broadcast over megatron-core's
    model-parallel group (the TP x PP ranks of the replica)."""
    check_reader(loader)
    batch = next(loader) if loader is not None else None
    return share_batch(batch, micro_batch, seq_length, device)


def check_reader(loader: MixtureLoader | None) -> None:
    """Exactly model-parallel rank 0 of each DP replica holds a loader."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    group = ps.get_model_parallel_group()
    if (dist.get_rank(group) == 0) != (loader is not None):
        raise DataError(
            "model_parallel_batch: exactly model-parallel rank 0 of each DP replica builds a "
            f"loader (this rank: model-parallel rank {dist.get_rank(group)}, "
            f"loader {'given' if loader is not None else 'None'})"
        )


def share_batch(
    batch: dict[str, torch.Tensor] | None,
    micro_batch: int,
    seq_length: int,
    device: torch.device | str = "cpu",
) -> dict[str, torch.Tensor]:
    """The reader's ``batch`` on every rank of its model-parallel group (``None`` elsewhere)."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    group = ps.get_model_parallel_group()
    if dist.get_world_size(group) == 1:
        return batch
    src = dist.get_global_rank(group, 0)
    return broadcast_batch(batch, micro_batch, seq_length, src, group, device)
