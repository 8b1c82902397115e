"""Built-in tri-modal demo data, generated offline in seconds on a CPU.

* text: English paragraphs of the Python reference docs shipped with CPython
  (``pydoc_data.topics``) mixed with two verifiable tasks: arithmetic documents (``12+7=19``
  lines) and in-context lookup documents (groups ``able=611644 / ack=768175 / ack?768175``:
  two definitions with fresh codes, then one asked back; ``synth.lookup_groups``, keys from
  :func:`one_token_words`); the BPE splits digits (one token per digit);
* image-caption pairs: procedurally drawn coloured shapes at positions, caption determines
  the image ("a red circle on the left");
* audio-transcript pairs: the same kind of phrases spoken by espeak-ng (``espeakng-loader``
  wheel; a formant synthesizer if it cannot load, recorded in ``demo.json``).

:func:`build_demo_data` trains the tokenizers (BPE, PatchVQ, SpectralRVQ), writes one MDS stream
per source and returns their paths and the vocab layout.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from megadiff.data.preprocess import Record, write_shards
from megadiff.data.tokenizers.audio import SpectralRVQ, resample
from megadiff.data.tokenizers.image import PatchVQ
from megadiff.data.tokenizers.text import GPT4_PATTERN, load_text_tokenizer, train_bpe
from megadiff.data.vocab import VocabLayout
from megadiff.demo.shapes import random_caption
from megadiff.demo.synth import (
    Espeak,
    arithmetic_lines,
    digit_sums,
    english_text,
    formant_say,
    lookup_groups,
    pick_lines,
    shape_dataset,
)

DEMO_VERSION = 8
VAL_FRACTION = 0.05  # of each stream, held out into its val/ split (by content hash)
# the GPT-4 split pattern with one digit per pre-token (numbers become digit sequences)
DEMO_PATTERN = GPT4_PATTERN.replace(r"\p{N}{1,3}", r"\p{N}")


@dataclass
class DemoParams:
    text_vocab: int = 1024
    n_arith_docs: int = 400  # documents of 8 arithmetic lines each
    n_lookup_docs: int = 400  # documents of 4 lookup groups each
    n_sums: int = 16000  # single-digit sums `3+5=08`, one per document (the `sums` stream)
    n_sums_val: int = 800  # the sums' held-out rows: other draws of the same 100 facts
    lookup_pairs: int = 2  # definitions per lookup group
    n_images: int = 1200
    image_size: int = 32
    image_patch: int = 8  # a 4 x 4 grid: 16 tokens per image
    image_codebook: int = 64
    n_audio: int = 300
    audio_sample_rate: int = 16000
    audio_n_fft: int = 1024
    audio_hop: int = 1280  # 12.5 frames/s x 2 codebooks = 25 tokens/s
    audio_codebook: int = 64
    audio_codebooks: int = 2
    seed: int = 0


@dataclass
class DemoData:
    root: str
    streams: dict[str, str]  # name -> MDS directory (text, image, audio)
    vocab_path: str
    text_tokenizer: str
    image_tokenizer: str
    audio_tokenizer: str
    speech: str  # espeak-ng | formant
    # name -> the held-out stream of a stream that has no content-split val/ (its val_path)
    val_paths: dict[str, str] = field(default_factory=dict)

    def stream_entry(self, name: str) -> dict[str, str]:
        """The ``data.streams`` keys of stream ``name``: its path, and ``val_path`` if it has
        one."""
        held_out = {"val_path": self.val_paths[name]} if name in self.val_paths else {}
        return {"name": name, "path": self.streams[name], **held_out}

    @property
    def vocab(self) -> VocabLayout:
        return VocabLayout.from_json(self.vocab_path)


def _rebased(data: dict, root: Path) -> DemoData:
    """The :class:`DemoData` recorded in ``demo.json`` with its paths under ``root``, wherever
    and from whatever directory the data was built (``--data-dir`` relative or absolute)."""
    old = Path(data["root"])

    def move(path: str) -> str:
        try:
            return str(root / Path(path).relative_to(old))
        except ValueError:  # not under the recorded root (e.g. a tokenizer name)
            return path

    fields = {k: move(v) if isinstance(v, str) and k != "speech" else v for k, v in data.items()}
    fields["streams"] = {k: move(v) for k, v in data["streams"].items()}
    fields["val_paths"] = {k: move(v) for k, v in data.get("val_paths", {}).items()}
    return DemoData(**fields)


def _speech(n: int, sr: int, seed: int) -> tuple[list[np.ndarray], list[str], str]:
    rng = np.random.default_rng(seed + 1)
    texts = [random_caption(rng) for _ in range(n)]
    try:
        e = Espeak()
        say, src_sr, backend = e.say, e.sample_rate, "espeak-ng"
    except Exception:  # noqa: BLE001 - any failure -> fallback synthesizer
        say, src_sr, backend = formant_say, sr, "formant"
    wavs = [resample(say(t), src_sr, sr) for t in texts]
    return wavs, texts, backend


def build_demo_data(
    out_dir: str | Path, params: DemoParams | None = None, overwrite: bool = False, log=print
) -> DemoData:
    """Create (or reuse, when ``demo.json`` matches ``params``) the demo data under ``out_dir``."""
    p = params or DemoParams()
    root = Path(out_dir)
    meta_path = root / "demo.json"
    if meta_path.is_file() and not overwrite:
        meta = json.loads(meta_path.read_text())
        if meta.get("version") == DEMO_VERSION and meta.get("params") == asdict(p):
            return _rebased(meta["data"], root)
    if root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True)
    t0 = time.time()

    # ---- raw data
    paras = english_text()
    arith = arithmetic_lines(8 * p.n_arith_docs, seed=p.seed)
    arith_docs = _documents(arith, 8)
    images, captions = shape_dataset(p.n_images, seed=p.seed, size=p.image_size)
    wavs, transcripts, backend = _speech(p.n_audio, p.audio_sample_rate, p.seed)
    log(f"demo: generated raw data ({time.time() - t0:.1f}s, speech: {backend})")

    # ---- tokenizers
    tok_dir = root / "tokenizers"
    text_tok = train_bpe(
        paras + arith_docs + captions + transcripts,
        p.text_vocab,
        tok_dir / "text.tiktoken",
        pat_str=DEMO_PATTERN,
    )
    look = lookup_groups(one_token_words(text_tok), 4 * p.n_lookup_docs, p.seed, p.lookup_pairs)
    lookup_docs = _documents(look, 4)
    n_fit = min(len(images), 800)
    img_tok = PatchVQ(p.image_size, p.image_patch, p.image_codebook).fit(
        images[:n_fit], seed=p.seed
    )
    img_tok.save(tok_dir / "image.vq")
    aud_tok = SpectralRVQ(
        p.audio_sample_rate, p.audio_n_fft, p.audio_hop, p.audio_codebook, p.audio_codebooks
    ).fit(wavs[:200], seed=p.seed)
    aud_tok.save(tok_dir / "audio.codec")
    log(f"demo: trained tokenizers ({time.time() - t0:.1f}s)")

    # ---- shards
    streams = {}
    rng = np.random.default_rng(p.seed + 2)
    docs = paras + arith_docs + lookup_docs
    order = rng.permutation(len(docs))
    text_recs = [Record(f"demo-text[{i}]", text=docs[i]) for i in order]
    streams["text"] = str(root / "text")
    write_shards("text", text_recs, streams["text"], text_tok, val_fraction=VAL_FRACTION)
    # the sums are the 100 facts of the addition table, every one taught: a content split
    # would hold whole facts out (never taught, always wrong), so the held-out rows are other
    # draws of the same facts (a check of what is memorised, given as the stream's val_path)
    streams["sums"], val_paths = str(root / "sums"), {"sums": str(root / "sums_val")}
    for name, n, seed in (("sums", p.n_sums, p.seed), ("sums_val", p.n_sums_val, p.seed + 9)):
        sums = digit_sums(n, seed=seed, width=2)
        recs = [Record(f"demo-{name}[{i}]", text=d) for i, d in enumerate(sums)]
        write_shards("text", recs, root / name, text_tok)
    img_codes = img_tok.encode(images)
    img_modal = {
        "codebook_size": p.image_codebook,
        "num_codebooks": 1,
        "grid": list(img_tok.grid),
        "tokenizer": "patch_vq",
        "path": str(tok_dir / "image.vq"),
    }
    streams["image"] = str(root / "image")
    write_shards(
        "image",
        [Record(f"demo-image[{i}]", text=c, item=img_codes[i]) for i, c in enumerate(captions)],
        streams["image"],
        text_tok,
        img_modal,
        val_fraction=VAL_FRACTION,
    )
    aud_modal = {
        "codebook_size": p.audio_codebook,
        "num_codebooks": p.audio_codebooks,
        "frame_rate": aud_tok.frame_rate,
        "tokenizer": "spectral_rvq",
        "path": str(tok_dir / "audio.codec"),
        "speech": backend,
    }
    streams["audio"] = str(root / "audio")
    write_shards(
        "audio",
        [
            Record(f"demo-audio[{i}]", text=t, item=aud_tok.encode(w))
            for i, (t, w) in enumerate(zip(transcripts, wavs))
        ],
        streams["audio"],
        text_tok,
        aud_modal,
        val_fraction=VAL_FRACTION,
    )
    vocab = VocabLayout(
        text_size=text_tok.n_vocab,
        image_codebook_size=p.image_codebook,
        audio_codebook_size=p.audio_codebook,
        audio_num_codebooks=p.audio_codebooks,
        text_tokenizer=str(tok_dir / "text.tiktoken"),
    )
    vocab.to_json(root / "vocab.json")
    data = DemoData(
        str(root),
        streams,
        str(root / "vocab.json"),
        text_tok.spec,
        str(tok_dir / "image.vq"),
        str(tok_dir / "audio.codec"),
        backend,
        val_paths,
    )
    meta_path.write_text(
        json.dumps({"version": DEMO_VERSION, "params": asdict(p), "data": asdict(data)}, indent=2)
    )
    log(f"demo: wrote shards to {root} ({time.time() - t0:.1f}s, vocab {vocab.vocab_size})")
    return data


def build_tasks_stream(data: DemoData, n_docs: int = 4000, seed: int = 7) -> str:
    """An extra text stream of verifiable-task documents only (``<root>/tasks``, built once):
    half arithmetic (8 lines each), half lookup (4 groups each).

    Used to bias the demo mixture towards the verifiable tasks (``megadiff demo --tasks P``).
    """

    def records(words: list[str], pairs: int) -> list[Record]:
        half = n_docs // 2
        arith = arithmetic_lines(8 * half, seed=seed)
        look = lookup_groups(words, 4 * (n_docs - half), seed, pairs)
        docs = _documents(arith, 8) + _documents(look, 4)
        order = np.random.default_rng(seed).permutation(len(docs))
        return [Record(f"demo-tasks[{i}]", text=docs[i]) for i in order]

    return _extra_text_stream(data, "tasks", records)


def build_lookup_stream(data: DemoData, n_docs: int = 300_000, seed: int = 303) -> str:
    """An extra text stream of single lookup problems, one per document (``<root>/lookup``,
    built once, ~15 s). Read unpacked (``pack: false``), each row holds one problem alone,
    as at generation time (``megadiff demo --lookup P``)."""

    def records(words: list[str], pairs: int) -> list[Record]:
        groups = lookup_groups(words, n_docs, seed, pairs)
        return [Record(f"demo-lookup[{i}]", text=g) for i, g in enumerate(groups)]

    return _extra_text_stream(data, "lookup", records)


def build_arith_stream(data: DemoData, n_docs: int = 40_000, seed: int = 505) -> str:
    """An extra text stream of single arithmetic problems (``23+18=41``, operands below 50),
    one per document (``<root>/arith``, built once). Read unpacked with ``eos_fill``, each row
    holds one problem and ``<eot>`` to its end, as a fixed-length generation buffer is filled
    (``megadiff demo --arith P``). Samples are held out into ``val/`` by content, so held-out
    problems never occur in training."""

    def records(words: list[str], pairs: int) -> list[Record]:
        lines = arithmetic_lines(n_docs, seed=seed)
        return [Record(f"demo-arith[{i}]", text=t) for i, t in enumerate(lines)]

    return _extra_text_stream(data, "arith", records)


def build_sums_rows_stream(data: DemoData, n_docs: int = 20_000, seed: int = 606) -> str:
    """An extra text stream of single-digit sums (``7+8=15``), one per document
    (``<root>/sums_rows``, built once), read like :func:`build_arith_stream` (unpacked,
    ``eos_fill``; ``megadiff demo --sums-rows P``). 100 distinct problems; the content split
    holds whole problems out of training (the policy task ``sums``'s held-out prompts)."""

    def records(words: list[str], pairs: int) -> list[Record]:
        lines = digit_sums(n_docs, seed=seed)
        return [Record(f"demo-sums-rows[{i}]", text=t) for i, t in enumerate(lines)]

    return _extra_text_stream(data, "sums_rows", records)


def build_pick_stream(data: DemoData, n_docs: int = 60_000, seed: int = 707) -> str:
    """An extra text stream of pick rows (``381|527=527;8301``, :func:`pick_lines`), one per
    document (``<root>/pick``, built once), read like :func:`build_arith_stream` (unpacked,
    ``eos_fill``; ``megadiff demo --pick P``): the task of the unmasking-policy experiments."""

    def records(words: list[str], pairs: int) -> list[Record]:
        lines = pick_lines(n_docs, seed=seed)
        return [Record(f"demo-pick[{i}]", text=t) for i, t in enumerate(lines)]

    return _extra_text_stream(data, "pick", records)


def _extra_text_stream(
    data: DemoData, name: str, records: Callable[[list[str], int], list[Record]]
) -> str:
    """``<root>/<name>``: text shards of ``records(one-token words, lookup pairs)``, written
    once (reused while its manifest exists)."""
    out = Path(data.root) / name
    if (out / "manifest.json").is_file():
        return str(out)
    tok = load_text_tokenizer(data.text_tokenizer)
    pairs = json.loads((Path(data.root) / "demo.json").read_text())["params"]["lookup_pairs"]
    recs = records(one_token_words(tok), pairs)
    write_shards("text", recs, out, tok, overwrite=True, val_fraction=VAL_FRACTION)
    return str(out)


def _documents(lines: list[str], per_doc: int) -> list[str]:
    """Consecutive ``per_doc`` lines joined into one document each."""
    return ["\n".join(lines[i : i + per_doc]) for i in range(0, len(lines), per_doc)]


def one_token_words(tok) -> list[str]:
    """Lower-case ASCII words of 3+ letters that ``tok`` encodes as exactly one token."""
    out = []
    for i in range(tok.n_vocab):
        w = tok.decode([i])
        if (
            len(w) >= 3
            and w.isascii()
            and w.isalpha()
            and w.islower()
            and list(tok.encode(w)) == [i]
        ):
            out.append(w)
    return out


def load_demo_tokenizers(data: DemoData):
    """(text, image, audio) tokenizers of a built demo set."""
    return (
        load_text_tokenizer(data.text_tokenizer),
        PatchVQ.load(data.image_tokenizer),
        SpectralRVQ.load(data.audio_tokenizer),
    )
