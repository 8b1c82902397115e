"""The held-out split of ``megadiff preprocess --val-fraction/--val-count`` (real MDS shards)."""

import hashlib
import json

import numpy as np
import pytest
from conftest import corpus

from megadiff.data import preprocess as pp
from megadiff.data.checks import verify_stream
from megadiff.data.mds import LocalStream


def cli(*argv):
    import argparse

    p = argparse.ArgumentParser()
    pp.add_arguments(p)
    return pp.run(p.parse_args([str(a) for a in argv]))


def _docs(path) -> list[str]:
    s = LocalStream(path)
    try:
        return [s[i]["tokens"].astype(np.int64).tobytes().hex() for i in range(len(s))]
    finally:
        s.close()


def _text(tmp_path, text_tok, out, *flags) -> int:
    src = tmp_path / "in.jsonl"
    if not src.exists():
        src.write_text("".join(json.dumps({"text": d}) + "\n" for d in corpus(120, seed=5)))
    return cli(
        "text", "--input", src, "--tokenizer", text_tok.spec, "--out", out, "--no-progress",
        "--shard-size", 1 << 12, *flags,
    )  # fmt: skip


def _below(ids_hex: str, fraction: float) -> bool:
    """The documented rule, computed independently: blake2b-64 of the int64 ids < fraction."""
    ids = np.frombuffer(bytes.fromhex(ids_hex), np.int64)
    h = hashlib.blake2b(digest_size=8)
    h.update(f"tokens{ids.shape}".encode())
    h.update(ids.tobytes())
    return int.from_bytes(h.digest(), "big") < fraction * 2**64


def test_val_fraction_is_deterministic_disjoint_and_in_the_manifest(tmp_path, text_tok):
    assert _text(tmp_path, text_tok, tmp_path / "a", "--val-fraction", 0.2) == 0
    assert _text(tmp_path, text_tok, tmp_path / "b", "--val-fraction", 0.2) == 0
    train, val = _docs(tmp_path / "a"), _docs(tmp_path / "a" / "val")
    assert (train, val) == (_docs(tmp_path / "b"), _docs(tmp_path / "b" / "val"))  # a rerun
    assert _text(tmp_path, text_tok, tmp_path / "plain") == 0  # no split: every document
    assert sorted(train + val) == sorted(_docs(tmp_path / "plain"))
    assert 10 <= len(val) <= 40 and not set(train) & set(val)
    assert all(_below(d, 0.2) for d in val) and not any(_below(d, 0.2) for d in train)
    m = json.loads((tmp_path / "a" / "manifest.json").read_text())
    assert m["num_samples"] == len(train)
    assert m["val"]["path"] == "val" and m["val"]["num_samples"] == len(val)
    assert m["val"]["fraction"] == 0.2 and m["val"]["count"] is None
    vm = json.loads((tmp_path / "a" / "val" / "manifest.json").read_text())
    assert vm["split"] == "val" and vm["num_samples"] == len(val) and vm["kind"] == "text"
    assert verify_stream(tmp_path / "a") == [] and verify_stream(tmp_path / "a" / "val") == []


def test_val_count_holds_out_exactly_n_lowest(tmp_path, text_tok):
    assert _text(tmp_path, text_tok, tmp_path / "c", "--val-count", 7) == 0
    val, train = _docs(tmp_path / "c" / "val"), _docs(tmp_path / "c")
    assert len(val) == 7 and len(train) == 120 - 7
    keys = {d: pp.content_key({"tokens": np.frombuffer(bytes.fromhex(d), np.int64)}) for d in val}
    assert max(keys.values()) < min(
        pp.content_key({"tokens": np.frombuffer(bytes.fromhex(d), np.int64)}) for d in train
    )
    assert json.loads((tmp_path / "c" / "manifest.json").read_text())["val"]["count"] == 7


def test_pair_stream_split_and_bad_flags(tmp_path, text_tok, capsys):
    from conftest import make_pair_stream

    from megadiff.data.preprocess import PreprocessError

    make_pair_stream(tmp_path / "none", "audio", 4, text_tok)
    assert not (tmp_path / "none" / "val").exists()
    rng = np.random.default_rng(1)
    codes = [rng.integers(0, 16, (5, 2)) for _ in range(9)]
    recs = [pp.Record(f"r{i}", text=f"clip {i}", item=c) for i, c in enumerate(codes)]
    modal = {"codebook_size": 16, "num_codebooks": 2}
    m = pp.write_shards("audio", recs, tmp_path / "pairs", text_tok, modal, val_count=2)
    assert (m["num_samples"], m["val"]["num_samples"]) == (7, 2)
    val = LocalStream(tmp_path / "pairs" / "val")
    assert len(val) == 2 and val[0]["codes"].shape == (5, 2)
    val.close()
    with pytest.raises(PreprocessError, match="--val-fraction"):
        pp.write_shards("text", [], tmp_path / "x", text_tok, val_fraction=1.5)
    for flags in (["--val-fraction", "1"], ["--val-fraction", "0.1", "--val-count", "3"]):
        with pytest.raises(SystemExit) as e:
            _text(tmp_path, text_tok, tmp_path / "bad", *flags)
        assert e.value.code == 2
    assert "--val-fraction" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()
