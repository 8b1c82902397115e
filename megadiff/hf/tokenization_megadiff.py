"""Hugging Face tokenizer of an exported megadiff model (self-contained: ``transformers`` and
``tiktoken``; copied next to the weights and loaded with ``AutoTokenizer.from_pretrained(folder,
trust_remote_code=True)``).

Text ids are the model's own: the tiktoken rank file ``tokenizers/text.tiktoken`` (token ``i`` is
the byte string of rank ``i``) with the split pattern the model was trained with
(``tokenizer_config.json``'s ``pat_str``). The specials of ``vocab.json`` (``<bot> <eot>``, the
task tokens, ``<mask> <pad>``, the image and audio boundaries) are the tokenizer's special tokens
with the model's ids, so ``mask_token_id`` and ``pad_token_id`` are the ones the model was
trained with; as usual in ``transformers`` their names in the text become their ids
(``split_special_tokens=True`` encodes them as plain text, as megadiff itself does). Image and
audio code ids have no text form: decoding skips them.
"""

from __future__ import annotations

import json
import os
import shutil

import tiktoken
from transformers import PreTrainedTokenizer

TEXT_FILE = "tokenizers/text.tiktoken"
LAYOUT_FILE = "vocab.json"


def read_ranks(path: str) -> dict[bytes, int]:
    """tiktoken's ``<base64 token> <rank>`` lines."""
    import base64

    with open(path, "rb") as f:
        return {
            base64.b64decode(tok): int(rank)
            for tok, rank in (line.split() for line in f.read().splitlines() if line)
        }


class MegadiffTokenizer(PreTrainedTokenizer):
    """A megadiff model's text tokenizer and vocabulary layout, as a ``PreTrainedTokenizer``."""

    vocab_files_names = {"vocab_file": TEXT_FILE, "layout_file": LAYOUT_FILE}
    model_input_names = ["input_ids", "attention_mask"]

    def __init__(self, vocab_file: str, layout_file: str, pat_str: str, **kwargs) -> None:
        self.vocab_file, self.layout_file, self.pat_str = vocab_file, layout_file, pat_str
        self.ranks = read_ranks(vocab_file)
        self.encoding = tiktoken.Encoding(
            name="megadiff", pat_str=pat_str, mergeable_ranks=self.ranks, special_tokens={}
        )
        with open(layout_file, encoding="utf-8") as f:
            self.layout = json.load(f)
        self.specials: dict[str, int] = dict(self.layout["specials"])
        self.special_names = {i: name for name, i in self.specials.items()}
        self.id_to_bytes = {i: t for t, i in self.ranks.items()}
        kwargs.setdefault("mask_token", "<mask>")
        kwargs.setdefault("pad_token", "<pad>")
        kwargs.setdefault("additional_special_tokens", [
            t for t in self.specials if t not in ("<mask>", "<pad>")
        ])  # fmt: skip
        super().__init__(pat_str=pat_str, **kwargs)  # pat_str: kept in init_kwargs (saved)

    @property
    def vocab_size(self) -> int:
        """The model's vocabulary size (text, specials, image and audio codes)."""
        return int(self.layout["vocab_size"])

    def get_vocab(self) -> dict:
        return {**self.ranks, **self.specials}

    def _tokenize(self, text: str, **kwargs) -> list[bytes]:
        return [self.id_to_bytes[i] for i in self.encoding.encode_ordinary(text)]

    def _convert_token_to_id(self, token) -> int:
        if isinstance(token, str):
            if token in self.specials:
                return self.specials[token]
            token = token.encode("utf-8")
        return self.ranks[token]

    def _convert_id_to_token(self, index: int):
        return self.special_names.get(index, self.id_to_bytes.get(index, b""))

    def convert_tokens_to_string(self, tokens: list) -> str:
        return b"".join(t if isinstance(t, bytes) else t.encode() for t in tokens).decode(
            "utf-8", errors="replace"
        )

    def _decode(self, token_ids, skip_special_tokens: bool = False, **kwargs) -> str:
        """Text ids through tiktoken (bytes joined before UTF-8 decoding), specials as their
        names unless skipped, image/audio codes left out."""
        if isinstance(token_ids, int):
            token_ids = [token_ids]
        parts, run = [], []
        for i in (int(t) for t in token_ids):
            if i in self.id_to_bytes:
                run.append(i)
                continue
            if run:
                parts.append(self.encoding.decode(run, errors="replace"))
                run = []
            if i in self.special_names and not skip_special_tokens:
                parts.append(self.special_names[i])
        if run:
            parts.append(self.encoding.decode(run, errors="replace"))
        return "".join(parts)

    def save_vocabulary(self, save_directory: str, filename_prefix: str | None = None):
        """The rank file (under ``tokenizers/``) and ``vocab.json`` into ``save_directory``."""
        out = []
        for src, name in ((self.vocab_file, TEXT_FILE), (self.layout_file, LAYOUT_FILE)):
            dest = os.path.join(save_directory, name)
            os.makedirs(os.path.dirname(dest), exist_ok=True)
            if os.path.abspath(src) != os.path.abspath(dest):
                shutil.copyfile(src, dest)
            out.append(dest)
        return tuple(out)
