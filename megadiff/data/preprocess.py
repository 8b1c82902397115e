"""``megadiff preprocess text|image|audio``: raw data (or precomputed codes) -> MDS shards.

Output directory (written to a temporary sibling, renamed when complete)::

    OUT/index.json  shard.00000.mds ...   mosaicml-streaming MDS shards
    OUT/manifest.json                     kind, counts, token totals, tokenizers, vocab layout
    OUT/vocab.json                        the (partial) vocab layout of this stream
    OUT/val/                              the held-out split (``--val-fraction``/``--val-count``):
                                          a stream of its own, recorded as ``"val"`` in the manifest

Columns: text streams ``tokens`` (1-D text ids); image/audio streams ``text`` (1-D text ids) and
``codes`` (local codes: ``[h, w]`` for images, ``[frames, num_codebooks]`` for audio).
Every record is validated; bad ones are reported as ``file:line: reason`` and fail the run
unless ``--skip-bad`` is given.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import heapq
import itertools
import json
import os
import shutil
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from megadiff.data.mds import MANIFEST, VAL_DIR, mds_writer, read_index, shard_records
from megadiff.data.names import MODALITIES
from megadiff.data.tokenizers.text import TextTokenizer, TokenizerError, load_text_tokenizer
from megadiff.data.vocab import VocabLayout
from megadiff.flags import HelpFormatter


class PreprocessError(RuntimeError):
    """Bad input records (listed) or unusable inputs; the run wrote nothing."""


@dataclass
class Record:
    where: str  # "file:line" (or "file[index]")
    text: str | None = None
    item: Any = None  # image array / wav path / codes array
    error: str | None = None


@dataclass
class Stats:
    samples: int = 0
    text_tokens: int = 0
    code_tokens: int = 0
    bad: list[str] = field(default_factory=list)
    max_text_id: int = -1
    max_code: int = -1
    max_code_tokens: int = 0  # code tokens of the longest image/clip

    def add(self, ids: np.ndarray, codes: np.ndarray | None = None) -> None:
        """Count one written sample: its text ids and (image/audio) codes."""
        self.samples += 1
        self.text_tokens += len(ids)
        if len(ids):
            self.max_text_id = max(self.max_text_id, int(ids.max()))
        if codes is not None:
            self.code_tokens += codes.size
            self.max_code = max(self.max_code, int(codes.max()))
            self.max_code_tokens = max(self.max_code_tokens, int(codes.size))

    def manifest_stats(self, kind: str) -> dict:
        """What the training preflight checks against the vocabulary and ``seq_length``."""
        out = {"max_text_id": self.max_text_id}
        if kind != "text":
            out.update(max_code=self.max_code, max_code_tokens=self.max_code_tokens)
        return out


# ----------------------------------------------------------------------------- readers


def read_text_records(paths: list[str], text_key: str = "text") -> Iterator[Record]:
    """``.jsonl`` (one ``{"text": ...}`` per line) or plain text (one document per blank-line
    separated paragraph block; ``--doc-per-line`` style files work too)."""
    for p in paths:
        path = Path(p)
        if not path.is_file():
            raise PreprocessError(f"input file '{path}' does not exist")
        if path.suffix == ".jsonl":
            yield from _jsonl(path, lambda d, w: Record(w, text=d[text_key]), (text_key,))
        else:
            yield from _paragraphs(path)


def _utf8_lines(path: Path) -> Iterator[tuple[str, str | None, str | None]]:
    """``(file:line, text, error)`` for each line of ``path``; a line that is not UTF-8 comes
    with ``text=None`` and the error (its column) instead of failing the whole file."""
    with open(path, "rb") as f:
        for i, raw in enumerate(f, 1):
            try:
                yield f"{path}:{i}", raw.decode("utf-8").rstrip("\r\n"), None
            except UnicodeDecodeError as e:
                yield (
                    f"{path}:{i}",
                    None,
                    f"not valid UTF-8 (byte 0x{raw[e.start]:02x} at column {e.start + 1}); "
                    "re-encode the file as UTF-8",
                )


def _paragraphs(path: Path) -> Iterator[Record]:
    """Blank-line separated paragraphs of a plain text file, one record each (named by its first
    line); a paragraph with a line that is not UTF-8 is a bad record naming that line."""
    block: list[str] = []
    start, bad = "", None
    for where, line, err in itertools.chain(_utf8_lines(path), [(f"{path}:end", "", None)]):
        if line is None or line.strip():
            start = start if block or bad else where
            if line is None:
                bad = bad or Record(where, error=err)
            else:
                block.append(line)
            continue
        if bad is not None:
            yield bad
        elif block:
            yield Record(start, text="\n".join(block))
        block, bad = [], None


def _jsonl(
    path: Path, make: Callable[[dict, str], Record], keys: tuple[str, ...]
) -> Iterator[Record]:
    for where, line, err in _utf8_lines(path):
        if err is not None:
            yield Record(where, error=err)
            continue
        if not line.strip():
            continue
        try:
            d = json.loads(line)
        except json.JSONDecodeError as e:
            yield Record(where, error=f"invalid JSON ({e.msg})")
            continue
        missing = [k for k in keys if not isinstance(d, dict) or k not in d]
        if missing:
            yield Record(where, error=f"missing key(s) {', '.join(missing)}")
            continue
        try:
            yield make(d, where)
        except Exception as e:  # noqa: BLE001 - reported as a bad record
            yield Record(where, error=str(e))


def _load_image(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def read_pair_records(
    kind: str,
    jsonl: str | None = None,
    arrays: str | None = None,
    captions: str | None = None,
    codes: str | None = None,
) -> Iterator[Record]:
    """Image/audio pairs from one of:

    * ``jsonl``: ``{"image": "a.png", "text": ...}`` / ``{"audio": "a.wav", "text": ...}``
      (paths relative to the jsonl file);
    * ``arrays`` (images only): ``.npy`` ``[N, H, W, 3]`` uint8 + ``captions``;
    * ``codes``: precomputed codes, ``.npy`` ``[N, ...]`` or ``.npz`` (one array per id) +
      ``captions`` (``.jsonl`` with ``{"id": ..., "text": ...}`` or ``.txt`` one per line).
    """
    key = "image" if kind == "image" else "audio"
    if jsonl:
        path = Path(jsonl)
        if not path.is_file():
            raise PreprocessError(f"input file '{path}' does not exist")

        def make(d: dict, where: str) -> Record:
            src = path.parent / d[key]
            if not src.is_file():
                raise ValueError(f"{key} file '{src}' does not exist")
            return Record(where, text=d["text"], item=src)

        yield from _jsonl(path, make, (key, "text"))
        return
    if not captions:
        raise PreprocessError(f"--captions is required with --{'codes' if codes else 'arrays'}")
    caps = _read_captions(Path(captions))
    src = Path(codes or arrays or "")
    if not src.is_file():
        raise PreprocessError(f"input file '{src}' does not exist")
    try:
        data = np.load(src, allow_pickle=False)
    except Exception as e:  # noqa: BLE001
        raise PreprocessError(f"'{src}' is not a readable .npy/.npz file: {e}") from None
    if isinstance(data, np.lib.npyio.NpzFile):
        items = {k: data[k] for k in data.files}
    else:
        items = {str(i): data[i] for i in range(len(data))}
    _check_all_captioned(items, caps, src, captions)
    for cid, (where, text) in caps.items():
        if cid not in items:
            yield Record(where, error=f"no codes/array with id '{cid}' in '{src}'")
            continue
        yield Record(f"{where} ({src}[{cid}])", text=text, item=items[cid])


def _read_captions(path: Path) -> dict[str, tuple[str, str]]:
    """Caption id -> (``file:line``, text); a line that is not UTF-8 or valid is an error."""
    if not path.is_file():
        raise PreprocessError(f"captions file '{path}' does not exist")
    out: dict[str, tuple[str, str]] = {}
    for where, line, err in _utf8_lines(path):
        if err is not None:
            raise PreprocessError(f"{where}: {err}")
        if path.suffix != ".jsonl":
            out[str(len(out))] = (where, line)
            continue
        if not line.strip():
            continue
        try:
            d = json.loads(line)
            out[str(d.get("id", len(out)))] = (where, d["text"])
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
            raise PreprocessError(f"{where}: bad caption line ({e!r})") from None
    return out


def _check_all_captioned(items: dict, caps: dict, src: Path, captions: str) -> None:
    """Every array/codes entry has a caption (a shorter captions file would drop samples)."""
    missing = [k for k in items if k not in caps]
    if missing:
        have = len(items) - len(missing)
        raise PreprocessError(
            f"'{src}' has {len(items)} entries but '{captions}' captions {have} of them "
            f"(no caption for id(s) {', '.join(missing[:10])}"
            f"{' ...' if len(missing) > 10 else ''}); give one caption per entry"
        )


# ----------------------------------------------------------------------------- encoders


def _text_ids(tok: TextTokenizer, text: Any) -> np.ndarray:
    """Tokenize a string, or validate already tokenized ids (1-D integer array)."""
    if isinstance(text, np.ndarray):
        if text.ndim != 1 or not np.issubdtype(text.dtype, np.integer):
            raise TypeError(f"token ids must be a 1-D integer array, got {text.dtype} {text.shape}")
        if text.size == 0:
            raise ValueError("empty text")
        if text.min() < 0 or text.max() >= tok.n_vocab:
            raise ValueError(f"token id outside the text vocabulary [0, {tok.n_vocab})")
        return text.astype(np.int64)
    if not isinstance(text, str):
        raise TypeError(f"text must be a string, got {type(text).__name__}")
    if not text.strip():
        raise ValueError("empty text")
    return tok.encode(text)


def _ids_dtype(n: int) -> str:
    return "uint16" if n <= 1 << 16 else "uint32"


def check_codes(
    codes: Any,
    codebook_size: int,
    kind: str,
    num_codebooks: int = 1,
    grid: tuple[int, int] | None = None,
) -> np.ndarray:
    """Validate precomputed/encoded codes (integer dtype, shape, range); return int64 array."""
    a = np.asarray(codes)
    if not np.issubdtype(a.dtype, np.integer):
        raise ValueError(f"codes must be integers, got dtype {a.dtype}")
    if kind == "image":
        if a.ndim == 1 and grid is None:
            raise ValueError("1-D image codes need a grid in the codes metadata")
        if a.ndim == 1:
            a = a.reshape(grid)
        if a.ndim != 2 or (grid is not None and tuple(a.shape) != tuple(grid)):
            raise ValueError(f"image codes must have shape {grid or '[h, w]'}, got {a.shape}")
    else:
        if a.ndim == 1 and num_codebooks == 1:
            a = a[:, None]
        if a.ndim != 2 or a.shape[1] != num_codebooks:
            raise ValueError(f"audio codes must be [frames, {num_codebooks}], got {a.shape}")
    if a.size == 0:
        raise ValueError("codes are empty")
    if a.min() < 0 or a.max() >= codebook_size:
        bad = int(a.min() if a.min() < 0 else a.max())
        raise ValueError(f"code {bad} is outside the codebook [0, {codebook_size})")
    return a.astype(np.int64)


def _encode_items(args: tuple) -> list[tuple[np.ndarray | None, str | None]]:
    """Worker: encode a chunk of raw images/wavs with a tokenizer loaded from file."""
    kind, tok_path, items = args
    from megadiff.data.tokenizers.audio import SpectralRVQ, read_wav, resample
    from megadiff.data.tokenizers.image import PatchVQ

    tok = PatchVQ.load(tok_path) if kind == "image" else SpectralRVQ.load(tok_path)
    out: list[tuple[np.ndarray | None, str | None]] = []
    for item in items:
        try:
            if kind == "image":
                img = _load_image(item) if isinstance(item, Path) else np.asarray(item)
                if img.dtype != np.uint8:
                    raise ValueError(f"images must be uint8, got {img.dtype}")
                out.append((tok.encode(img)[0], None))
            else:
                wav, sr = read_wav(item)
                out.append((tok.encode(resample(wav, sr, tok.sample_rate)), None))
        except Exception as e:  # noqa: BLE001 - reported as a bad record
            out.append((None, f"{type(e).__name__}: {e}"))
    return out


# ----------------------------------------------------------------------------- writing


def _progress(total: int | None, desc: str, enabled: bool):
    try:
        from tqdm import tqdm

        return tqdm(total=total, desc=desc, unit="rec", disable=not enabled, file=sys.stderr)
    except ImportError:  # pragma: no cover
        return None


def _finish(tmp: Path, out: Path, overwrite: bool) -> None:
    if out.exists():
        if not overwrite:
            raise PreprocessError(f"output '{out}' exists; pass --overwrite to replace it")
        shutil.rmtree(out)
    os.replace(tmp, out)


def content_key(sample: dict[str, np.ndarray]) -> float:
    """A sample's place in ``[0, 1)``: a 64-bit BLAKE2b hash of its stored columns (names,
    shapes, values as int64), so the same inputs and tokenizers give the same held-out split."""
    h = hashlib.blake2b(digest_size=8)
    for name in sorted(sample):
        a = np.ascontiguousarray(sample[name], dtype=np.int64)
        h.update(f"{name}{a.shape}".encode())
        h.update(a.tobytes())
    return int.from_bytes(h.digest(), "big") / 2.0**64


class SplitWriter:
    """Sends each written sample to the training shards or the held-out split.

    ``val_fraction`` F: a sample is held out when its :func:`content_key` is below F (about
    F of the samples, decided one sample at a time); ``val_count`` N: the N samples with the
    lowest keys are held out (kept in memory until the end, then written in key order). Each
    side counts its own :class:`Stats`; bad records are counted on the training side.
    """

    def __init__(self, train, open_val: Callable[[], Any], fraction: float, count: int) -> None:
        self.train, self.open_val = train, open_val
        self.fraction, self.count = fraction, count
        self.stats, self.val_stats = Stats(), Stats()
        self.val = None
        self._lowest: list[tuple[float, int, dict, tuple]] = []  # max-heap by key (negated)
        self._seen = 0

    def write(self, sample: dict[str, np.ndarray], ids: np.ndarray, codes=None) -> None:
        if not self.fraction and not self.count:
            self._put(False, sample, (ids, codes))
            return
        key = content_key(sample)
        if self.fraction:
            self._put(key < self.fraction, sample, (ids, codes))
            return
        self._seen += 1
        item = (-key, self._seen, sample, (ids, codes))
        if len(self._lowest) < self.count:
            heapq.heappush(self._lowest, item)
            return
        out = heapq.heappushpop(self._lowest, item)  # the largest key of the N + 1 leaves
        self._put(False, out[2], out[3])

    def finish(self) -> None:
        """Write the held-out samples kept for ``val_count``, lowest key first."""
        for _, _, sample, counted in sorted(self._lowest, key=lambda x: (-x[0], x[1])):
            self._put(True, sample, counted)
        self._lowest = []

    def _put(self, held_out: bool, sample: dict, counted: tuple) -> None:
        if held_out and self.val is None:
            self.val = self.open_val()
        (self.val if held_out else self.train).write(sample)
        (self.val_stats if held_out else self.stats).add(*counted)

    @property
    def splits(self) -> bool:
        return bool(self.fraction or self.count)


def write_shards(
    kind: str,
    records: Iterable[Record],
    out: str | Path,
    text_tokenizer: TextTokenizer,
    modal: dict | None = None,
    encode: Callable[[list[Record]], list[tuple[np.ndarray | None, str | None]]] | None = None,
    skip_bad: bool = False,
    overwrite: bool = False,
    compression: str | None = None,
    shard_size: int = 1 << 26,
    chunk: int = 256,
    progress: bool = False,
    workers: int = 2,
    val_fraction: float = 0.0,
    val_count: int = 0,
) -> dict:
    """Validate + tokenize ``records`` and write an MDS stream at ``out`` atomically.

    ``modal`` describes the image/audio codes: ``{"codebook_size", "num_codebooks", "grid",
    "tokenizer", ...}``. ``encode`` turns a chunk of records into codes (default: the record's
    ``item`` already holds codes). ``val_fraction`` / ``val_count`` hold samples out into
    ``out/val/`` (a stream of its own; see :class:`SplitWriter`), recorded under ``"val"`` in
    the manifest. Returns the manifest.
    """
    if kind not in MODALITIES:
        raise PreprocessError(f"unknown kind '{kind}' (one of {', '.join(MODALITIES)})")
    if not 0.0 <= val_fraction < 1.0 or val_count < 0 or (val_fraction and val_count):
        raise PreprocessError(
            f"--val-fraction ({val_fraction}) must be in [0, 1) and --val-count ({val_count}) "
            ">= 0; give at most one of them"
        )
    out = Path(out)
    if out.exists() and not overwrite:
        raise PreprocessError(f"output '{out}' exists; pass --overwrite to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    modal = modal or {}
    tdt = _ids_dtype(text_tokenizer.n_vocab)
    if kind == "text":
        columns = {"tokens": f"ndarray:{tdt}"}
    else:
        columns = {
            "text": f"ndarray:{tdt}",
            "codes": f"ndarray:{_ids_dtype(modal['codebook_size'])}",
        }
    bar = _progress(None, f"preprocess {kind}", progress)
    t0 = time.time()
    try:
        with contextlib.ExitStack() as stack:
            w = stack.enter_context(
                mds_writer(tmp, columns, compression=compression, size_limit=shard_size)
            )

            def open_val():
                vw = mds_writer(tmp / VAL_DIR, columns, compression, shard_size)
                return stack.enter_context(vw)

            split = SplitWriter(w, open_val, val_fraction, val_count)
            bad = split.stats.bad
            for batch in _chunks(records, chunk):
                good = [r for r in batch if r.error is None]
                for r in batch:
                    if r.error is not None:
                        bad.append(f"{r.where}: {r.error}")
                if kind == "text":
                    _write_text(good, text_tokenizer, split, bad, tdt, workers)
                else:
                    _write_pairs(kind, good, text_tokenizer, modal, encode, split, bad, tdt)
                if bar is not None:
                    bar.update(len(batch))
                if bad and not skip_bad and len(bad) >= 20:
                    break  # enough to report
            split.finish()
        if bar is not None:
            bar.close()
        if bad and not skip_bad:
            shown = "\n  ".join(bad[:20])
            raise PreprocessError(
                f"{len(bad)}{'+' if len(bad) >= 20 else ''} bad record(s); nothing "
                f"written (pass --skip-bad to drop them):\n  {shown}"
            )
        if split.stats.samples == 0:
            raise PreprocessError(
                f"no valid records for the {kind} stream"
                f"{' outside the held-out split' if split.val_stats.samples else ''}; "
                "nothing written"
            )
        if split.splits and split.val_stats.samples == 0:
            raise PreprocessError(
                f"--val-fraction {val_fraction}: none of the {split.stats.samples} samples fell "
                "in the held-out split; raise it or give --val-count"
            )
        layout = VocabLayout(
            text_size=text_tokenizer.n_vocab,
            image_codebook_size=modal.get("codebook_size", 0) if kind == "image" else 0,
            audio_codebook_size=modal.get("codebook_size", 0) if kind == "audio" else 0,
            audio_num_codebooks=modal.get("num_codebooks", 1) if kind == "audio" else 1,
            text_tokenizer=text_tokenizer.spec,
        )
        common = (kind, columns, text_tokenizer, modal, layout)
        manifest = _manifest(tmp, split.stats, *common)
        if split.splits:
            val = _manifest(tmp / VAL_DIR, split.val_stats, *common)
            val["split"] = "val"
            _write_manifest(tmp / VAL_DIR, val, layout, t0)
            manifest["val"] = {
                "path": VAL_DIR,
                "num_samples": split.val_stats.samples,
                "total_tokens": val["total_tokens"],
                "fraction": val_fraction or None,
                "count": val_count or None,
                "selection": "blake2b-64 hash of each sample's stored columns: below "
                "fraction, or the count lowest",
            }
        _write_manifest(tmp, manifest, layout, t0)
        _finish(tmp, out, overwrite)
        return manifest
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _manifest(
    root: Path, stats: Stats, kind: str, columns: dict, tok: TextTokenizer, modal: dict, layout
) -> dict:
    """The manifest of the stream written at ``root`` (without ``created``/``seconds``)."""
    return {
        "format": "megadiff-mds",
        "version": 1,
        "kind": kind,
        "columns": columns,
        "num_samples": stats.samples,
        "text_tokens": stats.text_tokens,
        "code_tokens": stats.code_tokens,
        "total_tokens": stats.text_tokens + stats.code_tokens,
        "stats": stats.manifest_stats(kind),
        "shards": shard_records(read_index(root)),
        "bad_records": len(stats.bad),
        "bad_examples": stats.bad[:100],
        "text_tokenizer": tok.spec,
        "modal_tokenizer": {k: v for k, v in modal.items() if k != "tokenizer_obj"},
        "vocab": layout.to_dict(),
    }


def _write_manifest(root: Path, manifest: dict, layout: VocabLayout, t0: float) -> None:
    manifest.update(created=time.strftime("%Y-%m-%dT%H:%M:%S"), seconds=round(time.time() - t0, 3))
    (root / MANIFEST).write_text(json.dumps(manifest, indent=2))
    layout.to_json(root / "vocab.json")


def _chunks(it: Iterable[Record], n: int) -> Iterator[list[Record]]:
    buf: list[Record] = []
    for r in it:
        buf.append(r)
        if len(buf) == n:
            yield buf
            buf = []
    if buf:
        yield buf


def _write_text(
    good: list[Record], tok: TextTokenizer, w: SplitWriter, bad: list[str], dt: str, workers=2
) -> None:
    texts, ids_of = [], {}
    for k, r in enumerate(good):
        try:
            if isinstance(r.text, np.ndarray):  # pre-tokenized
                ids_of[k] = _text_ids(tok, r.text)
            else:
                _text_ids_check(r.text)
                texts.append(k)
        except (ValueError, TypeError) as e:
            bad.append(f"{r.where}: {e}")
    if texts:
        for k, ids in zip(texts, tok.encode_batch([good[k].text for k in texts], workers)):
            ids_of[k] = ids
    for k in sorted(ids_of):
        ids = ids_of[k]
        w.write({"tokens": ids.astype(dt)}, ids)


def _text_ids_check(text: Any) -> None:
    if not isinstance(text, str):
        raise TypeError(f"text must be a string, got {type(text).__name__}")
    if not text.strip():
        raise ValueError("empty text")


def _write_pairs(kind, good, tok, modal, encode, w: SplitWriter, bad: list[str], dt: str) -> None:
    encoded = encode(good) if encode is not None else [(r.item, None) for r in good]
    cdt = _ids_dtype(modal["codebook_size"])
    for r, (codes, err) in zip(good, encoded):
        try:
            if err is not None:
                raise ValueError(err)
            ids = _text_ids(tok, r.text)
            c = check_codes(
                codes,
                modal["codebook_size"],
                kind,
                modal.get("num_codebooks", 1),
                tuple(modal["grid"]) if modal.get("grid") else None,
            )
        except (ValueError, TypeError) as e:
            bad.append(f"{r.where}: {e}")
            continue
        w.write({"text": ids.astype(dt), "codes": c.astype(cdt)}, ids, c)


def tokenizer_encoder(kind: str, tok_path: str | Path, workers: int = 1):
    """A chunk encoder for :func:`write_shards` using a saved built-in tokenizer."""
    pool = ProcessPoolExecutor(workers) if workers > 1 else None

    def encode(recs: list[Record]):
        items = [r.item for r in recs]
        if pool is None:
            return _encode_items((kind, str(tok_path), items))
        parts = [items[i::workers] for i in range(workers)]
        res = list(pool.map(_encode_items, [(kind, str(tok_path), p) for p in parts]))
        out: list = [None] * len(items)
        for k, part in enumerate(res):
            out[k::workers] = part
        return out

    encode.pool = pool  # type: ignore[attr-defined]
    return encode


# ----------------------------------------------------------------------------- CLI


def positive_int(text: str) -> int:
    """An argparse type: an integer >= 1 (anything else is a usage error, exit 2)."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got '{text}'")
    return value


KIND_HELP = {
    "text": "text files -> a text stream (documents packed into rows at training time)",
    "image": "images + captions (or precomputed codes) -> an image-caption stream",
    "audio": "audio + transcripts (or precomputed codes) -> an audio-transcript stream",
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    """One sub-command per kind (``megadiff preprocess text --help`` lists that kind's flags
    with their defaults)."""
    sub = p.add_subparsers(dest="kind", metavar="KIND", required=True)
    for kind in MODALITIES:
        k = sub.add_parser(
            kind,
            help=KIND_HELP[kind],
            description=KIND_HELP[kind],
            formatter_class=HelpFormatter,
        )
        _add_kind_arguments(k, kind)


def _add_kind_arguments(p: argparse.ArgumentParser, kind: str) -> None:
    p.add_argument("--out", required=True, help="output directory (must not exist)")
    if kind == "text":
        p.add_argument("--input", nargs="+", default=[], help=".txt / .jsonl files")
        p.add_argument("--text-key", default="text", help="jsonl key holding the text")
    else:
        what = "image" if kind == "image" else "audio"
        p.add_argument(
            "--input",
            nargs=1,
            default=[],
            metavar="FILE.jsonl",
            help=f"a .jsonl of {{{what}: path, text: ...}} records",
        )
    p.add_argument(
        "--tokenizer",
        default=None,
        help="text tokenizer: cl100k_base | o200k_base | path/to/file.tiktoken",
    )
    if kind == "text":
        p.add_argument(
            "--train-tokenizer",
            default=None,
            metavar="PATH.tiktoken",
            help="train a BPE on the inputs, save it here, and use it",
        )
        p.add_argument(
            "--vocab-size", type=positive_int, default=2048, help="BPE size for --train-tokenizer"
        )
    else:
        if kind == "image":
            p.add_argument("--arrays", help=".npy [N,H,W,3] uint8 images (with --captions)")
        p.add_argument(
            "--codes", help="precomputed codes .npy/.npz (with --captions, --codes-meta)"
        )
        p.add_argument("--codes-meta", help="JSON: codebook_size, num_codebooks, grid, frame_rate")
        p.add_argument("--captions", help=".jsonl {id, text} or .txt (one caption per line)")
        p.add_argument(
            "--modal-tokenizer",
            help="PatchVQ file" if kind == "image" else "SpectralRVQ file",
        )
    p.add_argument(
        "--workers",
        type=positive_int,
        default=max(1, (os.cpu_count() or 1)),
        help="processes/threads for tokenization (default: the CPU count, here %(default)s)",
    )
    p.add_argument("--skip-bad", action="store_true", help="drop bad records instead of failing")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.add_argument("--compression", default=None, help="MDS shard compression (e.g. zstd)")
    p.add_argument("--shard-size", type=positive_int, default=1 << 26, help="max bytes per shard")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    val = p.add_mutually_exclusive_group()
    val.add_argument(
        "--val-fraction",
        type=val_fraction,
        default=0.0,
        metavar="F",
        help="hold out about this fraction of the samples (by content hash) into OUT/val/",
    )
    val.add_argument(
        "--val-count",
        type=positive_int,
        default=0,
        metavar="N",
        help="hold out exactly N samples (the N lowest content hashes) into OUT/val/",
    )


def val_fraction(text: str) -> float:
    """An argparse type: a fraction in (0, 1) (anything else is a usage error, exit 2)."""
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0.0 < value < 1.0:
        raise argparse.ArgumentTypeError(f"must be a number in (0, 1), got '{text}'")
    return value


def run(args: argparse.Namespace) -> int:
    try:
        manifest = _run(args)
    except (PreprocessError, TokenizerError) as e:
        print(f"megadiff preprocess: error: {e}", file=sys.stderr)
        return 2
    val = manifest.get("val")
    held = f", {val['num_samples']} held out in {val['path']}/" if val else ""
    print(
        f"wrote {manifest['num_samples']} {manifest['kind']} samples, "
        f"{manifest['total_tokens']} tokens ({manifest['bad_records']} bad records skipped"
        f"{held}) -> {args.out}"
    )
    return 0


def _run(args: argparse.Namespace) -> dict:
    from megadiff.data.tokenizers.image import CodesMeta

    if getattr(args, "train_tokenizer", None):
        from megadiff.data.tokenizers.text import train_bpe

        texts = (r.text for r in read_text_records(args.input, args.text_key) if r.text)
        tok = train_bpe(texts, args.vocab_size, args.train_tokenizer)
    elif args.tokenizer:
        tok = load_text_tokenizer(args.tokenizer)
    else:
        raise PreprocessError("give --tokenizer (or --train-tokenizer for the text kind)")
    common = {
        "skip_bad": args.skip_bad,
        "overwrite": args.overwrite,
        "compression": args.compression,
        "shard_size": args.shard_size,
        "progress": not args.no_progress,
        "workers": args.workers,
        "val_fraction": args.val_fraction,
        "val_count": args.val_count,
    }
    if args.kind == "text":
        if not args.input:
            raise PreprocessError("text kind needs --input files")
        return write_shards(
            "text", read_text_records(args.input, args.text_key), args.out, tok, **common
        )
    records = read_pair_records(
        args.kind,
        jsonl=args.input[0] if args.input else None,
        arrays=getattr(args, "arrays", None),
        captions=args.captions,
        codes=args.codes,
    )
    if args.codes:
        if not args.codes_meta:
            raise PreprocessError("--codes needs --codes-meta (codebook_size, ...)")
        m = CodesMeta.from_json(args.codes_meta)
        modal = {
            "codebook_size": m.codebook_size,
            "num_codebooks": m.num_codebooks,
            "grid": list(m.grid) if m.grid else None,
            "frame_rate": m.frame_rate,
            "tokenizer": m.tokenizer,
        }
        return write_shards(args.kind, records, args.out, tok, modal, **common)
    if not args.modal_tokenizer:
        raise PreprocessError(f"{args.kind} kind needs --modal-tokenizer or --codes")
    modal = modal_info(args.kind, args.modal_tokenizer)
    enc = tokenizer_encoder(args.kind, args.modal_tokenizer, args.workers)
    try:
        return write_shards(args.kind, records, args.out, tok, modal, encode=enc, **common)
    finally:
        if enc.pool is not None:
            enc.pool.shutdown()


def modal_info(kind: str, path: str | Path) -> dict:
    """Manifest entry for a built-in image/audio tokenizer file."""
    if kind == "image":
        from megadiff.data.tokenizers.image import PatchVQ

        t = PatchVQ.load(path)
        return {
            "codebook_size": t.codebook_size,
            "num_codebooks": 1,
            "grid": list(t.grid),
            "tokenizer": "patch_vq",
            "path": str(path),
        }
    from megadiff.data.tokenizers.audio import SpectralRVQ

    t = SpectralRVQ.load(path)
    return {
        "codebook_size": t.codebook_size,
        "num_codebooks": t.num_codebooks,
        "frame_rate": t.frame_rate,
        "tokenizer": "spectral_rvq",
        "path": str(path),
    }
