"""The tokenizer files a run uses, found from its streams' manifests, and copied with checkpoints.

A checkpoint (and an exported model) carries ``tokenizers/`` with fixed names, so generation
and export never depend on where the data was preprocessed:

* ``text.tiktoken`` (+ ``text.json``, its name/pattern/checksum) — a BPE trained by megadiff,
  or the rank file of a standard encoding (``cl100k_base``/``o200k_base``, with a ``text.json``
  naming it);
* ``image.vq`` and ``audio.codec`` — the built-in image/audio tokenizers' files.

A ``data.source: synthetic`` run has no tokenizer files; its checkpoints get the byte-level text
tokenizer of its layout (:func:`megadiff.data.synthetic.write_byte_tokenizer`) when the layout
has the 256 byte ids.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

TOKENIZER_FILES = {"text": "text.tiktoken", "image": "image.vq", "audio": "audio.codec"}


def resolve_tokenizer_path(path: str, manifest: Path) -> Path | None:
    """A manifest's tokenizer path. An absolute path is used as written when it exists; a
    relative one (relative to the directory the data was built in, unknown here), or a path
    that no longer exists, is looked up by its trailing parts under the manifest's directory
    and its parent first (the data's own ``tokenizers/``), and relative to the working directory
    last: a same-named file elsewhere must not stand in for the data's own."""
    p = Path(path)
    if p.is_absolute() and p.is_file():
        return p
    tails = [Path(*p.parts[i:]) for i in range(len(p.parts))]
    for base in (manifest.parent, manifest.parent.parent):
        for tail in tails:
            if not tail.is_absolute() and (base / tail).is_file():
                return base / tail
    return p if p.is_file() else None


def find_tokenizer_files(cfg: Any) -> dict[str, Path | str]:
    """``{kind: file}`` for the run's streams (``text`` may be a standard encoding's name).

    Only ``data.source: mds`` runs have tokenizers; files that cannot be found are left out
    (generation then reports which task lacks what).
    """
    from megadiff.data.tokenizers.text import STANDARD

    found: dict[str, Path | str] = {}
    if cfg.data.source != "mds":
        return found
    for stream in cfg.data.streams:
        manifest = Path(stream.path) / "manifest.json"
        try:
            tree = json.loads(manifest.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        text = tree.get("text_tokenizer") or (tree.get("vocab") or {}).get("text_tokenizer")
        if text and "text" not in found:
            found["text"] = text if text in STANDARD else resolve_tokenizer_path(text, manifest)
        modal = tree.get("modal_tokenizer") or {}
        kind = tree.get("kind")
        if kind in ("image", "audio") and modal.get("path") and kind not in found:
            found[kind] = resolve_tokenizer_path(modal["path"], manifest)
    return {k: v for k, v in found.items() if v is not None}


def copy_tokenizers(cfg: Any, dest: Path) -> list[str]:
    """Copy the run's tokenizer files into ``dest/tokenizers``; return the kinds copied."""
    from megadiff.data.tokenizers.text import STANDARD, _read_bytes, find_standard_file

    if cfg.data.source == "synthetic":
        return _synthetic_tokenizers(cfg, dest)
    files = find_tokenizer_files(cfg)
    if not files:
        return []
    out = dest / "tokenizers"
    out.mkdir(parents=True, exist_ok=True)
    for kind, src in files.items():
        target = out / TOKENIZER_FILES[kind]
        if kind == "text" and isinstance(src, str) and src in STANDARD:
            std = find_standard_file(src)
            target.write_bytes(_read_bytes(std))  # plain (a .gz rank file is decompressed)
            (out / "text.json").write_text(json.dumps({"name": src, "standard": src}, indent=1))
            continue
        shutil.copyfile(src, target)
        if kind == "text" and Path(src).with_suffix(".json").is_file():
            shutil.copyfile(Path(src).with_suffix(".json"), out / "text.json")
    return sorted(files)


def _synthetic_tokenizers(cfg: Any, dest: Path) -> list[str]:
    """A synthetic run's byte-level text tokenizer, when its layout has the byte ids."""
    from megadiff.data.synthetic import BYTES, synthetic_layout, write_byte_tokenizer
    from megadiff.plan import SYNTHETIC_VOCAB

    layout = synthetic_layout(cfg.model.vocab_size or SYNTHETIC_VOCAB)
    if layout.text_size != BYTES:
        return []
    write_byte_tokenizer(dest / "tokenizers" / TOKENIZER_FILES["text"])
    return ["text"]
