"""Checks of MDS streams, in one place.

* :func:`check_streams`: the start-up preflight of ``megadiff train`` (and the loader's own
  checks). Cheap on any dataset size: it reads ``index.json`` and ``manifest.json`` and stats the
  shard files, never their contents.
* :func:`verify_stream`: ``megadiff data verify``, which also reads every shard file and compares
  its content hash with the one recorded by ``megadiff preprocess``.

Every error names the stream, the file and what to do.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from megadiff.data.mds import (
    HASH,
    INDEX,
    MANIFEST,
    ShardError,
    check_shard_file,
    file_hash,
    read_index,
    read_manifest,
    shard_records,
)
from megadiff.data.names import DEFAULT_TASKS, MODALITIES, TASK_STREAM
from megadiff.data.vocab import VocabError, VocabLayout, merge_layouts

REDO = "re-run `megadiff preprocess` for it"

# the columns of each kind of stream (see megadiff.data.preprocess)
COLUMNS = {"text": ("tokens",), "image": ("text", "codes"), "audio": ("text", "codes")}

# positions a paired row needs besides its codes: task token, <bo*>, <eo*>, one text token, and
# <eot> after the text when the text comes last (see MixtureLoader._pair_row)
ROW_EXTRA = {"t2i": 4, "t2s": 4, "caption": 5, "asr": 5}

# the vocabulary sizes a stream of each kind must agree on with the run's layout
LAYOUT_KEYS = {
    "text": ("text_size",),
    "image": ("text_size", "image_codebook_size"),
    "audio": ("text_size", "audio_codebook_size", "audio_num_codebooks"),
}


class DataError(ValueError):
    """Bad loader configuration or data; names the stream, shard, sample or key."""


# what a data problem raises: the training command reports these and exits 2
DATA_ERRORS = (DataError, ShardError, VocabError)


class UnreadableBatch(DataError):
    """Raised on every rank when any rank could not read its share of a step's batch:
    ``local`` is this rank's own error (or None), ``rank`` / ``message`` the first failing
    rank's."""

    def __init__(self, local: str | None, rank: int, message: str) -> None:
        super().__init__(message)
        self.local, self.rank, self.message = local, rank, message


class StreamLike(Protocol):
    name: str
    path: str
    tasks: list[str]


@dataclass
class StreamInfo:
    """A checked stream: its kind, tasks, sample count, manifest and partial vocab layout."""

    name: str
    path: str
    kind: str
    tasks: list[str]
    num_samples: int
    manifest: dict
    layout: VocabLayout


# ----------------------------------------------------------------------------- preflight


def check_streams(
    specs: Sequence[StreamLike], seq_length: int, dp_size: int, vocab: VocabLayout | None = None
) -> tuple[VocabLayout, list[StreamInfo]]:
    """Check every stream against the run (see the module docstring); return the run's vocab
    layout (``vocab`` or the streams' layouts merged) and the checked streams."""
    infos = [read_stream(s, dp_size) for s in specs]
    merged = merge_layouts([(i.name, i.layout) for i in infos])
    layout = vocab or merged
    for info in infos:
        check_layout(info, layout)
        check_statistics(info, layout, seq_length)
    return layout, infos


def preflight_data(cfg: Any) -> None:
    """The start-up check of ``cfg.data`` (a resolved config), before any process group or model
    exists; raises one of :data:`DATA_ERRORS`. The held-out streams are checked too when
    ``eval.every`` > 0 or a stream names a ``val_path``."""
    if cfg.data.source != "mds":
        return
    vocab = VocabLayout.from_json(cfg.data.vocab) if cfg.data.vocab else None
    layout, _ = check_streams(
        cfg.data.streams, cfg.model.seq_length, cfg.parallel.data_parallel, vocab
    )
    for i, s in enumerate(cfg.data.streams):
        if cfg.eval.every or s.val_path:
            check_val_stream(i, s, layout, cfg.model.seq_length)


@dataclass
class ValSpec:
    """A stream's held-out split, as a stream of its own."""

    name: str
    path: str
    tasks: list[str]
    pack: bool = True
    eos_fill: bool = False
    prompt_end: str = ""
    proportion: float = 1.0
    eos_fill_length: int = 0


def val_spec(index: int, stream: Any) -> ValSpec:
    """The held-out split of ``data.streams[index]``: its ``val_path``, else the ``val/`` split
    recorded in its manifest; :class:`DataError` naming the key when there is none."""
    key = f"config key 'data.streams[{index}].val_path'"
    if stream.val_path:
        path = Path(stream.val_path)
    else:
        val = read_manifest(stream.path, stream.name).get("val")
        if not val:
            raise DataError(
                f"{key}: stream '{stream.name}' has no held-out split ('{Path(stream.path)}' "
                "manifest records none) and names no val_path; re-run `megadiff preprocess` "
                "with --val-fraction or --val-count, set val_path, or set eval.every=0"
            )
        path = Path(stream.path) / val["path"]
    return ValSpec(
        stream.name,
        str(path),
        list(stream.tasks),
        stream.pack,
        stream.eos_fill,
        eos_fill_length=stream.eos_fill_length,  # no prompt_end: held-out rows are not prompted
    )


def check_val_stream(index: int, stream: Any, layout: VocabLayout, seq_length: int) -> ValSpec:
    """Check the held-out split of ``data.streams[index]`` like a training stream (same kind,
    the run's vocabulary); errors name the ``val_path`` key."""
    spec = val_spec(index, stream)
    try:
        info = read_stream(spec)
        check_layout(info, layout)
        check_statistics(info, layout, seq_length)
        train_kind = read_manifest(stream.path, stream.name).get("kind")
        if info.kind != train_kind:
            raise DataError(f"it is a {info.kind} stream, '{stream.name}' a {train_kind} one")
    except DATA_ERRORS as e:
        raise DataError(
            f"config key 'data.streams[{index}].val_path': held-out split '{spec.path}' of "
            f"stream '{stream.name}': {e}"
        ) from e
    return spec


def read_stream(spec: StreamLike, dp_size: int = 1) -> StreamInfo:
    """One stream's index, shard files, manifest, kind, columns and tasks."""
    name, root = spec.name, Path(spec.path)
    if not spec.path:
        raise DataError(f"data.streams '{name}': path is empty")
    index = read_index(root, name)
    for shard in index:
        check_shard_file(root, shard, name)
    manifest = read_manifest(root, name)
    if not manifest:
        raise DataError(
            f"stream '{name}': '{root / MANIFEST}' is missing (write shards with "
            "`megadiff preprocess`)"
        )
    kind = check_kind(name, root, manifest)
    check_columns(name, root, kind, index, manifest)
    n = sum(int(i["samples"]) for i in index)
    if n == 0:
        raise DataError(
            f"stream '{name}' at '{root}' is empty (0 samples); remove it from data.streams "
            "or re-run `megadiff preprocess` with valid inputs"
        )
    check_manifest_matches_index(name, root, manifest, index)
    if n < dp_size:
        raise DataError(
            f"stream '{name}' ('{root / INDEX}') has {n} samples, fewer than the {dp_size} "
            "data-parallel ranks (give it more samples or train with fewer ranks)"
        )
    tasks = list(spec.tasks) or list(DEFAULT_TASKS[kind])
    for t in tasks:
        if TASK_STREAM.get(t) != kind:
            raise DataError(
                f"data.streams '{name}': task '{t}' does not fit a {kind} "
                f"stream (use {', '.join(DEFAULT_TASKS[kind])})"
            )
    if "vocab" not in manifest:
        raise VocabError(f"stream '{name}': '{root / MANIFEST}' has no vocabulary layout; {REDO}")
    layout = VocabLayout.from_dict(manifest["vocab"], f"stream '{name}'")
    return StreamInfo(name, str(root), kind, tasks, n, manifest, layout)


def check_kind(name: str, root: Path, manifest: dict) -> str:
    """The manifest's ``kind``, which must be a known modality."""
    kind = manifest.get("kind")
    if kind not in MODALITIES:
        raise DataError(
            f"stream '{name}': '{root / MANIFEST}' has kind {kind!r}; megadiff trains "
            f"{', '.join(MODALITIES)} streams (remove the stream from data.streams)"
        )
    return kind


def _integer_encoding(encoding: Any) -> bool:
    """``ndarray:<integer dtype>[:shape]``, the encoding of every megadiff column."""
    parts = str(encoding).split(":")
    if parts[0] != "ndarray" or len(parts) < 2:
        return False
    try:
        return bool(np.issubdtype(np.dtype(parts[1]), np.integer))
    except TypeError:
        return False


def check_columns(name: str, root: Path, kind: str, index: list[dict], manifest: dict) -> None:
    """Every shard has this kind's columns, encoded as integer arrays, as the manifest says."""
    want = sorted(COLUMNS[kind])
    recorded = manifest.get("columns")
    for info in index:
        cols = dict(zip(info.get("column_names", []), info.get("column_encodings", [])))
        shard = root / info["raw_data"]["basename"]
        if sorted(cols) != want:
            raise DataError(
                f"stream '{name}': shard '{shard}' has columns {sorted(cols)}, a {kind} stream "
                f"has {want}; {REDO}"
            )
        bad = {c: e for c, e in cols.items() if not _integer_encoding(e)}
        if bad:
            raise DataError(
                f"stream '{name}': shard '{shard}' encodes {bad}; megadiff columns are integer "
                f"arrays (ndarray:uint16 ...); {REDO}"
            )
        if recorded is not None and cols != recorded:
            raise DataError(
                f"stream '{name}': shard '{shard}' has columns {cols} but '{root / MANIFEST}' "
                f"records {recorded}; {REDO}"
            )


def check_manifest_matches_index(name: str, root: Path, manifest: dict, index: list[dict]) -> None:
    """The sample count and (when recorded) the shard files agree between the two files."""
    n = sum(int(i["samples"]) for i in index)
    want = manifest.get("num_samples")
    if want is not None and want != n:
        raise DataError(
            f"stream '{name}': '{root / INDEX}' lists {n} samples but '{root / MANIFEST}' "
            f"records {want} (the directory was changed after it was written); {REDO}"
        )
    recorded = manifest.get("shards")
    if recorded is None:
        return
    listed = [(r["file"], r["bytes"]) for r in shard_records(index)]
    if listed != [(r.get("file"), r.get("bytes")) for r in recorded]:
        raise DataError(
            f"stream '{name}': the shard files of '{root / INDEX}' differ from those recorded "
            f"in '{root / MANIFEST}' (the directory was changed after it was written); {REDO}"
        )


def check_layout(info: StreamInfo, vocab: VocabLayout) -> None:
    """The stream's tokenizer sizes are the run's."""
    for key in LAYOUT_KEYS[info.kind]:
        mine, run = getattr(info.layout, key), getattr(vocab, key)
        if mine != run:
            raise VocabError(
                f"stream '{info.name}' has {key}={mine} but the vocab layout has {run} "
                f"(data.vocab / preprocess mismatch: '{Path(info.path) / MANIFEST}'; re-run "
                "preprocess with the run's tokenizers or fix data.vocab)"
            )


def check_statistics(info: StreamInfo, vocab: VocabLayout, seq_length: int) -> None:
    """Ids within the vocabulary and samples that fit ``seq_length``, from the statistics the
    manifest records (streams written before these were recorded are checked while read)."""
    stats = info.manifest.get("stats") or {}
    where = f"stream '{info.name}' ('{Path(info.path) / MANIFEST}')"
    top = stats.get("max_text_id")
    if top is not None and top >= vocab.text_size:
        raise VocabError(
            f"{where}: text id {top} is outside the text vocabulary [0, {vocab.text_size}) "
            "(the stream was tokenized with another tokenizer; re-run preprocess with the run's)"
        )
    if info.kind == "text":
        return
    size = vocab.image_codebook_size if info.kind == "image" else vocab.audio_codebook_size
    top = stats.get("max_code")
    if top is not None and top >= size:
        raise VocabError(f"{where}: code {top} is outside the {info.kind} codebook [0, {size})")
    longest = stats.get("max_code_tokens")
    need = (longest or 0) + max(ROW_EXTRA[t] for t in info.tasks)
    if longest is not None and need > seq_length:
        raise DataError(
            f"{where}: samples have up to {longest} {info.kind} tokens, a row needs {need} "
            f"positions but model.seq_length is {seq_length} (raise model.seq_length or "
            f"re-run preprocess with shorter {'images' if info.kind == 'image' else 'clips'})"
        )


# ----------------------------------------------------------------------------- verify


@dataclass
class _Spec:
    """A stream named after its directory, with its kind's default tasks."""

    name: str
    path: str
    tasks: tuple = ()


class Progress(Protocol):
    total: int | None

    def update(self, n: int = 1) -> Any: ...


def verify_stream(path: str | Path, progress: Progress | None = None) -> list[str]:
    """Problems of the stream at ``path`` (``[]`` when it is intact): the preflight's checks of
    its own files plus each shard's content hash. ``progress`` (e.g. a tqdm bar) gets the shard
    count as ``total`` and one ``update()`` per shard."""
    root = Path(path)
    try:
        info = read_stream(_Spec(root.name, str(root)))
    except DATA_ERRORS as e:
        return [str(e)]
    records = info.manifest.get("shards") or shard_records(read_index(root, info.name))
    if progress is not None:
        progress.total = len(records)
    problems = []
    for rec in records:
        problem = _verify_shard(root, rec)
        if problem:
            problems.append(f"stream '{info.name}': {problem}")
        if progress is not None:
            progress.update()
    return problems


def _verify_shard(root: Path, rec: dict) -> str | None:
    """What is wrong with a shard file's size or content hash against its record, if anything."""
    path = root / rec["file"]
    if not path.is_file():
        return f"shard '{path}' is missing; restore it or {REDO}"
    size = path.stat().st_size
    if size != rec["bytes"]:
        return f"shard '{path}' is {size} bytes, {rec['bytes']} recorded; restore it or {REDO}"
    if HASH not in rec:
        return f"shard '{path}' has no recorded {HASH} content hash; {REDO}"
    if file_hash(path) != rec[HASH]:
        return f"shard '{path}' content hash differs from the recorded one; restore it or {REDO}"
    return None
