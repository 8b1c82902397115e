"""The shared tri-modal vocabulary: one id space for text, image and audio tokens.

Layout (ids increase left to right; every block is contiguous)::

    [ text BPE | text specials | MASK PAD | <boi> <eoi> | image codebook | <boa> <eoa> | audio ]
      \\______ TEXT range _____/             \\_______ IMAGE range _______/ \\___ AUDIO range __/

* text specials: ``<bot> <eot>`` (text boundaries) and the task tokens ``<t2i> <t2s> <caption>
  <asr> <text>``. They count as TEXT.
* ``<boi> <eoi>`` count as IMAGE, ``<boa> <eoa>`` as AUDIO: each modality's logit range
  ``(start, end)`` contains its boundary tokens, so a masked boundary can be predicted.
* MASK and PAD belong to no range (never a prediction target). PAD positions get modality id
  :data:`MODALITY_PAD` (3), so they can be dropped from loss and attention.
* Audio with ``K`` codebooks of size ``C`` is flattened per frame, interleaved: the code ``c`` of
  codebook ``k`` in frame ``f`` is token ``audio_start + k*C + c`` at stream position ``f*K + k``.

The layout is saved as JSON next to every shard set and checkpoint (:meth:`VocabLayout.to_json`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from megadiff.data.names import MODALITIES, TASKS

TEXT, IMAGE, AUDIO = 0, 1, 2  # modality ids: positions in MODALITIES
MODALITY_PAD = 3  # modality id of PAD positions (excluded from loss and attention)

TEXT_SPECIALS = ("<bot>", "<eot>", *(f"<{t}>" for t in TASKS))
LAYOUT_VERSION = 1


class VocabError(ValueError):
    """A token id outside the vocabulary or its modality range, or an inconsistent layout."""


@dataclass(frozen=True)
class VocabLayout:
    """Id ranges of the shared vocabulary; built from the three block sizes alone."""

    text_size: int
    image_codebook_size: int = 0
    audio_codebook_size: int = 0
    audio_num_codebooks: int = 1
    text_tokenizer: str = ""  # informative: name/path of the text tokenizer
    extra: dict = field(default_factory=dict, compare=False)  # free-form metadata

    def __post_init__(self) -> None:
        if self.text_size <= 0:
            raise VocabError(f"text_size must be positive, got {self.text_size}")
        for key in ("image_codebook_size", "audio_codebook_size"):
            if getattr(self, key) < 0:
                raise VocabError(f"{key} must be >= 0, got {getattr(self, key)}")
        if self.audio_num_codebooks < 1:
            raise VocabError(f"audio_num_codebooks must be >= 1, got {self.audio_num_codebooks}")

    # ------------------------------------------------------------------ ids
    @property
    def specials(self) -> dict[str, int]:
        s = {name: self.text_size + i for i, name in enumerate(TEXT_SPECIALS)}
        n = self.text_size + len(TEXT_SPECIALS)
        s["<mask>"], s["<pad>"] = n, n + 1
        s["<boi>"], s["<eoi>"] = n + 2, n + 3
        a = self.image_start + self.image_codebook_size
        s["<boa>"], s["<eoa>"] = a, a + 1
        return s

    @property
    def mask_id(self) -> int:
        return self.text_size + len(TEXT_SPECIALS)

    @property
    def pad_id(self) -> int:
        return self.mask_id + 1

    @property
    def image_start(self) -> int:
        """First image code id (after ``<boi> <eoi>``)."""
        return self.mask_id + 4

    @property
    def audio_start(self) -> int:
        """First audio code id (codebook 0, code 0)."""
        return self.image_start + self.image_codebook_size + 2

    @property
    def vocab_size(self) -> int:
        return self.audio_start + self.audio_num_codebooks * self.audio_codebook_size

    def task_id(self, task: str) -> int:
        if task not in TASKS:
            raise VocabError(f"unknown task '{task}' (known: {', '.join(TASKS)})")
        return self.specials[f"<{task}>"]

    def ranges(self) -> dict[int, tuple[int, int]]:
        """Modality id -> (start, end) logit range, end exclusive; boundaries included."""
        return {
            TEXT: (0, self.mask_id),
            IMAGE: (self.mask_id + 2, self.image_start + self.image_codebook_size),
            AUDIO: (self.audio_start - 2, self.vocab_size),
        }

    def ranges_array(self) -> np.ndarray:
        """int64 [4, 2]: rows TEXT, IMAGE, AUDIO, MODALITY_PAD (PAD's row is ``[pad, pad+1)``)."""
        r = self.ranges()
        return np.array([r[TEXT], r[IMAGE], r[AUDIO], (self.pad_id, self.pad_id + 1)], np.int64)

    # ------------------------------------------------------------------ mapping
    def image_tokens(self, codes: np.ndarray) -> np.ndarray:
        """Local image codes in ``[0, C)`` -> global ids (flattened row-major)."""
        return np.asarray(codes, np.int64).reshape(-1) + self.image_start

    def audio_tokens(self, codes: np.ndarray) -> np.ndarray:
        """Local audio codes ``[frames, K]`` -> global ids, interleaved per frame."""
        codes = np.asarray(codes, np.int64)
        if codes.ndim == 1:
            codes = codes[:, None]
        k = np.arange(codes.shape[1], dtype=np.int64) * self.audio_codebook_size
        return (codes + k + self.audio_start).reshape(-1)

    def modality_of(self, ids: np.ndarray) -> np.ndarray:
        """Per-id modality (TEXT/IMAGE/AUDIO, MODALITY_PAD for PAD; MASK counts as -1)."""
        ids = np.asarray(ids, np.int64)
        out = np.full(ids.shape, -1, np.int64)
        for mod, (lo, hi) in self.ranges().items():
            out[(ids >= lo) & (ids < hi)] = mod
        out[ids == self.pad_id] = MODALITY_PAD
        bad = (out == -1) & (ids != self.mask_id)
        if bad.any():
            raise VocabError(
                f"token id {int(ids[bad].flat[0])} is outside the vocabulary [0, {self.vocab_size})"
            )
        return out

    def check_ids(self, ids: np.ndarray, modality: int | None = None, where: str = "") -> None:
        """Raise :class:`VocabError` naming ``where`` if an id is outside the vocabulary, or
        outside ``modality``'s range when one is given."""
        ids = np.asarray(ids)
        if ids.size == 0:
            return
        if not np.issubdtype(ids.dtype, np.integer):
            raise VocabError(f"{where or 'tokens'}: ids must be integers, got dtype {ids.dtype}")
        lo, hi = (0, self.vocab_size) if modality is None else self.ranges()[modality]
        mn, mx = int(ids.min()), int(ids.max())
        if mn < lo or mx >= hi:
            bad = mn if mn < lo else mx
            what = "the vocabulary" if modality is None else f"the {MODALITIES[modality]} range"
            raise VocabError(f"{where or 'tokens'}: token id {bad} is outside {what} [{lo}, {hi})")

    # ------------------------------------------------------------------ (de)serialisation
    def to_dict(self) -> dict:
        return {
            "version": LAYOUT_VERSION,
            "text_size": self.text_size,
            "image_codebook_size": self.image_codebook_size,
            "audio_codebook_size": self.audio_codebook_size,
            "audio_num_codebooks": self.audio_num_codebooks,
            "text_tokenizer": self.text_tokenizer,
            "extra": self.extra,
            # derived, stored so other tools need not re-derive (checked on load)
            "vocab_size": self.vocab_size,
            "mask_id": self.mask_id,
            "pad_id": self.pad_id,
            "image_start": self.image_start,
            "audio_start": self.audio_start,
            "specials": self.specials,
            "ranges": {MODALITIES[m]: list(r) for m, r in self.ranges().items()},
            "modality_ids": {**{m: i for i, m in enumerate(MODALITIES)}, "pad": MODALITY_PAD},
        }

    @classmethod
    def from_dict(cls, d: dict, where: str = "vocab layout") -> VocabLayout:
        if d.get("version") != LAYOUT_VERSION:
            raise VocabError(f"{where}: unsupported layout version {d.get('version')!r}")
        try:
            v = cls(
                text_size=int(d["text_size"]),
                image_codebook_size=int(d["image_codebook_size"]),
                audio_codebook_size=int(d["audio_codebook_size"]),
                audio_num_codebooks=int(d["audio_num_codebooks"]),
                text_tokenizer=str(d.get("text_tokenizer", "")),
                extra=dict(d.get("extra", {})),
            )
        except KeyError as e:
            raise VocabError(f"{where}: missing key {e}") from e
        for key in ("vocab_size", "mask_id", "pad_id", "image_start", "audio_start", "specials"):
            if key in d and d[key] != getattr(v, key):
                raise VocabError(f"{where}: stored {key}={d[key]} disagrees with the layout")
        return v

    def to_json(self, path: str | Path | None = None) -> str:
        text = json.dumps(self.to_dict(), indent=2)
        if path is not None:
            Path(path).write_text(text)
        return text

    @classmethod
    def from_json(cls, src: str | Path) -> VocabLayout:
        """From a JSON string or a file path."""
        p = Path(src) if not str(src).lstrip().startswith("{") else None
        if p is not None:
            if not p.is_file():
                raise VocabError(f"vocab layout file '{p}' does not exist")
            try:
                d = json.loads(p.read_text())
            except json.JSONDecodeError as e:
                raise VocabError(f"vocab layout file '{p}' is not valid JSON: {e}") from e
            return cls.from_dict(d, where=str(p))
        return cls.from_dict(json.loads(str(src)))


def merge_layouts(layouts: list[tuple[str, VocabLayout]]) -> VocabLayout:
    """One layout from the partial layouts of several streams (sizes must agree where set)."""
    vals: dict[str, tuple[int, str]] = {}
    for name, lay in layouts:
        for key in ("text_size", "image_codebook_size", "audio_codebook_size"):
            v = getattr(lay, key)
            if key != "text_size" and v == 0:
                continue
            if key in vals and vals[key][0] != v:
                raise VocabError(
                    f"streams '{vals[key][1]}' and '{name}' disagree on {key}: "
                    f"{vals[key][0]} vs {v} (re-run preprocess with the same tokenizers)"
                )
            vals[key] = (v, name)
            if key == "audio_codebook_size":
                vals["audio_num_codebooks"] = (lay.audio_num_codebooks, name)
    return VocabLayout(
        text_size=vals["text_size"][0],
        image_codebook_size=vals.get("image_codebook_size", (0,))[0],
        audio_codebook_size=vals.get("audio_codebook_size", (0,))[0],
        audio_num_codebooks=vals.get("audio_num_codebooks", (1,))[0],
        text_tokenizer=layouts[0][1].text_tokenizer,
    )


def resolve_layout(vocab_path: str | None, streams: list[tuple[str, str]]) -> VocabLayout:
    """The run's layout: ``vocab_path`` if given, else the streams' manifests merged.

    ``streams``: ``(name, MDS directory)`` pairs. Errors name the file that is missing or bad.
    """
    if vocab_path:
        return VocabLayout.from_json(vocab_path)
    parts = []
    for name, path in streams:
        manifest = Path(path) / "manifest.json"
        if not manifest.is_file():
            raise VocabError(
                f"stream '{name}': '{manifest}' does not exist (write shards with "
                "`megadiff preprocess`)"
            )
        try:
            tree = json.loads(manifest.read_text())
        except json.JSONDecodeError as e:
            raise VocabError(f"stream '{name}': '{manifest}' is not valid JSON ({e})") from e
        if not isinstance(tree, dict) or "vocab" not in tree:
            raise VocabError(f"stream '{name}': '{manifest}' has no vocabulary layout")
        parts.append((name, VocabLayout.from_dict(tree["vocab"], str(manifest))))
    if not parts:
        raise VocabError("no data.vocab and no streams to take a vocabulary layout from")
    return merge_layouts(parts)
